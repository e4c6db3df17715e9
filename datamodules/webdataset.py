"""WebDataset shards in img2dataset's layout: ``key.jpg|png|webp`` + ``key.txt`` (+ ``key.json``) per sample.

webdataset does the URL expansion (braces, ``::`` lists), opening (local files, ``pipe:``, http) and the
grouping of tar members into samples; splitting, shuffling and bad-sample handling are
:mod:`datamodules.stream`'s, shared with every other source. Members are read here, not by webdataset's
``tar_file_iterator``: a tar cut short (a half-copied shard) makes that return a short last member and
stop without an error, silently losing the rest of the shard; here it is counted as ``unreadable_shard``.

A resumed reader replays its stream up to its position (:meth:`ShardSource.lazy_records`): from local plain tars it
reads the 512-byte headers only and seeks past the payloads, which are read later for just the records still in the
shuffle buffer, and never for the others. A shard's plain headers are checked, and its records grouped, as numpy
arrays a few thousand headers at a time (:func:`_plain_run`, :func:`_samples`); anything else one by one. It yields
the records, the damage and the errors that :meth:`records` would, in the same order, so the replay lands where the
interrupted run was.

Faster still, a resume reads no header at all: whenever :meth:`ShardSource.records` reads a local shard to its clean
end (as training does), it writes the shard's record index (keys, and where each image and caption lies) under
``index_dir``; the replay of a shard with an index made from the same file (path, size and modification time) reads
the index instead of the tar. A shard without one (cache cleared, another machine, the shard the interrupted run
was in the middle of) is replayed from its headers as above.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from functools import partial
from itertools import repeat
from pathlib import Path
from typing import NamedTuple

import numpy as np
from webdataset import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys

from clipkit.errors import DataError
from datamodules.base import CaptionDataModule
from datamodules.decode import BadSample
from datamodules.stream import Record

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
INDEX_VERSION = 1  # part of every index's name: a change of layout or meaning makes old ones unused

log = logging.getLogger(__name__)


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


def tar_members(stream, shard: str, seen: list | None = None) -> Iterator[dict]:
    """``{fname, data, __url__}`` per regular member of a tar stream; raises on a shard cut short. ``seen`` (if
    given) gets each member's ``(name, payload offset, size)``, from which :meth:`ShardSource.records` writes the
    shard's index."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if not info.isreg():
                continue
            data = tar.extractfile(info).read()
            if len(data) != info.size:
                raise BadSample("unreadable_shard", f"{shard}: ends inside {info.name}")
            if seen is not None:
                seen.append((info.name, info.offset_data, info.size))
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


USTAR = np.frombuffer(b"ustar", np.uint8)
OCTAL = 8 ** np.arange(10, -1, -1, dtype=np.int64)  # place values of an 11-digit octal field
RUN = 4096  # headers checked at once: [RUN, 512] bytes in memory


class Run(NamedTuple):
    """Regular members read as one run by :func:`_plain_run`: ``names [N, 100]`` uint8 (NUL-padded), ``lengths
    [N]`` of the names, and per member its payload's ``offsets`` and ``sizes``."""

    names: np.ndarray
    lengths: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray

    def members(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, int, int]]:
        """``(name, payload offset, size)`` of members ``start:stop``, one by one."""
        names = self.names[start:stop].view(f"S{self.names.shape[1]}").ravel().tolist()  # trailing NULs dropped
        for name, offset, size in zip(names, self.offsets[start:stop].tolist(), self.sizes[start:stop].tolist()):
            yield name.decode("utf-8", "surrogateescape"), offset, size


def _walk(view, offset: int, end: int) -> list[int]:
    """Offsets of the next (at most :data:`RUN`) headers from ``offset``, each found from the previous one's size
    field; stops at the first size field that is no number (the end of the archive, damage, base-256). Nothing is
    checked here (:func:`_plain_run` checks them all at once). A shard's members share a few sizes (pax records,
    most captions), so each distinct size field is parsed once."""
    heads, steps = [], {}
    push, step_of = heads.append, steps.get
    last = end - BLOCK
    for _ in range(RUN):
        if offset > last:
            break
        field = view[offset + 124:offset + 135]
        step = step_of(field)
        if step is None:
            try:
                step = steps[field] = BLOCK + (int(field, 8) + BLOCK - 1) // BLOCK * BLOCK
            except ValueError:
                break
        push(offset)
        offset += step
    return heads


