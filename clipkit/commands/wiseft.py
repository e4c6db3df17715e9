"""``python -m clipkit wiseft zeroshot=A finetuned=B ...``: the command line of :mod:`clipkit.wiseft`."""

from __future__ import annotations

from clipkit.commands import KeyValueCommand, scoring_command

COMMAND = KeyValueCommand(
    "wiseft", "python -m clipkit wiseft zeroshot=PATH finetuned=PATH [alphas=[0,0.1,...,1]] [key=value ...]",
    "WiSE-FT (Wortsman et al. 2022): interpolate the weights of a zero-shot model and its fine-tuned version,\n"
    "theta = (1 - alpha) zeroshot + alpha finetuned, and score every alpha in distribution and on each shifted\n"
    "domain: a table, a JSON file and a plot (shifted against in-distribution top-1), logged to MLflow.",
    "python -m clipkit wiseft zeroshot=demo/model.safetensors finetuned=outputs/.../last.ckpt alphas=[0,0.5,1]",
    required=("zeroshot", "finetuned"))


def main(args: list[str]) -> int:
    return scoring_command(COMMAND, args, score)


def score(cfg) -> tuple[dict, str]:
    from clipkit.wiseft import parse_alphas, table, wiseft

    parse_alphas(cfg.alphas)  # before loading anything
    result = wiseft(cfg)
    return result, table(result["rows"])
