"""``python -m clipkit wiseft zeroshot=A finetuned=B ...``: the command line of :mod:`clipkit.wiseft`."""

from __future__ import annotations

from clipkit.commands import KeyValueCommand, one_line
from clipkit.errors import UsageError

COMMAND = KeyValueCommand(
    "wiseft", "python -m clipkit wiseft zeroshot=PATH finetuned=PATH [alphas=[0,0.1,...,1]] [key=value ...]",
    "WiSE-FT (Wortsman et al. 2022): interpolate the weights of a zero-shot model and its fine-tuned version,\n"
    "theta = (1 - alpha) zeroshot + alpha finetuned, and score every alpha in distribution and on each shifted\n"
    "domain: a table, a JSON file and a plot (shifted against in-distribution top-1), logged to MLflow.",
    "python -m clipkit wiseft zeroshot=demo/model.safetensors finetuned=outputs/.../last.ckpt alphas=[0,0.5,1]",
    required=("zeroshot", "finetuned"))


def main(args: list[str]) -> int:
    cfg = COMMAND.compose(args)
    if cfg is None:
        return 0
    if cfg.mlflow not in ("new", "none"):
        raise UsageError(f"mlflow={cfg.mlflow}: choose new or none")
    from clipkit.wiseft import parse_alphas, table, wiseft

    with one_line():
        parse_alphas(cfg.alphas)  # before loading anything
        result = wiseft(cfg)
    print(table(result["rows"]))
    where = f"  (MLflow run {result['mlflow_run']})" if result["mlflow_run"] else ""
    print(f"written: {', '.join(result['files'])}{where}", flush=True)
    return 0
