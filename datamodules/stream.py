"""One training pipeline for every source: records -> split across readers -> shuffle -> decode ->
transform -> batch + tokenise, all inside the dataloader workers.

A *source* (WebDataset shards, CSV blocks, digits, generated scenes) only says which shards it has and
which records a shard holds. Everything else is here, so the embedded data and a user's shards run
through the same code:

* **Splitting.** A reader is one dataloader worker of one rank (``readers = world × workers``). With at
  least as many shards as readers, reader r takes shards r, r+n, ...; with fewer, readers share a shard
  and each keeps every c-th record of it. Either way every record goes to exactly one reader per pass,
  and no reader is left without data. (webdataset's ``split_by_worker`` leaves readers empty instead.)
* **Epochs.** Without ``samples_per_epoch`` an epoch is one exact pass. With it, every rank yields the
  same number of full batches (``samples_per_epoch // (world × batch_size)``), cycling its share
  (reshuffled) if it runs out: what DDP needs, since a rank that stops early hangs the others.
  ``resampled`` draws shards with replacement instead: an endless stream, cut by ``samples_per_epoch``.
* **Bad samples** are skipped or repaired (:mod:`datamodules.decode`) and counted; each batch carries
  the counts since the previous one as ``batch["data_stats"]`` for :class:`callbacks.data_health.DataHealth`.
* **Resuming.** Everything a reader does is a function of (seed, epoch, reader): the shard order, the
  shuffle buffer's draws, and each sample's random crop (seeded by its place in the reader's stream, not by
  a worker's running generator). Each batch carries ``batch["position"]``: its reader and how many records
  that reader had consumed once the batch was complete. :meth:`BatchStream.resume` replays each reader's
  record stream up to its position without decoding a single image (nor, from tar shards, reading one), and
  starts the workers' round robin at the worker whose batch was due next, so a resumed epoch yields exactly the
  batches the interrupted one had still to yield, in the same order.
* **Replay at scale.** A reader millions of records deep replays from record keys alone: a source that can
  (:meth:`datamodules.webdataset.ShardSource.lazy_records`, local tar shards) reads tar headers and seeks past
  the payloads, and only the records still in the shuffle buffer once the position is reached have their bytes
  read, when they are decoded.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, NamedTuple, Protocol

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipkit.errors import DataError
from clipkit.tokenization import tokenize
from datamodules.decode import BadSample, decode_caption, decode_image


MAX_BAD_IN_A_ROW = 10_000


class Record(NamedTuple):
    """One stored sample. ``image``: bytes, a path, a PIL image or a zero-argument function making one
    (so generated images are only drawn by the reader that keeps them). ``caption``: bytes, str or None."""

    shard: str
    key: str
    image: Any
    caption: Any


class Source(Protocol):
    """Where records come from. ``records`` yields a shard's records in a fixed order (or, given a
    ``seed`` string, a permutation all readers agree on), and raises :class:`BadSample` (kind
    ``unreadable_shard``) partway if the shard is damaged. A source may also offer
    ``lazy_records(shard, seed, replay)``: the same records, with payloads left as zero-argument functions while
    ``replay.on`` (:class:`Replay`)."""

    def shards(self) -> list[str]: ...

    def records(self, shard: str, seed: str | None) -> Iterator[Record]: ...


def assignment(num_shards: int, reader: int, readers: int) -> list[tuple[int, int, int]]:
    """Reader ``reader``'s share of one pass: ``(shard position, keep every c-th record, offset)``."""
    if num_shards >= readers:
        return [(s, 1, 0) for s in range(reader, num_shards, readers)]
    shard = reader % num_shards
    sharing = len(range(shard, readers, num_shards))
    return [(shard, sharing, reader // num_shards)]


def shuffled(records: Iterator[Record], size: int, rng: random.Random) -> Iterator[Record]:
    """Shuffle within a buffer of ``size`` records (webdataset's approach for streams larger than memory): once
    ``size - 1`` are held, each new record is drawn with them, and the one drawn leaves (the new record takes its
    place). A resumed reader replays these draws for millions of records, so the loop does nothing else."""
    records = iter(records)
    buffer: list[Record] = list(islice(records, max(size, 1) - 1))
    held, draw = len(buffer), rng.randrange
    if held == max(size, 1) - 1:
        for record in records:
            i = draw(held + 1)
            if i < held:
                buffer[i], record = record, buffer[i]
            yield record
    rng.shuffle(buffer)
    yield from buffer


@dataclass
class Replay:
    """``on`` while a resumed reader replays up to its position: records are then only counted and shuffled, so
    their payloads need not be read (most of them never will be)."""

    on: bool = False


@dataclass
class Tally:
    """Counts since the last batch; ``take()`` hands them over and starts again."""

    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    bad_shards: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def skip(self, kind: str, record: Record) -> None:
        self.skipped[kind] += 1
        self.bad_shards[record.shard] += 1
        self.examples.setdefault(kind, f"{record.shard} {record.key}")

    def take(self) -> Tally:
        """The counts so far, as a new tally; this one starts again from zero."""
        out = Tally(self.samples, self.skipped, self.repaired, self.bad_shards, self.examples)
        self.__init__()
        return out

    def add(self, other: Tally) -> Tally:
        self.samples += other.samples
        self.skipped += other.skipped
        self.repaired += other.repaired
        self.bad_shards += other.bad_shards
        for kind, example in other.examples.items():
            self.examples.setdefault(kind, example)
        return self

    def as_dict(self) -> dict:
        return {"samples": self.samples, "skipped": dict(self.skipped), "repaired": dict(self.repaired),
                "bad_shards": dict(self.bad_shards), "examples": dict(self.examples)}


class Counted:
    """An iterator that counts what has been taken from it (``n``), starting after ``skip`` items, which are
    read and dropped: how a resumed reader gets back to its position without decoding anything."""

    def __init__(self, items: Iterator, skip: int = 0) -> None:
        self.items = items
        last = deque(enumerate(islice(items, skip), 1), maxlen=1)  # consumed in C, counted on the way
        self.n = last[0][0] if last else 0

    def __iter__(self) -> Counted:
        return self

    def __next__(self):
        item = next(self.items)
        self.n += 1
        return item


def sample_seed(*parts) -> int:
    """A 63-bit seed from a sample's coordinates, so its augmentation does not depend on what ran before it."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def decode_record(record: Record, max_pixels: int, decode_size: int | None):
    """-> (RGB image, repair kind or None, caption); raises :class:`BadSample`."""
    if isinstance(record.image, BadSample):
        raise record.image
    if record.image is None:
        raise BadSample("missing_image")
    caption = decode_caption(record.caption() if callable(record.caption) else record.caption)
    payload = record.image() if callable(record.image) else record.image
    image, repaired = decode_image(payload, max_pixels, decode_size)
    return image, repaired, caption


class Collate:
    """Stacks and normalises images and tokenises captions (in the worker, so the training process only
    trains)."""

    def __init__(self, tokenizer, context_length: int, normalize: Callable) -> None:
        self.tokenizer, self.context_length, self.normalize = tokenizer, context_length, normalize

    def __call__(self, images: list[torch.Tensor], captions: list[str]) -> dict[str, torch.Tensor]:
        return {"images": self.normalize(torch.stack(images)),
                **tokenize(self.tokenizer, captions, self.context_length)}


class BatchStream(IterableDataset):
    """Batches from a :class:`Source`, split across ``world`` ranks × dataloader workers (see module doc).

    Yields dicts with ``images [B,3,S,S]``, ``input_ids``/``attention_mask [B,L]``, ``keys`` (where each
    sample came from), ``data_stats`` and ``position``. Use with ``DataLoader(batch_size=None)``.
    """

    def __init__(self, source: Source, batch_size: int, transform: Callable, collate: Collate, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 0, resampled: bool = False,
                 samples_per_epoch: int | None = None, max_image_pixels: int = 50_000_000,
                 decode_size: int | None = None, rank: int = 0, world: int = 1) -> None:
        self.source, self.batch_size, self.transform, self.collate = source, batch_size, transform, collate
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.resampled, self.samples_per_epoch, self.max_image_pixels = resampled, samples_per_epoch, max_image_pixels
        self.rank, self.world = rank, world
        self.epoch = 0
        self.decode_size = decode_size  # JPEGs are decoded at the smallest scale that covers it
        self.resume_state: dict | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, state: dict | None) -> None:
        """Continue epoch ``state["epoch"]`` where :class:`StreamPosition` ``state`` left it (the other epochs
        are not affected). ``None`` starts every epoch from its beginning."""
        self.resume_state = state

    def _start(self, workers: int) -> tuple[dict, int]:
        """(this rank's readers' positions, the worker whose batch is due first) for the current epoch."""
        state = self.resume_state
        if state is None or state["epoch"] != self.epoch:
            return {}, 0
        if state["workers"] != workers or state["world"] != self.world:
            raise DataError(f"the checkpoint's data position is for {state['world']} process(es) × {state['workers']} "
                            f"worker(s), this run has {self.world} × {workers}: resume with the same trainer.devices "
                            f"and data.num_workers")
        mine = {r: p for r, p in state["readers"].items() if r // workers == self.rank}
        if not mine:
            return {}, 0
        last = max(mine, key=lambda r: mine[r]["step"])
        return mine, (last % workers + 1) % workers

    def _batches_per_worker(self, worker: int, workers: int) -> int | None:
        if self.samples_per_epoch is None:
            return None
        per_rank = max(1, self.samples_per_epoch // (self.world * self.batch_size))
        return per_rank // workers + (worker < per_rank % workers)

    def _pass(self, reader: int, readers: int, number: int, replay: Replay) -> Iterator[Record]:
        """One pass over this reader's share (``number`` reseeds the shuffles of repeated passes)."""
        shards = self.source.shards()
        order = list(range(len(shards)))
        if self.shuffle:
            random.Random(f"{self.seed}/{self.epoch}/{number}").shuffle(order)
        for position, every, offset in assignment(len(shards), reader, readers):
            shard = shards[order[position]]
            shard_seed = f"{self.seed}/{self.epoch}/{number}/{shard}" if self.shuffle else None
            records = self._guarded(shard, shard_seed, replay)
            yield from records if every == 1 else islice(records, offset, None, every)

    def _resampled(self, reader: int, replay: Replay) -> Iterator[Record]:
        shards, rng = self.source.shards(), random.Random(f"{self.seed}/{self.epoch}/{reader}/resampled")
        empty_draws = 0
        for number in range(1 << 62):
            before = empty_draws
            for record in self._guarded(rng.choice(shards), f"{self.seed}/{self.epoch}/{reader}/{number}", replay):
                empty_draws = 0
                yield record
            if before == empty_draws and (empty_draws := empty_draws + 1) > 10 * len(shards):
                raise DataError(f"{empty_draws} shards drawn in a row held no samples: are the shards empty?")

    def _guarded(self, shard: str, seed: str | None, replay: Replay) -> Iterator[Record]:
        """A damaged shard loses its remaining records, counted, and the stream goes on."""
        lazy = getattr(self.source, "lazy_records", None) if replay.on else None
        try:
            yield from lazy(shard, seed, replay) if lazy else self.source.records(shard, seed)
        except BadSample as bad:
            yield Record(shard, "", bad, None)

    def _records(self, reader: int, readers: int, cycle: bool, replay: Replay) -> Iterator[Record]:
        if self.resampled:
            yield from self._resampled(reader, replay)
            return
        number = 0
        while True:
            records = self._pass(reader, readers, number, replay)
            first = next(records, None)
            if first is not None:
                yield first
                yield from records
            number += 1
            if not cycle:
                return
            if first is None:  # cycling an empty share would spin forever
                raise DataError(f"reader {reader} of {readers} has no samples in its share of the shards")

    def _stream(self, reader: int, readers: int, cycle: bool, skip: int) -> Counted:
        """This reader's (shuffled) records, the first ``skip`` replayed: counted and shuffled from keys and tar
        headers, payloads read only for the records the shuffle buffer still holds at the position."""
        replay = Replay(on=skip > 0)
        records = self._records(reader, readers, cycle, replay)
        if self.shuffle and self.shuffle_buffer > 1:
            records = shuffled(records, self.shuffle_buffer, random.Random(f"{self.seed}/{self.epoch}/{reader}"))
        counted = Counted(records, skip=skip)
        replay.on = False
        return counted

    def _decoded(self, records: Counted, tally: Tally, reader: int) -> Iterator[tuple[str, torch.Tensor, str]]:
        in_a_row = 0
        for record in records:
            try:
                image, repaired, caption = decode_record(record, self.max_image_pixels, self.decode_size)
            except BadSample as bad:
                tally.skip(bad.kind, record)
                in_a_row += 1
                if in_a_row == MAX_BAD_IN_A_ROW:  # a reader whose share is all bad would spin forever
                    raise DataError(f"{in_a_row:,} bad samples in a row (last: {record.shard} {record.key}, "
                                    f"{bad.kind}): this reader's shards hold no usable data") from None
                continue
            in_a_row = 0
            if repaired:
                tally.repaired[repaired] += 1
            tally.samples += 1
            # the crop of record n of this reader's stream, whatever ran before it (fork_rng: with no workers this
            # runs in the training process, whose generator must not move)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, self.epoch, reader, records.n))
                pixels = self.transform(image)
            yield f"{record.shard} {record.key}", pixels, caption

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        positions, first = self._start(workers)
        role = (worker + first) % workers  # a resumed epoch's round robin starts at the worker that was due
        reader, readers = self.rank * workers + role, self.world * workers
        done = positions.get(reader, {"records": 0, "batches": 0})
        quota = self._batches_per_worker(role, workers)
        if quota is not None and done["batches"] >= quota:
            return
        counted = self._stream(reader, readers, cycle=quota is not None, skip=done["records"])
        tally, made = Tally(), done["batches"]
        samples = self._decoded(counted, tally, reader)
        batch = list(islice(samples, self.batch_size))
        while batch and (quota is None or made < quota):
            stats, consumed = tally.take(), counted.n
            # read the next batch before handing this one over, so the skips at the very end of a pass still
            # travel with the last batch (and its position is then the end of the pass)
            following = [] if quota is not None and made + 1 == quota else list(islice(samples, self.batch_size))
            if not following:
                stats, consumed = stats.add(tally.take()), counted.n
            made += 1
            position = {"epoch": self.epoch, "reader": reader, "records": consumed, "batches": made}
            yield self._collate(batch, stats, position)
            batch = following

    def _collate(self, batch: list, stats: Tally, position: dict) -> dict:
        keys, images, captions = map(list, zip(*batch, strict=True))
        return {**self.collate(images, captions), "keys": keys, "data_stats": stats.as_dict(), "position": position}


class StreamPosition:
    """Where training is in the stream: per reader, the records consumed and batches made up to the last batch
    that was *trained* (Lightning fetches ahead, so the loader's own count would skip a batch on resume).
    :meth:`trained` is told of every batch; :meth:`state` is the checkpointed form, merged over ranks."""

    def __init__(self, workers: int, world: int) -> None:
        self.workers, self.world, self.epoch, self.steps = workers, world, 0, 0
        self.readers: dict[int, dict] = {}

    def trained(self, position: dict) -> None:
        if position["epoch"] != self.epoch:
            self.epoch, self.readers = position["epoch"], {}
        self.steps += 1
        self.readers[position["reader"]] = {"records": position["records"], "batches": position["batches"],
                                            "step": self.steps}

    def state(self) -> dict:
        return {"epoch": self.epoch, "workers": self.workers, "world": self.world, "readers": dict(self.readers)}

    @staticmethod
    def merge(states: list[dict]) -> dict:
        """One state from every rank's (each rank's readers are its own)."""
        out = dict(states[0], readers={})
        for state in states:
            out["readers"].update(state["readers"])
        return out


class EpochDataLoader(DataLoader):
    """A DataLoader that tells its :class:`BatchStream` which epoch starts, so every epoch reshuffles.

    Lightning only calls ``set_epoch`` on samplers, and an iterable dataset has none. Workers are not
    persistent, so each epoch's workers receive the new epoch with their copy of the dataset.

    Its generator is its own (seeded by the stream's seed): starting an epoch must not draw from the global
    generator, or a resumed run's dropout masks would differ from the uninterrupted run's.
    """

    def __init__(self, stream: BatchStream, num_workers: int = 0, **kwargs) -> None:
        super().__init__(stream, batch_size=None, num_workers=num_workers, persistent_workers=False,
                         prefetch_factor=4 if num_workers else None,
                         generator=torch.Generator().manual_seed(stream.seed), **kwargs)
        self._epochs_started = 0
        if stream.resume_state is not None:
            self._epochs_started = stream.resume_state["epoch"]

    def __iter__(self):
        self.dataset.set_epoch(self._epochs_started)
        self._epochs_started += 1
        return super().__iter__()
