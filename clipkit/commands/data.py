"""``python -m clipkit data synth|inspect``: the command line of :mod:`clipkit.datatools`."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipkit.errors import DataError

SYNTH_EXAMPLE = "python -m clipkit data synth --out /tmp/scenes --format wds --samples 20000"
INSPECT_EXAMPLE = "python -m clipkit data inspect /tmp/scenes/train"
RAW = argparse.RawDescriptionHelpFormatter  # the examples stay on one line each, to copy


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clipkit data", description="Write or inspect image–text data.",
                                formatter_class=RAW, epilog=f"example:\n  {SYNTH_EXAMPLE}\n  {INSPECT_EXAMPLE}")
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("synth", help="write the embedded synthetic dataset as WebDataset shards or a CSV",
                       formatter_class=RAW, epilog=f"example:\n  {SYNTH_EXAMPLE}")
    s.add_argument("--out", type=Path, required=True, help="output directory")
    s.add_argument("--format", choices=["wds", "csv"], default="wds")
    s.add_argument("--samples", type=int, default=20000, help="training samples (default 20000)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=48)
    s.add_argument("--image-format", choices=["jpg", "png"], default="jpg")
    s.add_argument("--shard-size", type=int, default=1000, help="samples per WebDataset shard")
    s.add_argument("--retrieval-size", type=int, default=500)
    s.add_argument("--eval-per-class", type=int, default=20)
    i = sub.add_parser("inspect", help="counts, caption lengths and a contact sheet of a dataset",
                       formatter_class=RAW, epilog=f"example:\n  {INSPECT_EXAMPLE}")
    i.add_argument("path", help="shard pattern or directory of shards, a CSV/TSV file, or an image folder")
    i.add_argument("--limit", type=int, default=10000, help="samples to read (0: all; default 10000)")
    i.add_argument("--sheet", type=Path, default=Path("contact_sheet.png"), help="contact sheet PNG to write")
    return p


def main(args: list[str]) -> int:
    try:
        ns = parser().parse_args(args)
    except SystemExit as done:  # after --help (0), or argparse's own usage error, already printed (2)
        return int(done.code or 0)
    from clipkit.datatools import inspect, synth

    if ns.action == "synth":
        if ns.samples < 1:
            raise DataError("--samples must be at least 1")
        command = synth(ns.out, ns.format, ns.samples, ns.seed, ns.image_size, ns.shard_size, ns.image_format,
                        ns.retrieval_size, ns.eval_per_class)
        print(f"wrote {ns.samples:,} training samples ({ns.format}) to {ns.out}; train on them with:\n  {command}")
    else:
        print("\n".join(inspect(ns.path, ns.limit, ns.sheet)))
    return 0
