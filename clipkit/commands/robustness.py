"""``python -m clipkit robustness ckpts=[...]``: the command line of :mod:`clipkit.robustness`."""

from __future__ import annotations

from clipkit.commands import KeyValueCommand, scoring_command

COMMAND = KeyValueCommand(
    "robustness", "python -m clipkit robustness ckpts=[contrastive.ckpt,supervised_run/checkpoints] [key=value ...]",
    "Accuracy under distribution shift (the generated scenes' shifted domains) for several checkpoints, and the\n"
    "effective robustness of zero-shot and probed models against the supervised ones: a table, a JSON file and\n"
    "a plot, logged to MLflow.",
    "python -m clipkit robustness ckpts=[contrastive/last.ckpt,supervised_run/checkpoints] out=robustness",
    required=("ckpts",))


def main(args: list[str]) -> int:
    return scoring_command(COMMAND, args, score)


def score(cfg) -> tuple[dict, str]:
    from clipkit.robustness import robustness, table

    result = robustness(cfg)
    return result, table(result["rows"])
