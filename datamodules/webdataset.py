"""WebDataset shards in img2dataset's layout: ``key.jpg|png|webp`` + ``key.txt`` (+ ``key.json``) per sample.

webdataset does the URL expansion (braces, ``::`` lists), opening (local files, ``pipe:``, http) and the
grouping of tar members into samples; splitting, shuffling and bad-sample handling are
:mod:`datamodules.stream`'s, shared with every other source. Members are read here, not by webdataset's
``tar_file_iterator``: a tar cut short (a half-copied shard) makes that return a short last member and
stop without an error, silently losing the rest of the shard; here it is counted as ``unreadable_shard``.

A resumed reader replays its stream up to its position (:meth:`ShardSource.lazy_records`): from local plain tars it
reads the 512-byte headers only and seeks past the payloads, which are read later for just the records still in the
shuffle buffer, and never for the others. It yields the records, the damage and the errors that :meth:`records`
would, in the same order, so the replay lands where the interrupted run was.
"""

from __future__ import annotations

import mmap
import os
import tarfile
import zlib
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from webdataset import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys

from clipkit.errors import DataError
from datamodules.base import CaptionDataModule
from datamodules.decode import BadSample
from datamodules.stream import Record

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def expand_shards(shards: str | list[str]) -> list[str]:
    """``/data/cc3m/{00000..00331}.tar``, a ``::``-separated list, a list, or a directory of ``*.tar``.
    Local shards must all exist: a typo in a brace range should cost seconds, not a silent tenth of the data."""
    if not isinstance(shards, str):  # a list (or Hydra ListConfig) of patterns
        urls = [u for s in shards for u in expand_shards(str(s))]
    elif _is_local(shards) and Path(shards).is_dir():
        urls = sorted(str(p) for p in Path(shards).glob("*.tar"))
        if not urls:
            raise DataError(f"no *.tar shards in directory {shards}")
    else:
        urls = expand_urls(shards)
    missing = [u for u in urls if _is_local(u) and not Path(u).is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(urls)} shards do not exist (first: {missing[0]}): "
                        "check data.shards")
    if not urls:
        raise DataError(f"data.shards={shards!r} names no shards")
    return urls


def _ends_cleanly(path: str, offset: int) -> bool:
    """A tar ends with two zero blocks after its last member; a cut-off copy does not."""
    with open(path, "rb") as f:
        f.seek(offset)
        tail = f.read(1024)
    return len(tail) == 1024 and not any(tail)


def tar_members(stream, shard: str) -> Iterator[dict]:
    """``{fname, data, __url__}`` per regular member of a tar stream; raises on a shard cut short."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if not info.isreg():
                continue
            data = tar.extractfile(info).read()
            if len(data) != info.size:
                raise BadSample("unreadable_shard", f"{shard}: ends inside {info.name}")
            yield {"fname": info.name, "data": data, "__url__": shard}
            tar.members = []  # a stream: keep no index of what was read
        if _is_local(shard) and not _ends_cleanly(shard, tar.offset):
            raise BadSample("unreadable_shard", f"{shard}: cut short after byte {tar.offset}")


BLOCK = 512
ZEROS = bytes(BLOCK)
REGULAR = (b"0", b"\0")  # regular file, old-style regular file
PLAIN_PAX_KEYS = {b"mtime", b"atime", b"ctime", b"uid", b"gid", b"uname", b"gname", b"path", b"size", b"comment"}


def read_payload(path: str, offset: int, size: int) -> bytes:
    """A member's bytes, read when a replayed record is kept (its shard was checked to hold them)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _header(view, offset: int) -> tuple[bytes, int] | None:
    """The ustar header at ``offset`` and its size field, if tarfile would take it as one (its checksum test: the
    stored sum is of the header with the checksum field read as spaces, bytes unsigned or, in some old tars, signed;
    Adler-32's low half is 1 + the byte sum mod 65521, a C loop, and a 512-byte sum is below 2 × 65521) and it is
    plain (no base-256 number); else None."""
    header = view[offset:offset + BLOCK]
    if len(header) < BLOCK or header[257:262] != b"ustar" or header[124] >= 128:
        return None
    try:
        stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    low = (zlib.adler32(header) & 0xFFFF) + 255 - sum(header[148:156])
    if stored != low and stored != low + 65521:
        unsigned = sum(header) - sum(header[148:156]) + 256  # the rare signed sum, in full
        if stored != unsigned - 256 * sum(b > 127 for b in header[:148] + header[156:]):
            return None
    return header, size


