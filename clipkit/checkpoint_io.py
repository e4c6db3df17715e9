"""Checkpoints written atomically: a crash or a full disk mid-write leaves the previous file intact."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` a file beside ``path``, flush it to disk and rename it over ``path`` (atomic on POSIX):
    readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, but local files go through :func:`write_atomically`. Lightning's own
    writer stages the file in the system temporary directory and *moves* it, which is a copy, not a rename,
    whenever that directory is on another file system (the usual case on clusters): a crash mid-copy leaves a
    truncated checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):  # remote stores: Lightning's transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_atomically(path, lambda tmp: torch.save(checkpoint, tmp))
