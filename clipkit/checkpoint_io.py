"""Checkpoints written atomically: a crash or a full disk mid-write leaves the previous file intact."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, but local files are written beside their destination, flushed to disk
    and renamed over it (``os.replace`` is atomic on POSIX). Lightning's own writer stages the file in the system
    temporary directory and *moves* it, which is a copy, not a rename, whenever that directory is on another
    file system (the usual case on clusters): a crash mid-copy leaves a truncated checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):  # remote stores: Lightning's transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        get_filesystem(path).makedirs(str(path.parent), exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
