"""A labelled image folder as a zero-shot set: ``root/<class>/*.jpg``, plus optional ``root/classnames.txt``
(one readable name per line, in the sorted order of the class folders) and ``root/templates.txt`` (one
prompt per line with ``{}`` for the class name). torchvision finds the classes and files; decoding goes
through :mod:`datamodules.decode`, so a bad file is skipped and counted like in training."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from clipkit.errors import DataError
from clipkit.zeroshot import ZeroShotSet, class_prompts
from datamodules.decode import BadSample, decode_image

log = logging.getLogger(__name__)


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def folder_classes(root: Path) -> tuple[list[str], dict[str, int]]:
    """(readable class names, folder -> index)."""
    try:
        folders, index = find_classes(str(root))
    except FileNotFoundError as err:
        raise DataError(f"image folder {root}: {err}") from None
    names = [f.replace("_", " ") for f in folders]
    if (root / "classnames.txt").is_file():
        names = _lines(root / "classnames.txt")
        if len(names) != len(folders):
            raise DataError(f"{root}/classnames.txt has {len(names)} names for {len(folders)} class folders")
    return names, index


def folder_templates(root: Path, default: tuple[str, ...]) -> tuple[str, ...]:
    if not (root / "templates.txt").is_file():
        return default
    templates = _lines(root / "templates.txt")
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise DataError(f"{root}/templates.txt: every line needs a {{}} for the class name (bad: {bad[:1]})")
    return tuple(templates)


def image_folder_set(root: str | Path, tokenizer, context_length: int, transform: Callable, normalize: Callable,
                     templates: tuple[str, ...], max_per_class: int | None = None,
                     max_image_pixels: int = 50_000_000) -> ZeroShotSet:
    """Load a folder into memory as a :class:`ZeroShotSet` named after the folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    classnames, index = folder_classes(root)
    try:
        files = make_dataset(str(root), index, extensions=IMG_EXTENSIONS, allow_empty=True)
    except FileNotFoundError as err:
        raise DataError(f"image folder {root}: {err}") from None
    images, labels, per_class, skipped = [], [], Counter(), Counter()
    for path, label in files:
        if max_per_class and per_class[label] >= max_per_class:
            continue
        try:
            image, _ = decode_image(path, max_image_pixels)
        except BadSample as bad:
            skipped[bad.kind] += 1
            continue
        images.append(transform(image))
        labels.append(label)
        per_class[label] += 1
    if skipped:
        log.warning("image folder %s: skipped %s", root, ", ".join(f"{n} {k}" for k, n in skipped.items()))
    if not images:
        raise DataError(f"image folder {root} holds no readable images")
    prompts = class_prompts(tokenizer, classnames, folder_templates(root, templates), context_length)
    return ZeroShotSet(root.name, normalize(torch.stack(images)), torch.tensor(labels), classnames, prompts)
