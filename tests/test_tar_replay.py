"""The resumed reader's fast replay (issue 20): tar headers checked and records grouped as arrays must yield exactly
what the streaming reader yields, and the shuffle buffer's leaner loop must draw exactly as before."""

from __future__ import annotations

import io
import random
import tarfile
from itertools import islice

import pytest
import webdataset

import datamodules.webdataset as wds
from datamodules.decode import BadSample
from datamodules.stream import Counted, Replay, shuffled
from datamodules.webdataset import Run, ShardSource, tar_entries
from tests.test_data_sources import listing

SAMPLES = 40


def member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float = 1.5, pax: dict | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.pax_headers = len(data), mtime, pax or {}
    tar.addfile(info, io.BytesIO(data))


def shard(path, variant: str) -> None:
    """40 samples as webdataset's writer lays them out (a pax ``mtime`` before every member), with ``variant``
    changing sample 20 (or the whole shard), where a run of plain headers would be mid-way."""
    if variant == "webdataset writer":
        with webdataset.TarWriter(str(path)) as sink:
            for i in range(SAMPLES):
                sink.write({"__key__": f"k{i:04d}", "jpg": b"J" * (i * 37), "txt": f"caption {i}", "json": b"{}"})
        return
    form = tarfile.USTAR_FORMAT if variant == "ustar, no pax" else tarfile.PAX_FORMAT
    with tarfile.open(path, "w", format=form) as tar:
        for i in range(SAMPLES):
            key, odd = f"k{i:04d}", i == 20
            folder = "part/" if variant == "upper case, png, folders" and i % 2 else ""
            mtime = 7 if form == tarfile.USTAR_FORMAT else 1.5 + i
            if odd and variant == "duplicate suffix":
                member(tar, f"{key}.txt", b"first")
            if odd and variant == "a name without a suffix":  # no key: webdataset skips it
                member(tar, key, b"README")
            if odd and variant == "bad checksum":
                info = tarfile.TarInfo(f"{key}.jpg")
                info.size = 3
                block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
                block[0:1] = b"q"  # the name changed after the checksum was written
                tar.fileobj.write(bytes(block) + b"JPG".ljust(512, b"\0"))
                tar.offset += 1024
            elif not (odd and variant == "no image"):
                name = ("x" * 120 + "/" if odd and variant == "long name" else folder) + f"{key}.jpg"
                pax = {"LIBARCHIVE.creationtime": "1"} if odd and variant == "foreign pax key" else None
                member(tar, name, b"J" * (i * 37 + 1), mtime, pax)
            suffix = "TXT" if variant == "upper case, png, folders" and i % 3 == 0 else "txt"
            member(tar, f"{folder}{key}.{suffix}", f"caption {i}".encode(), mtime)
            if variant == "upper case, png, folders" and i % 5 == 0:
                member(tar, f"{folder}{key}.png", b"P" * 9, mtime)  # jpg comes first in image_keys
            member(tar, f"{folder}{key}.json", b"{}", mtime)
    if variant == "cut mid-way":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2 + 100])


