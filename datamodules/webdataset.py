"""WebDataset shards in img2dataset's layout: ``key.jpg|png|webp`` + ``key.txt`` (+ ``key.json``) per sample.

webdataset does the URL expansion (braces, ``::`` lists), opening (local files, ``pipe:``, http) and the
grouping of tar members into samples; splitting, shuffling and bad-sample handling are
:mod:`datamodules.stream`'s, shared with every other source. Members are read here, not by webdataset's
``tar_file_iterator``: a tar cut short (a half-copied shard) makes that return a short last member and
stop without an error, silently losing the rest of the shard; here it is counted as ``unreadable_shard``.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

from webdataset import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys

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
