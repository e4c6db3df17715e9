"""``python -m clipkit eval ckpt=PATH ...``: the command line of :mod:`clipkit.evaluate`."""

from __future__ import annotations

from clipkit.commands import KeyValueCommand, one_line
from clipkit.errors import DataError, UsageError

COMMAND = KeyValueCommand(
    "eval", "python -m clipkit eval ckpt=PATH [tasks=[zeroshot,retrieval,linear_probe,fewshot]] [data=NAME] "
    "[key=value ...]",
    "Evaluate a checkpoint: zero-shot classification, retrieval, linear and few-shot probes. Writes a JSON report\n"
    "and logs it to MLflow. Model, tokenizer and (unless data=NAME) data config come from the checkpoint;\n"
    "data.* overrides adjust that data config (e.g. data.retrieval_captions=5).",
    "python -m clipkit eval ckpt=outputs/.../checkpoints/last.ckpt tasks=[zeroshot,linear_probe] data=digits")


def main(args: list[str]) -> int:
    args = COMMAND.arguments(args)
    if args is None:
        return 0
    from clipkit.config import compose_config
    from clipkit.evaluate import load_checkpoint, run_eval, summary

    with_group = any(a.startswith("data=") for a in args)
    data_overrides = [] if with_group else [a for a in args if a.startswith("data.")]
    rest = [a for a in args if a not in data_overrides]
    if not any(a.startswith("ckpt=") for a in rest):
        raise UsageError(f"eval needs a checkpoint: {COMMAND.usage}")
    cfg = compose_config(rest, config_name="eval")
    with one_line():
        ckpt, stored = load_checkpoint(cfg.ckpt)
    if cfg.seed is None:  # generated held-out sets follow the checkpoint's seed unless told otherwise
        cfg = compose_config([f"seed={stored.get('seed')}", *rest], config_name="eval")
    with one_line(DataError, ValueError):
        result = run_eval(cfg, data_overrides, ckpt, stored)
    print(summary(result), flush=True)
    return 0
