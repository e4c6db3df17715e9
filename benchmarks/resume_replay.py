"""What does exact resume cost? A resumed reader replays its record stream up to its position (shard order and
shuffle-buffer draws are functions of the seed) without decoding images, and from tar shards without reading
payloads: from each shard's record index, which the interrupted run wrote as it read the shard, or without one from
the tar headers, checked as arrays and grouped with numpy; only the records left in the shuffle buffer have their
payloads read, when decoded. This measures both replays (``BatchStream._stream``, the resumed reader's own path)
against the same replay reading every payload through ``tarfile`` (how it replayed before issue 20), on the same
records in the same run, and against the loader's normal decode rate; one reader, no dataloader workers. It also
measures what writing the indexes costs the streaming reader.

    python benchmarks/resume_replay.py [--samples 8192] [--depth 65536] [--repeats 3]

``--samples`` records are written; the reader is ``--depth`` records deep, cycling through them reshuffled (as a
reader with ``samples_per_epoch`` does), because a reader worth resuming is deep: the fixed costs (the last buffer's
payloads, read when decoded) are reported apart, not spread over a short replay. Before and after alternate
``--repeats`` times and the medians are printed, as the machine may be shared. Rows: WebDataset shards of 48 px and
256 px JPEGs written by ``clipkit data synth`` (read from the page cache here: a cold network file system reads the
bytes again at its own speed), and the generated default stream. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path
from statistics import median

from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.data_throughput import jpeg_shards  # noqa: E402
from clipkit.config import compose_config  # noqa: E402
from datamodules.stream import Counted, Replay, shuffled  # noqa: E402


def payloads_read(stream, depth: int) -> float:
    """Records/s of the replay as it was: the same records, shuffle and count, every payload read."""
    records = stream._records(0, 1, True, Replay(on=False))
    if stream.shuffle and stream.shuffle_buffer > 1:
        records = shuffled(records, stream.shuffle_buffer, random.Random(f"{stream.seed}/{stream.epoch}/0"))
    start = time.perf_counter()
    return Counted(records, skip=depth).n / (time.perf_counter() - start)


def replayed(stream, depth: int) -> tuple[float, float]:
    """(records/s of the resumed reader's replay to ``depth``, seconds to then read the payloads of the next
    ``shuffle_buffer`` records: those the buffer held at the position, whose payloads were not read in the replay, and
    the records that came in as they left; a fixed cost, paid once per resume, by the decoding workers)."""
    start = time.perf_counter()
    records = stream._stream(0, 1, cycle=True, skip=depth)
    rate = records.n / (time.perf_counter() - start)
    start = time.perf_counter()
    for record in islice(records, max(1, stream.shuffle_buffer)):
        for payload in (record.image, record.caption):
            _ = payload() if callable(payload) else payload
    return rate, time.perf_counter() - start


def read_once(source) -> float:
    """Records/s of reading every shard once to its end through the streaming reader (``records``)."""
    start, n = time.perf_counter(), 0
    for shard in source.shards():
        n += sum(1 for _ in source.records(shard))
    return n / (time.perf_counter() - start)


def rates(overrides: list[str], samples: int, depth: int, repeats: int, index_dir: str | None) -> dict:
    """Medians over ``repeats`` alternating runs, reader 0: records/s replayed from shard indexes (``index``; the
    shards read whole first, as the interrupted run read them, into a new index folder each time) and from tar
    headers (``headers``), seconds reading the buffer's payloads after the header replay (``buffer``), records/s
    replayed reading every payload (``before``), records/s of reading every shard once without indexes
    (``unindexed``) and writing them (``writing``: what keeping indexes costs the streaming reader); and images/s
    decoded into batches (``samples`` images, ``decode``)."""
    no_index = [] if index_dir is None else ["data.index_dir=null"]  # a source with no indexes has no such key
    plain = instantiate(compose_config([*overrides, "data.num_workers=0", *no_index]).data)
    stream = plain.train_dataloader().dataset
    indexed = None
    if index_dir is not None:
        dm = instantiate(compose_config([*overrides, "data.num_workers=0", f"data.index_dir={index_dir}"]).data)
        indexed = dm.train_dataloader().dataset
    runs: dict[str, list] = {"index": [], "headers": [], "buffer": [], "before": [], "unindexed": [], "writing": []}
    for repeat in range(repeats):
        runs["before"].append(payloads_read(stream, depth))
        rate, buffer = replayed(stream, depth)
        runs["headers"].append(rate)
        runs["buffer"].append(buffer)
        if indexed is not None:
            # what training pays to leave the indexes: every shard read once without, and once writing them
            runs["unindexed"].append(read_once(stream.source))
            indexed.source.index_dir = f"{index_dir}/{repeat}"
            runs["writing"].append(read_once(indexed.source))
            runs["index"].append(replayed(indexed, depth)[0])
    out = {name: median(values) if values else None for name, values in runs.items()}
    it, seen = iter(stream), 0
    start = time.perf_counter()
    while seen < samples:
        seen += len(next(it)["keys"])
    return {**out, "decode": seen / (time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8192, help="records written (and images decoded)")
    parser.add_argument("--depth", type=int, default=65536, help="records the resumed reader replays")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (48, 256):
            overrides = [*jpeg_shards(Path(tmp), size, args.samples), f"data.samples_per_epoch={10 * args.depth}"]
            rows.append((f"WebDataset, {size} px JPEG, shuffle buffer 1000",
                         rates(overrides, args.samples, args.depth, args.repeats, f"{tmp}/index{size}")))
        rows.append(("generated scenes (default)",
                     rates([f"paths.cache_dir={tmp}/cache"], args.samples, args.depth, args.repeats, None)))
    print(f"| source (one reader {args.depth:,} records deep; {args.samples:,} records cycled) | replayed from shard "
          "indexes, records/s | from tar headers | reading payloads (before) | speed-up: indexes | speed-up: headers "
          "| next 1,000 records' payloads, once (s) | shards read once, records/s: without / writing indexes | "
          "decoded images/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows:
        index = "—" if r["index"] is None else f"{r['index']:,.0f}"
        gain = "—" if r["index"] is None else f"{r['index'] / r['before']:,.1f}×"
        writing = "—" if r["writing"] is None else \
            f"{r['unindexed']:,.0f} / {r['writing']:,.0f} ({r['writing'] / r['unindexed'] - 1:+.0%})"
        print(f"| {name} | {index} | {r['headers']:,.0f} | {r['before']:,.0f} | {gain} | "
              f"{r['headers'] / r['before']:,.1f}× | {r['buffer']:.2f} | {writing} | {r['decode']:,.0f} |")


if __name__ == "__main__":
    main()