def split_name(name: str) -> tuple[str | None, str | None]:
    """webdataset's ``base_plus_ext`` (key = the name up to the first dot of its last part), without a regex for
    the usual names."""
    base = name.rfind("/") + 1
    dot = name.find(".", base + 1)
    if dot > base and name[base] != ".":
        return name[:dot], name[dot + 1:]
    return base_plus_ext(name)


def _pax(data: bytes) -> dict[bytes, bytes] | None:
    """A pax header's ``LEN key=value\\n`` records, if all are keys a member's own header can be read with (what
    webdataset's writer adds: a float ``mtime``); None sends the member to ``tarfile``."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0 or not data[pos:space].isdigit():
            return None
        length = int(data[pos:space])
        key, eq, value = data[space + 1:pos + length - 1].partition(b"=")
        if length <= 0 or data[pos + length - 1:pos + length] != b"\n" or not eq or key not in PLAIN_PAX_KEYS:
            return None
        out[key], pos = value, pos + length
    return out


def _plain_member(view, offset: int) -> tuple[str, int, int, int] | None:
    """``(name, payload offset, size, next header's offset)`` of a regular member with a plain ustar header (after
    at most one plain pax header); None for anything else (end of archive, damage, links, long GNU names...)."""
    found, pax = _header(view, offset), {}
    if found is not None and found[0][156:157] == b"x":
        pax = _pax(view[offset + BLOCK:offset + BLOCK + found[1]])
        if pax is None:
            return None
        offset += BLOCK + -(-found[1] // BLOCK) * BLOCK
        found = _header(view, offset)
    if found is None:
        return None
    (header, size), kind = found, found[0][156:157]
    name = header[:100].split(b"\0", 1)[0]
    if kind not in REGULAR or (kind == b"\0" and name.endswith(b"/")):
        return None
    if header[257:263] == b"ustar\0" and header[345] != 0:
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
    name = pax.get(b"path", name).decode("utf-8", "surrogateescape")
    if b"size" in pax:
        size = int(pax[b"size"]) if pax[b"size"].isdigit() else 0
    return name, offset + BLOCK, size, offset + BLOCK + -(-size // BLOCK) * BLOCK


def tar_entries(f, path: str) -> Iterator[tuple[str, int, int]]:
    """``(name, payload offset, size)`` per regular member of a local tar, reading headers only (the file is
    memory-mapped: a header costs a page, not a read); raises :class:`BadSample` where :func:`tar_members` would.
    Plain ustar headers (and pax headers holding only times, ids, path and size) are parsed here, which is what
    replaying ~10^5 records/s takes; everything else, the end of the archive and damage included, by ``tarfile``."""
    end = os.fstat(f.fileno()).st_size
    view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if end else b""
    tar, offset = None, 0
    try:
        while True:
            member = _plain_member(view, offset)
            if member is not None:
                name, data, size, offset = member
                regular = True
            else:
                f.seek(offset)
                if tar is None:  # reads the member at the file's position
                    tar = tarfile.TarFile(fileobj=f)
                    info, tar.firstmember = tar.firstmember, None
                else:
                    tar.offset = offset
                    info = tar.next()
                if info is None:
                    break
                name, size, data, regular, offset = info.name, info.size, info.offset_data, info.isreg(), tar.offset
            if regular:
                if data + size > end:
                    raise BadSample("unreadable_shard", f"{path}: ends inside {name}")
                yield name, data, size
    finally:
        if end:
            view.close()
    if not _ends_cleanly(path, offset):
        raise BadSample("unreadable_shard", f"{path}: cut short after byte {offset}")


class ShardSource:
    """Records of tar shards. ``records`` ignores its seed: a tar is read in order, and the stream's
    shuffle buffer mixes samples across shards."""

    def __init__(self, shards: str | list[str], image_keys: tuple[str, ...] = IMAGE_KEYS,
                 caption_key: str = "txt") -> None:
        self.urls = expand_shards(shards)
        self.image_keys, self.caption_key = tuple(image_keys), caption_key

    def shards(self) -> list[str]:
        return self.urls

    def records(self, shard: str, seed: str | None = None) -> Iterator[Record]:
        try:
            stream = gopen(shard, "rb")
        except Exception as err:  # gopen raises whatever the opener raises
            raise BadSample("unreadable_shard", f"{shard}: {err}") from None
        with stream:
            try:
                for sample in group_by_keys(tar_members(stream, shard)):
                    image = next((sample[k] for k in self.image_keys if k in sample), None)
                    yield Record(shard, sample["__key__"], image, sample.get(self.caption_key))
            except (tarfile.TarError, OSError, EOFError, ValueError) as err:
                raise BadSample("unreadable_shard", f"{shard}: {err}") from None

    def lazy_records(self, shard: str, seed: str | None, replay) -> Iterator[Record]:
        """:meth:`records`, with payloads left unread while ``replay.on``: each is a function reading it, called
        only for a record the resumed reader keeps. A remote or compressed shard is read as :meth:`records` does."""
        try:
            f = open(shard, "rb") if _is_local(shard) else None
        except OSError as err:
            raise BadSample("unreadable_shard", f"{shard}: {err}") from None
        if f is None or f.read(BLOCK)[257:262] != b"ustar":
            if f is not None:
                f.close()
            yield from self.records(shard, seed)
            return
        wanted = {*self.image_keys, self.caption_key}
        with f:
            try:
                key, sample = None, {}
                for name, offset, size in tar_entries(f, shard):
                    prefix, suffix = split_name(name)  # grouped as webdataset's group_by_keys does
                    if prefix is None:
                        continue
                    suffix = suffix.lower()
                    if prefix != key:
                        if key is not None:
                            yield self._record(shard, key, sample)
                        key, sample = prefix, {}
                    if suffix in sample:
                        raise ValueError(f"{name}: duplicate file name in tar file {suffix}")
                    sample[suffix] = None
                    if suffix in wanted:  # past the position (rest of this shard), read now
                        sample[suffix] = partial(read_payload, shard, offset, size) if replay.on else \
                            read_payload(shard, offset, size)
                if key is not None:
                    yield self._record(shard, key, sample)
            except (tarfile.TarError, OSError, EOFError, ValueError) as err:
                raise BadSample("unreadable_shard", f"{shard}: {err}") from None

    def _record(self, shard: str, key: str, sample: dict) -> Record:
        image = next((sample[k] for k in self.image_keys if k in sample), None)
        return Record(shard, key, image, sample.get(self.caption_key))


class WebDatasetDataModule(CaptionDataModule):
    """Image–text pairs from WebDataset shards (``shards``), with an optional held-out shard set for
    retrieval (``retrieval_shards``) and labelled image folders for zero-shot (``eval_folders``)."""

    def __init__(self, shards: str | list[str], retrieval_shards: str | list[str] | None = None,
                 image_keys: tuple[str, ...] = IMAGE_KEYS, caption_key: str = "txt", **common) -> None:
        self.image_keys, self.caption_key = tuple(image_keys), caption_key
        self._source = ShardSource(shards, self.image_keys, caption_key)
        self._retrieval_source = ShardSource(retrieval_shards, self.image_keys, caption_key) if retrieval_shards else None
        super().__init__(**common)

    def source(self) -> ShardSource:
        return self._source

    def retrieval_source(self) -> ShardSource | None:
        return self._retrieval_source
