"""Writers of small on-disk datasets for the data tests: img2dataset-style shards, CSVs and image folders,
with every kind of bad sample the pipeline must survive."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(colour=(200, 30, 30), size=(24, 20), mode="RGB", fmt="PNG") -> bytes:
    if mode == "I;16":
        image = Image.fromarray(np.full(size[::-1], 40000, dtype=np.uint16))
    elif mode == "P":
        image = Image.new("RGB", size, colour).convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        image = Image.new("RGB", size, colour).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


GOOD = image_bytes()
# kind -> (image bytes or None, caption bytes or None), every way a sample can be skipped
BAD = {
    "truncated_image": (image_bytes(fmt="JPEG", size=(64, 64))[:300], b"a cut-off photo"),
    "empty_image": (b"", b"a zero-byte file"),
    "not_an_image": (b"<html>404 not found</html>", b"an error page"),
    "huge_image": (image_bytes(size=(1100, 1000), mode="L"), b"a panorama"),
    "missing_caption": (GOOD, None),
    "empty_caption": (GOOD, b"  \n\t "),
    "undecodable_caption": (GOOD, b"caf\xe9 latin-1"),
    "missing_image": (None, b"a caption without an image"),
}
MAX_PIXELS = 1_000_000  # the tests' data.max_image_pixels: the 1100x1000 image is "huge"
# kind -> image bytes that are repaired, not skipped
REPAIRS = {
    "cmyk": image_bytes(mode="CMYK", fmt="JPEG"),
    "16bit": image_bytes(mode="I;16"),
    "palette": image_bytes(mode="P"),
    "grayscale": image_bytes(mode="L"),
    "rgba": image_bytes(mode="RGBA"),
}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: list[tuple[str, bytes | None, bytes | None]], ext: str = "png") -> None:
    """img2dataset layout: ``key.png`` + ``key.txt`` + ``key.json``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            if image is not None:
                _add(tar, f"{key}.{ext}", image)
            if caption is not None:
                _add(tar, f"{key}.txt", caption)
            _add(tar, f"{key}.json", b'{"status": "success"}')


def write_shards(root: Path, n_shards: int, good_per_shard: int, bad: dict | None = None,
                 repairs: dict | None = None) -> tuple[list[str], dict[str, int]]:
    """Shards of good samples with the given bad and repairable samples spread over them.
    Returns (keys of every usable sample as ``"<shard path> <key>"``, expected skip counts by kind)."""
    bad, repairs = dict(BAD if bad is None else bad), dict(repairs or {})
    extra = [(k, *v) for k, v in bad.items()] + [(k, image, b"a repaired image") for k, image in repairs.items()]
    usable, skipped = [], {}
    for s in range(n_shards):
        path = root / f"{s:05d}.tar"
        samples = [(f"{s:02d}{i:04d}", GOOD, f"sample {i} of shard {s}".encode()) for i in range(good_per_shard)]
        for j, (kind, image, caption) in enumerate(extra):
            if j % n_shards == s:
                samples.insert(j % (len(samples) + 1), (f"{s:02d}bad{j}", image, caption))
                if kind in bad:
                    skipped[kind] = skipped.get(kind, 0) + 1
                else:
                    usable.append(f"{path} {s:02d}bad{j}")
        write_shard(path, samples)
        usable += [f"{path} {s:02d}{i:04d}" for i in range(good_per_shard)]
    return usable, skipped