VARIANTS = ["webdataset writer", "ustar, no pax", "upper case, png, folders", "duplicate suffix", "no image",
            "long name", "foreign pax key", "bad checksum", "cut mid-way", "a name without a suffix"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_array_replay_yields_what_the_streaming_reader_yields(tmp_path, variant):
    path = tmp_path / "00000.tar"
    shard(path, variant)
    source = ShardSource(str(path))
    streamed = listing(source.records(str(path)))
    assert listing(source.lazy_records(str(path), None, Replay(on=True))) == streamed
    for flip in (0, 1, 13, 21, 30):
        replay = Replay(on=True)
        assert listing(source.lazy_records(str(path), None, replay), replay, flip) == streamed
    runs = []
    with open(path, "rb") as f:  # and the arrays did the work: runs of several samples, not one by one
        try:
            for item in tar_entries(f, str(path)):
                runs += [item] if isinstance(item, Run) else []
        except (BadSample, tarfile.TarError):  # the damage: lazy_records turns it into unreadable_shard
            pass
    grouped = [wds._samples(run, source.image_keys, source.caption_key) for run in runs]
    if variant not in ("duplicate suffix", "a name without a suffix"):  # grouped one by one, as webdataset does
        assert any(g is not None and len(g.starts) >= 3 for g in grouped), variant
    if variant in ("duplicate suffix", "bad checksum", "cut mid-way"):
        assert streamed[-1] == "unreadable_shard" and 10 < len(streamed) < SAMPLES
    else:  # the long name makes a sample of its own
        assert len(streamed) == SAMPLES + (variant == "long name")


def test_a_webdataset_shard_is_replayed_without_parsing_headers_one_by_one(tmp_path, monkeypatch):
    """What makes the replay fast: the header-by-header parser only sees the end of the archive."""
    path = tmp_path / "00000.tar"
    shard(path, "webdataset writer")
    parsed = []
    header = wds._header
    monkeypatch.setattr(wds, "_header", lambda view, offset: parsed.append(offset) or header(view, offset))
    records = list(ShardSource(str(path)).lazy_records(str(path), None, Replay(on=True)))
    assert len(records) == SAMPLES and len(parsed) <= 2, f"{len(parsed)} headers parsed one by one"


def reference_shuffled(records, size, rng):
    """The shuffle buffer as it was written first (append, draw, swap, pop)."""
    buffer = []
    for record in records:
        buffer.append(record)
        if len(buffer) >= size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


@pytest.mark.parametrize("size", [0, 1, 2, 3, 8, 50])
def test_the_shuffle_buffer_draws_exactly_as_it_did(size):
    """Checkpoints hold positions in shuffled streams: a resumed run must replay the draws of the run that wrote
    them, so the faster loop has to yield the same order and leave the generator where the old one did."""
    for length in (0, 1, size - 1, size, size + 1, 3 * size + 7, 200):
        ours, theirs = random.Random(f"{size}/{length}"), random.Random(f"{size}/{length}")
        assert list(shuffled(iter(range(max(length, 0))), size, ours)) == \
            list(reference_shuffled(range(max(length, 0)), size, theirs))
        assert ours.random() == theirs.random()


def test_counted_counts_what_it_skipped_and_what_it_yields():
    counted = Counted(iter(range(10)), skip=4)
    assert counted.n == 4 and list(islice(counted, 2)) == [4, 5] and counted.n == 6
    short = Counted(iter(range(3)), skip=10)  # a stream that ends before the position
    assert short.n == 3 and list(short) == []


def indexed_source(path, tmp_path) -> ShardSource:
    return ShardSource(str(path), index_dir=str(tmp_path / "index"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_shard_read_whole_is_replayed_from_its_index_without_reading_the_tar(tmp_path, variant, monkeypatch):
    """Training reads each shard to its end and leaves its index; the replay then yields what the streaming reader
    yields without a header read. A damaged shard gets no index, and its replay reads headers as before."""
    path = tmp_path / "00000.tar"
    shard(path, variant)
    source = indexed_source(path, tmp_path)
    streamed = listing(source.records(str(path)))
    damaged = streamed[-1] == "unreadable_shard"
    assert source.index_path(str(path)).is_file() != damaged
    if not damaged:
        monkeypatch.setattr(wds, "tar_entries", lambda *_: pytest.fail("an indexed shard's headers were read"))
    for flip in (None, 0, 1, 13, 21, 30):
        replay = Replay(on=True)
        assert listing(source.lazy_records(str(path), None, replay), replay, flip) == streamed


def test_a_shard_half_read_gets_no_index(tmp_path):
    path = tmp_path / "00000.tar"
    shard(path, "webdataset writer")
    source = indexed_source(path, tmp_path)
    list(islice(source.records(str(path)), SAMPLES - 1))  # the run stopped before the shard's end
    assert not source.index_path(str(path)).exists()
    list(source.records(str(path)))
    assert source.index_path(str(path)).is_file()


def test_an_index_is_only_used_for_the_file_it_was_made_from(tmp_path):
    """A shard rewritten in place (same name, new records) or touched, and an index file cut short or foreign, all
    send the replay back to the headers, and it yields the shard as it now is."""
    path = tmp_path / "00000.tar"
    shard(path, "webdataset writer")
    source = indexed_source(path, tmp_path)
    list(source.records(str(path)))
    first = source.index_path(str(path))
    shard(path, "upper case, png, folders")  # new content, new size and time: a new name for its index
    assert source.index_path(str(path)) != first and source.read_index(str(path)) is None
    assert listing(source.lazy_records(str(path), None, Replay(on=True))) == listing(ShardSource(str(path))
                                                                                     .records(str(path)))
    list(source.records(str(path)))
    index = source.index_path(str(path))
    for damage in (index.read_bytes()[:100], b"not an npz", first.read_bytes()):
        index.write_bytes(damage)
        assert source.read_index(str(path)) is None
        assert listing(source.lazy_records(str(path), None, Replay(on=True))) == listing(source.records(str(path)))


def test_an_unwritable_index_directory_costs_a_warning_not_the_data(tmp_path, caplog):
    path = tmp_path / "00000.tar"
    shard(path, "webdataset writer")
    (tmp_path / "file").write_text("")
    source = ShardSource(str(path), index_dir=str(tmp_path / "file" / "index"))  # a file where a folder goes
    assert len(list(source.records(str(path)))) == SAMPLES
    assert len(list(source.records(str(path)))) == SAMPLES
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "shard indexes are not kept" in caplog.records[0].message
