"""``python -m clipkit compare [--experiment NAME | --sweep ID|NAME]``: the command line of :mod:`clipkit.compare`."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

from clipkit.errors import UsageError

EXAMPLE = "python -m clipkit compare --experiment ablation_fig2 --levels 0.3,0.5 --out outputs/compare/fig2.md"


def parse_levels(text: str) -> list[float]:
    try:
        levels = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"levels must be fractions like 0.2,0.4,0.6, got {text!r}") from None
    levels = [lv / 100 if lv > 1 else lv for lv in levels]  # accept percentages too
    if not levels or any(not 0 < lv <= 1 or math.isnan(lv) for lv in levels):
        raise argparse.ArgumentTypeError(f"levels must lie in (0, 1], got {text!r}")
    return sorted(levels)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clipkit compare", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Figure-2 style comparison of an MLflow experiment's runs: zero-shot accuracy against images\n"
                    "processed, one curve per arm (objective) with seed bands, and a Markdown table.",
        epilog="Extra key=value arguments are config overrides that locate the run store, as for fit\n"
               f"(e.g. logger.tracking_uri=sqlite:///other.db).\n\nexample:\n  {EXAMPLE}")
    parser.add_argument("--experiment", default=None, help="MLflow experiment name (default: ablation_fig2; with "
                        "--sweep, where to look the sweep's name up)")
    parser.add_argument("--sweep", default=None, help="compare the jobs of one Hydra multirun (fit -m): its MLflow "
                        "parent run's id or name; plot and table become artifacts of that run")
    parser.add_argument("--metric", default=None, help="metric to plot (default: zeroshot/scenes/top1, or the first "
                        "zeroshot/<set>/top1 the runs logged)")
    parser.add_argument("--levels", type=parse_levels, default=None,
                        help="accuracy levels for images-to-reach, e.g. 0.3,0.5,0.7 (default: 10%%, 20%%, ... up to "
                             "the best arm's accuracy)")
    parser.add_argument("--out", type=Path, default=None,
                        help="Markdown file to write; the plot goes beside it as .png "
                             "(default: outputs/compare/EXPERIMENT.md, or the sweep's name)")
    parser.add_argument("--no-log", action="store_true", help="do not log the comparison to MLflow")
    return parser


def main(args: list[str]) -> int:
    try:
        known, overrides = parser().parse_known_args(args)
    except SystemExit as done:  # after --help (0), or argparse's own usage error, already printed (2)
        return int(done.code or 0)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise UsageError(f"unrecognised argument {bad[0]!r} (see python -m clipkit compare --help)")
    from clipkit.compare import compare
    from clipkit.config import compose_config

    cfg = compose_config(overrides)
    command = shlex.join(["python", "-m", "clipkit", "compare", *args])
    try:
        _, out = compare(cfg.logger.tracking_uri, known.experiment, known.out, known.metric, known.levels, command,
                         log=not known.no_log, sweep=known.sweep)
    except ValueError as err:
        raise UsageError(str(err)) from None
    where = f"the sweep's parent run {known.sweep!r}" if known.sweep else \
        f"a 'compare' run of experiment {known.experiment or 'ablation_fig2'!r}"
    print(f"wrote {out} and {out.with_suffix('.png')}" + ("" if known.no_log else f" (logged to {where})"),
          file=sys.stdout)
    return 0
