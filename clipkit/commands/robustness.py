"""``python -m clipkit robustness ckpts=[...]``: the command line of :mod:`clipkit.robustness`."""

from __future__ import annotations

from clipkit.commands import asks_for_help, config_help, overrides_only
from clipkit.errors import UsageError

USAGE = "python -m clipkit robustness ckpts=[contrastive.ckpt,supervised_run/checkpoints]"


def help_text() -> str:
    return config_help(
        "robustness", f"{USAGE} [key=value ...]",
        "Accuracy under distribution shift (the generated scenes' shifted domains) for several checkpoints, and the\n"
        "effective robustness of zero-shot and probed models against the supervised ones: a table, a JSON file and\n"
        "a plot, logged to MLflow.",
        "python -m clipkit robustness ckpts=[contrastive/last.ckpt,supervised_run/checkpoints] out=robustness")


def main(args: list[str]) -> int:
    if asks_for_help(args):
        print(help_text())
        return 0
    args = overrides_only("robustness", args)
    from clipkit.config import compose_config, require
    from clipkit.robustness import robustness, table

    cfg = compose_config(args, config_name="robustness")
    require(cfg, ("ckpts",), USAGE)
    if cfg.mlflow not in ("new", "none"):
        raise UsageError(f"mlflow={cfg.mlflow}: choose new or none")
    try:
        result = robustness(cfg)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    print(table(result["rows"]))
    where = f"  (MLflow run {result['mlflow_run']})" if result["mlflow_run"] else ""
    print(f"written: {', '.join(result['files'])}{where}", flush=True)
    return 0
