"""What does exact resume cost? A resumed reader replays its record stream up to its position (shard order and
shuffle-buffer draws are functions of the seed) without decoding images, and from tar shards without reading
payloads (headers only; the records left in the shuffle buffer are read when decoded). This measures that replay
(``BatchStream._stream``, the resumed reader's own path) against the same replay reading every payload (how it
replayed before, measured here in the same run) and against the loader's normal decode rate; one reader, no
dataloader workers.

    python benchmarks/resume_replay.py [--samples 8192]

Rows: WebDataset shards of 48 px and 256 px JPEGs written by ``clipkit data synth`` (read from the page cache
here: a cold network file system reads the bytes again at its own speed), and the generated default stream.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.data_throughput import jpeg_shards  # noqa: E402
from clipkit.config import compose_config  # noqa: E402
from datamodules.stream import Counted, Replay, shuffled  # noqa: E402


def payloads_read(stream, samples: int) -> float:
    """Records/s of the replay as it was: the same records, shuffle and count, every payload read."""
    records = stream._records(0, 1, True, Replay(on=False))
    if stream.shuffle and stream.shuffle_buffer > 1:
        records = shuffled(records, stream.shuffle_buffer, random.Random(f"{stream.seed}/{stream.epoch}/0"))
    start = time.perf_counter()
    return Counted(records, skip=samples).n / (time.perf_counter() - start)


def rates(overrides: list[str], samples: int) -> tuple[float, float, float]:
    """(records/s replayed, records/s replayed reading every payload, images/s decoded into batches) for
    ``samples`` records of reader 0."""
    dm = instantiate(compose_config([*overrides, "data.num_workers=0"]).data)
    stream = dm.train_dataloader().dataset

    before = payloads_read(stream, samples)
    start = time.perf_counter()
    replayed = stream._stream(0, 1, cycle=True, skip=samples)
    next(replayed)  # the first record after the position: the shuffle buffer's payloads are read from here on
    replay = replayed.n / (time.perf_counter() - start)
    it, seen = iter(stream), 0
    start = time.perf_counter()
    while seen < samples:
        seen += len(next(it)["keys"])
    return replay, before, seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8192)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (48, 256):
            overrides = [*jpeg_shards(Path(tmp), size, args.samples), "data.samples_per_epoch=1000000"]
            rows.append((f"WebDataset, {size} px JPEG, shuffle buffer 1000", *rates(overrides, args.samples)))
        rows.append(("generated scenes (default)", *rates([f"paths.cache_dir={tmp}/cache"], args.samples)))
    print(f"| source ({args.samples:,} records of one reader) | replayed records/s | reading payloads (before) | "
          "speed-up | decoded images/s | replay / decode |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, replay, before, decode in rows:
        print(f"| {name} | {replay:,.0f} | {before:,.0f} | {replay / before:,.1f}× | {decode:,.0f} | "
              f"{replay / decode:,.0f}× |")


if __name__ == "__main__":
    main()