def _blocks(view, end: int, rows: np.ndarray) -> np.ndarray:
    """Copies of the 512-byte blocks numbered ``rows`` -> ``[len(rows), 512]`` uint8 (no other page of the file is
    touched); the mmap is left unexported, so it can be closed."""
    blocks = np.frombuffer(view, np.uint8, count=end // BLOCK * BLOCK).reshape(-1, BLOCK)
    try:
        return blocks[rows]
    finally:
        del blocks


def _headers_ok(h: np.ndarray) -> np.ndarray:
    """``h [N, 512]`` -> ``[N]`` bool: a ustar header with an 11-digit octal size, NUL-ended, and the checksum field
    ``%06o\\0 `` equal to the unsigned byte sum (the field counted as spaces): a subset of what :func:`_header`
    accepts, on which both read the same size."""
    checksum = h[:, 148:156]
    stored = (checksum[:, :6] - 48).astype(np.int64) @ OCTAL[-6:]
    # two halves summed in 16 bits (256 x 255 < 2**16): faster than one 32-bit sum
    total = (h[:, :256].sum(1, dtype=np.uint16).astype(np.int64) + h[:, 256:].sum(1, dtype=np.uint16)
             - checksum.sum(1, dtype=np.int64) + 256)
    return (((h[:, 124:135] - 48) < 8).all(1) & (h[:, 135] == 0) & (h[:, 257:262] == USTAR).all(1)
            & ((checksum[:, :6] - 48) < 8).all(1) & (checksum[:, 6] == 0) & (checksum[:, 7] == 32) & (stored == total))


def _one_mtime(data: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Whether each pax block ``data [N, 512]`` holds one record, ``"<size> mtime=<value>\\n"``, and a NUL after it
    (where tarfile stops reading records): what webdataset's writer adds to every member. ``size [N]`` (1..512): the
    pax header's size field."""
    ok = np.zeros(len(data), bool)
    lengths = np.unique(size).tolist()  # one or two per shard
    for length in lengths:
        rows = np.flatnonzero(size == length) if len(lengths) > 1 else slice(None)
        lead = np.frombuffer(f"{length} mtime=".encode(), np.uint8)
        if len(lead) < length:
            block = data[rows]
            ok[rows] = ((block[:, :len(lead)] == lead).all(1) & (block[:, length - 1] == ord("\n"))
                        & (block[:, min(length, BLOCK - 1)] == 0 if length < BLOCK else True))
    return ok


def _plain_run(view, offset: int, end: int) -> tuple[Run | None, int]:
    """``(Run, offset after it)``: the members from ``offset`` on that
    :func:`_plain_member` would take as plain, up to the first it would not (or :data:`RUN` headers), checked as
    arrays instead of one by one: each a regular ustar member (see :func:`_headers_ok`) whose name has no prefix
    field, no NUL inside and no trailing slash and whose payload is inside the file, after at most one pax header
    that holds only an ``mtime`` (:func:`_one_mtime`). The caller reads the member the run stopped at (the end of
    the archive, damage, anything else) one by one. Parsing each header in Python is what held the replay at
    ~6,000 records/s."""
    heads = _walk(view, offset, end) if offset % BLOCK == 0 else []
    if not heads:
        return None, offset
    at = np.asarray(heads, np.int64)
    h = _blocks(view, end, at // BLOCK)
    size, kind = (h[:, 124:135] - 48).astype(np.int64) @ OCTAL, h[:, 156]
    named = h[:, :100] != 0
    length = named.sum(1)
    ok = _headers_ok(h)
    regular = (ok & ((kind == ord("0")) | (kind == 0)) & (h[:, 345] == 0) & (at + BLOCK + size <= end)
               & ~(named[:, 1:] & ~named[:, :-1]).any(1)  # no NUL inside the name
               & (h[np.arange(len(h)), np.maximum(length - 1, 0)] != ord("/")))
    pax = ok & (kind == ord("x")) & (size > 0) & (size <= BLOCK) & (at + 2 * BLOCK <= end)  # its record in the file
    if pax.any():
        pax[pax] = _one_mtime(_blocks(view, end, at[pax] // BLOCK + 1), size[pax])
    member = regular | (pax & np.append(regular[1:], False))  # a pax header belongs to the member after it
    n = len(heads) if member.all() else int(member.argmin())
    if n == 0:
        return None, offset
    keep = np.flatnonzero(regular[:n])
    run = Run(h[keep, :100], length[keep], at[keep] + BLOCK, size[keep])
    return run, heads[n - 1] + BLOCK + (int(size[n - 1]) + BLOCK - 1) // BLOCK * BLOCK


def tar_entries(f, path: str) -> Iterator[Run | tuple[str, int, int]]:
    """The regular members of a local tar, in order, reading headers only (the file is memory-mapped: a header
    costs a page, not a read): runs of plain members as a :class:`Run` (:func:`_plain_run`, most of a webdataset
    shard), the others one by one as ``(name, payload offset, size)``; raises :class:`BadSample` where
    :func:`tar_members` would. A member a run stops at is parsed by :func:`_plain_member` (plain ustar headers, pax
    headers holding only times, ids, path and size) or else ``tarfile`` (the end of the archive and damage
    included)."""
    end = os.fstat(f.fileno()).st_size
    view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if end else b""
    tar, offset = None, 0
    try:
        while True:
            run, offset = _plain_run(view, offset, end)
            if run is not None:
                yield run
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


class Samples(NamedTuple):
    """A :class:`Run` grouped into samples: ``starts`` (first member of each), ``keys``, and the member holding
    each sample's image and caption (-1: none; :meth:`ShardSource._members` hands them on as functions reading
    them, or None)."""

    starts: list[int]
    keys: list[str]
    images: list[int]
    captions: list[int]


def _samples(run: Run, image_keys: tuple[str, ...], caption_key: str) -> Samples | None:
    """The samples webdataset's ``group_by_keys`` makes of a run's members (key: the name up to the first dot of its
    last part, as :func:`split_name`; suffixes lower-cased; the image: the first of ``image_keys`` present), computed
    for all members at once; None if a member needs reading one by one (a name :func:`split_name` gives to the
    regex, or a suffix twice in a sample: an error there)."""
    lengths = run.lengths
    names = run.names[:, :max(1, int(lengths.max()))]  # the bytes that hold names
    count, width = names.shape
    rows, cols = np.arange(count), np.arange(width)
    slash = names == ord("/")
    base = np.where(slash.any(1), width - slash[:, ::-1].argmax(1), 0)  # where the last part starts
    dots = (names == ord(".")) & (cols > base[:, None])
    dot = dots.argmax(1)
    if not (dots.any(1) & (names[rows, np.minimum(base, width - 1)] != ord("."))).all():
        return None
    prefix = np.where(cols < dot[:, None], names, 0)
    new = np.ones(count, bool)
    new[1:] = (prefix[1:] != prefix[:-1]).any(1)
    starts = np.flatnonzero(new)
    sample = np.cumsum(new) - 1
    # suffixes, left-aligned; a few distinct ones per run
    span = max(1, int((lengths - dot - 1).max()))
    at = dot[:, None] + 1 + cols[:span]
    suffix = np.where(at < lengths[:, None], names[rows[:, None], np.minimum(at, width - 1)], 0)
    if span <= 8:  # as one number each: a hash, not a sort of strings
        packed = np.zeros((count, 8), np.uint8)
        packed[:, :span] = suffix
        distinct, which = np.unique(packed.view(np.uint64).ravel(), return_inverse=True)
        distinct = distinct.view(np.uint8).reshape(-1, 8).view("S8").ravel()
    else:
        distinct, which = np.unique(suffix.view(f"S{span}").ravel(), return_inverse=True)
    lowered = [name.decode("utf-8", "surrogateescape").lower() for name in distinct.tolist()]
    code = np.array([lowered.index(name) for name in lowered])[which.ravel()]
    if len(np.unique(sample * len(lowered) + code)) < count:
        return None
    rank = np.array([image_keys.index(name) if name in image_keys else len(image_keys) for name in lowered])[code]
    best = np.minimum.reduceat(rank, starts)
    image, caption = np.full(len(starts), -1), np.full(len(starts), -1)
    is_image = (rank == best[sample]) & (rank < len(image_keys))
    image[sample[is_image]] = rows[is_image]
    is_caption = np.array([name == caption_key for name in lowered])[code]
    caption[sample[is_caption]] = rows[is_caption]
    keys = [key.decode("utf-8", "surrogateescape") for key in prefix[starts].view(f"S{width}").ravel().tolist()]
    return Samples(starts.tolist(), keys, image.tolist(), caption.tolist())


def _readers(shard: str, offsets: np.ndarray, sizes: np.ndarray) -> list:
    """A function reading each payload ``offsets[i], sizes[i]`` of ``shard`` (a negative offset: None), made in one
    pass."""
    have = offsets >= 0
    made = map(partial, repeat(read_payload), repeat(shard), offsets[have].tolist(), sizes[have].tolist())
    if have.all():
        return list(made)
    out = [None] * len(offsets)
    for i, reader in zip(np.flatnonzero(have).tolist(), made):
        out[i] = reader
    return out


def _grouped(items: Iterator, wanted: set[str]) -> Iterator:
    """webdataset's ``group_by_keys`` on ``(name, payload offset, size)`` members: ``(key, {suffix: (offset, size)
    if the suffix is in wanted else None})`` per sample (suffixes lower-cased, a member without a key skipped, a
    suffix twice in a sample a ValueError); a :class:`Samples` among the items ends the sample before it and is
    passed on."""
    key, sample = None, {}
    for item in items:
        if isinstance(item, Samples):  # whole samples, each after the previous one's last member
            if key is not None:
                yield key, sample
            key, sample = None, {}
            yield item
            continue
        name, offset, size = item
        prefix, suffix = split_name(name)
        if prefix is None:
            continue
        suffix = suffix.lower()
        if prefix != key:
            if key is not None:
                yield key, sample
            key, sample = prefix, {}
        if suffix in sample:
            raise ValueError(f"{name}: duplicate file name in tar file {suffix}")
        sample[suffix] = (offset, size) if suffix in wanted else None
    if key is not None:
        yield key, sample


class Index(NamedTuple):
    """A shard's records as :meth:`ShardSource.records` reads them: ``keys``, and ``spans [N, 4]``: each record's
    image offset and size, then its caption's (-1: none)."""

    keys: list[str]
    spans: np.ndarray


class ShardSource:
    """Records of tar shards. ``records`` ignores its seed: a tar is read in order, and the stream's
    shuffle buffer mixes samples across shards. ``index_dir``: where shard indexes are kept (None: none are)."""

    def __init__(self, shards: str | list[str], image_keys: tuple[str, ...] = IMAGE_KEYS,
                 caption_key: str = "txt", index_dir: str | None = None) -> None:
        self.urls = expand_shards(shards)
        self.image_keys, self.caption_key = tuple(image_keys), caption_key
        self.index_dir = index_dir

    def shards(self) -> list[str]:
        return self.urls

    def records(self, shard: str, seed: str | None = None) -> Iterator[Record]:
        made_from = self._index_of(shard)  # before reading: a shard changed meanwhile gets an index never used
        if made_from is not None and self._index_file(made_from).is_file():
            made_from = None  # indexed already (an earlier epoch, another worker)
        seen, keys = ([], []) if made_from is not None else (None, None)
        try:
            stream = gopen(shard, "rb")
        except Exception as err:  # gopen raises whatever the opener raises
            raise BadSample("unreadable_shard", f"{shard}: {err}") from None
        with stream:
            try:
                for sample in group_by_keys(tar_members(stream, shard, seen)):
                    image = self._image(sample)
                    if keys is not None:
                        keys.append(sample["__key__"])
                    yield Record(shard, sample["__key__"], image, sample.get(self.caption_key))
            except (tarfile.TarError, OSError, EOFError, ValueError) as err:
                raise BadSample("unreadable_shard", f"{shard}: {err}") from None
        if made_from is not None:  # read to its clean end (a damaged or half-read shard gets none)
            self._write_index(made_from, seen, keys)

    def _image(self, sample: dict, default=None):
        """A sample's image: the first of ``image_keys`` it has (as webdataset's readers pick it). One rule for the
        streaming reader, the header replay and the index, which must agree record for record."""
        return next((sample[k] for k in self.image_keys if k in sample), default)

    def index_path(self, shard: str) -> Path | None:
        """Where a local shard's index is (or would be) kept, named by the shard's path, size and modification
        time and the reader's keys, so an index is only ever read for the file it was made from; None when there
        is no ``index_dir``, or for a remote shard."""
        made_from = self._index_of(shard)
        return None if made_from is None else self._index_file(made_from)

    def _index_file(self, made_from: bytes) -> Path:
        return Path(self.index_dir) / f"{hashlib.sha256(made_from).hexdigest()}.npz"

    def _index_of(self, shard: str) -> bytes | None:
        """What an index of ``shard`` is made from: the shard's real path, size and modification time, the reader's
        keys, the index format; stored in the index too, and checked when it is read."""
        if self.index_dir is None or not _is_local(shard):
            return None
        try:
            stat = os.stat(shard)
        except OSError:
            return None
        return "\0".join(map(str, (INDEX_VERSION, os.path.realpath(shard), stat.st_size, stat.st_mtime_ns,
                                    self.image_keys, self.caption_key))).encode("utf-8", "surrogateescape")

    def _write_index(self, made_from: bytes, members: list, keys: list[str]) -> None:
        """The index of a shard just read whole, from its members' offsets, grouped as :meth:`lazy_records` groups
        them; written only if that grouping gives the very keys :meth:`records` gave. An index is a cache: if it
        cannot be written, the replay reads headers instead (one warning)."""
        spans = self._record_spans(members, keys)
        if spans is None:
            return
        blob = np.frombuffer("\0".join(keys).encode("utf-8", "surrogateescape"), np.uint8)
        path = self._index_file(made_from)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, keys=blob, spans=spans, made_from=np.frombuffer(made_from, np.uint8))
            os.replace(tmp, path)  # whole or not at all, whichever worker writes it
        except OSError as err:
            if not getattr(self, "_warned", False):
                log.warning("shard indexes are not kept (%s); a resume will read tar headers instead", err)
                self._warned = True
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _record_spans(self, members: list, keys: list[str]) -> np.ndarray | None:
        """``[N, 4]`` image and caption offsets and sizes of a whole shard's records, grouped from ``(name, offset,
        size)`` members as arrays (:func:`_samples`) or, for odd names, one by one (:func:`_grouped`); None unless
        the grouping gives ``keys``."""
        if not members:
            return np.zeros((0, 4), np.int64) if not keys else None
        names = [name.encode("utf-8", "surrogateescape") for name, _, _ in members]
        width = max(map(len, names))
        offsets, sizes = (np.array(column, np.int64) for column in list(zip(*members))[1:])
        run = Run(np.frombuffer(b"".join(n.ljust(width, b"\0") for n in names), np.uint8).reshape(-1, width),
                  np.array(list(map(len, names))), offsets, sizes)
        grouped = _samples(run, self.image_keys, self.caption_key) if b"\0" not in b"".join(names) else None
        if grouped is not None:
            if grouped.keys != keys:
                return None
            images, captions = np.array(grouped.images), np.array(grouped.captions)
            return np.stack([*_spans(run, images), *_spans(run, captions)], 1)
        try:
            samples = list(_grouped(iter(members), {*self.image_keys, self.caption_key}))
        except ValueError:
            return None
        if [key for key, _ in samples] != keys:
            return None
        none = (-1, -1)
        return np.array([(*self._image(sample, none), *sample.get(self.caption_key, none)) for _, sample in samples],
                        np.int64).reshape(-1, 4)

    def read_index(self, shard: str) -> Index | None:
        """The shard's index, if one was made from this very file; None otherwise, or if it cannot be read (a
        partial or foreign file in the cache: the replay then reads headers)."""
        made_from = self._index_of(shard)  # one stat of the shard names the index and checks it
        path = None if made_from is None else self._index_file(made_from)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as saved:
                blob, spans, stored = saved["keys"], saved["spans"], saved["made_from"].tobytes()
            keys = blob.tobytes().decode("utf-8", "surrogateescape").split("\0") if len(spans) else []
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        if stored != made_from or spans.dtype != np.int64 or spans.shape != (len(keys), 4):
            return None
        return Index(keys, spans)

    def lazy_records(self, shard: str, seed: str | None, replay) -> Iterator[Record]:
        """:meth:`records`, with payloads left unread while ``replay.on``: each is a function reading it, called
        only for a record the resumed reader keeps. From the shard's index if it has one (:meth:`read_index`),
        else from its headers; a remote or compressed shard is read as :meth:`records` does."""
        index = self.read_index(shard)
        if index is not None:
            yield from self._indexed(shard, index, replay)
            return
        try:
            f = open(shard, "rb") if _is_local(shard) else None
        except OSError as err:
            raise BadSample("unreadable_shard", f"{shard}: {err}") from None
        if f is None or f.read(BLOCK)[257:262] != b"ustar":
            if f is not None:
                f.close()
            yield from self.records(shard, seed)
            return

        def payload(span):  # past the position (rest of this shard), read now
            return span and (partial(read_payload, shard, *span) if replay.on else read_payload(shard, *span))

        with f:
            try:
                for item in _grouped(self._members(shard, tar_entries(f, shard)), {*self.image_keys,
                                                                                    self.caption_key}):
                    if isinstance(item, Samples):
                        # Record(...) made in C: tuple.__new__ is what a NamedTuple's own constructor calls
                        made = zip(repeat(shard), item.keys, item.images, item.captions)
                        yield from self._kept(map(tuple.__new__, repeat(Record), made), replay)
                        continue
                    key, sample = item
                    yield Record(shard, key, payload(self._image(sample)), payload(sample.get(self.caption_key)))
            except (tarfile.TarError, OSError, EOFError, ValueError) as err:
                raise BadSample("unreadable_shard", f"{shard}: {err}") from None

    def _indexed(self, shard: str, index: Index, replay) -> Iterator[Record]:
        """The records of an indexed shard, no byte of the tar read until a payload is wanted."""
        spans = index.spans
        images, captions = _readers(shard, spans[:, 0], spans[:, 1]), _readers(shard, spans[:, 2], spans[:, 3])
        yield from self._kept(map(tuple.__new__, repeat(Record), zip(repeat(shard), index.keys, images, captions)),
                              replay)

    @staticmethod
    def _kept(records: Iterator[Record], replay) -> Iterator[Record]:
        """Records with lazy payloads, read now for those past the replay's position (``replay.on`` is switched
        off by the reader when it gets there)."""
        for record in records:
            if not replay.on:
                record = Record(record.shard, record.key, *(p and p() for p in record[2:]))
            yield record

    def _members(self, shard: str, entries: Iterator) -> Iterator:
        """``(name, payload offset, size)`` per member, except that the samples wholly inside a :class:`Run` (all
        but its first and last, which may continue the previous run or the next) come as one :class:`Samples` of
        ``(starts, keys, a function reading each image or None, each caption or None)``, grouped as arrays."""
        for item in entries:
            if not isinstance(item, Run):
                yield item
                continue
            grouped = _samples(item, self.image_keys, self.caption_key)
            if grouped is None or len(grouped.starts) < 3:
                yield from item.members()
                continue
            first, last = grouped.starts[1], grouped.starts[-1]
            yield from item.members(0, first)
            inner = slice(1, -1)
            images, captions = (_readers(shard, *_spans(item, np.asarray(members[inner])))
                                for members in (grouped.images, grouped.captions))
            yield Samples(grouped.starts[inner], grouped.keys[inner], images, captions)
            yield from item.members(last)


def _spans(run: Run, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Payload offsets and sizes of a run's ``members`` (-1: none, offset -1)."""
    return np.where(members >= 0, run.offsets[members], -1), run.sizes[members]


class WebDatasetDataModule(CaptionDataModule):
    """Image–text pairs from WebDataset shards (``shards``), with an optional held-out shard set for
    retrieval (``retrieval_shards``) and labelled image folders for zero-shot (``eval_folders``)."""

    def __init__(self, shards: str | list[str], retrieval_shards: str | list[str] | None = None,
                 image_keys: tuple[str, ...] = IMAGE_KEYS, caption_key: str = "txt", index_dir: str | None = None,
                 **common) -> None:
        self.image_keys, self.caption_key = tuple(image_keys), caption_key
        self._source = ShardSource(shards, self.image_keys, caption_key, index_dir)
        self._retrieval_source = ShardSource(retrieval_shards, self.image_keys, caption_key) if retrieval_shards else None
        super().__init__(**common)

    def source(self) -> ShardSource:
        return self._source

    def retrieval_source(self) -> ShardSource | None:
        return self._retrieval_source
