"""``python -m clipkit robustness ckpts=[...]``: the command line of :mod:`clipkit.robustness`."""

from __future__ import annotations

from clipkit.commands import KeyValueCommand, one_line
from clipkit.errors import UsageError

COMMAND = KeyValueCommand(
    "robustness", "python -m clipkit robustness ckpts=[contrastive.ckpt,supervised_run/checkpoints] [key=value ...]",
    "Accuracy under distribution shift (the generated scenes' shifted domains) for several checkpoints, and the\n"
    "effective robustness of zero-shot and probed models against the supervised ones: a table, a JSON file and\n"
    "a plot, logged to MLflow.",
    "python -m clipkit robustness ckpts=[contrastive/last.ckpt,supervised_run/checkpoints] out=robustness",
    required=("ckpts",))


def main(args: list[str]) -> int:
    cfg = COMMAND.compose(args)
    if cfg is None:
        return 0
    if cfg.mlflow not in ("new", "none"):
        raise UsageError(f"mlflow={cfg.mlflow}: choose new or none")
    from clipkit.robustness import robustness, table

    with one_line():
        result = robustness(cfg)
    print(table(result["rows"]))
    where = f"  (MLflow run {result['mlflow_run']})" if result["mlflow_run"] else ""
    print(f"written: {', '.join(result['files'])}{where}", flush=True)
    return 0
