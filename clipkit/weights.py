"""Weight files that are safe to open. Checkpoints load with ``weights_only=True`` (no unpickling of code);
the final weights are also exported as safetensors that carry the config and tokenizer to rebuild them."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from clipkit.checkpoint_io import write_atomically

# ClipKitModule.run_info, stored as metadata
INFO_KEYS = ("config", "tokenizer", "tokenizer_specials", "run_id", "tracking_uri")


def export_weights(state_dict: dict[str, torch.Tensor], info: dict, path: str | Path) -> Path:
    """A state dict as safetensors at ``path`` with ``info`` (``ClipKitModule.run_info``) as metadata, written
    atomically. Tied weights are stored under each name: safetensors refuses shared storage."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    metadata = {f"clipkit.{k}": str(info[k]) for k in INFO_KEYS if info.get(k) is not None}
    return write_atomically(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def read_weights(path: str | Path, mmap: bool = False) -> dict:
    """``{"state_dict": ..., "clipkit": run info}`` from a Lightning checkpoint or an exported ``.safetensors``.
    A checkpoint that needs to unpickle Python objects is refused: loading it could run arbitrary code.
    ``mmap`` maps a checkpoint's tensors instead of reading them (cheap to look into a large one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        info = {k.removeprefix("clipkit."): v for k, v in metadata.items() if k.startswith("clipkit.")}
        return {"state_dict": state, "clipkit": info}
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        what = str(err).split("Unsupported global: ")[-1].split(" was not")[0].split("\n")[0].removeprefix("GLOBAL ")
        raise ValueError(f"refusing to load {path}: it holds pickled Python objects ({what}), which could run code "
                         f"when loaded; clipkit checkpoints hold only tensors and plain data") from None
