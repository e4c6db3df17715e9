"""``resume=auto|PATH``: find the checkpoint to continue, check it belongs to this run, and the state Lightning
does not checkpoint itself (random generators; per-process state gathered from every rank).

Lightning restores the model, optimiser, scheduler, loops and callbacks from a checkpoint. What exactness also
needs is here and in :mod:`datamodules.stream` (the data position): the generators' states, and a config check so
that a run is only continued with the settings it was started with.
"""

from __future__ import annotations

import copy
import logging
import random
import re
from pathlib import Path

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from clipkit.errors import ResumeError
from clipkit.objectives.base import rng_state, set_rng_state
from clipkit.weights import read_weights

log = logging.getLogger(__name__)

# Keys that may differ between the checkpoint's config and the resumed one: where files go, resume itself, and the
# MLflow store (one the run was copied to; the run must be in it).
FREE_KEYS = ("resume", "paths.", "logger.tracking_uri")


def gather_objects(obj) -> list:
    """``obj`` from every process, in rank order (``[obj]`` without a process group). A collective: Lightning
    builds checkpoints on every rank, then writes rank 0's."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def rng_states() -> dict:
    """This process's generators (torch CPU and CUDA, Python, NumPy) as plain data that loads with
    ``weights_only=True``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": rng_state(), "python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss]}


def set_rng_states(states: dict) -> None:
    set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


def read_checkpoint(path: Path) -> dict | None:
    """The checkpoint at ``path`` (memory-mapped, so large ones cost little), or None if it is damaged. One that
    would unpickle code is refused outright (:func:`clipkit.weights.read_weights`), not skipped."""
    try:
        return read_weights(path, mmap=True)
    except ValueError as err:  # pickled code: a security refusal, not damage to fall back from
        raise ResumeError(str(err)) from None
    except Exception as err:  # a truncated zip raises RuntimeError, an empty file EOFError, a bad pickle others
        log.warning("checkpoint %s cannot be read (%s: %s): trying the one before it", path, type(err).__name__,
                    str(err).splitlines()[0] if str(err) else "")
        return None


def newest_readable(paths: list[Path]) -> tuple[Path, dict] | None:
    """The most recently written checkpoint of ``paths`` that loads, skipping damaged ones."""
    for path in sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True):
        ckpt = read_checkpoint(path)
        if ckpt is not None:
            return path, ckpt
    return None


def static_root(pattern: str) -> Path:
    """``outputs`` from Hydra's ``outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}``: where earlier runs' folders are."""
    parts = Path(pattern).parts
    fixed = parts[:next((i for i, p in enumerate(parts) if "${" in p), len(parts))]
    return Path(*fixed) if fixed else Path(".")


def earlier_runs(overrides: list[str], roots: list[Path], exclude: Path | None = None) -> list[Path]:
    """Hydra output folders under ``roots`` of runs launched with the same overrides (``resume=`` aside)."""
    def same(args: list[str]) -> list[str]:
        return sorted(a for a in args if not a.startswith("resume="))

    want, found = same(overrides), []
    for root in roots:
        for record in root.glob("**/.hydra/overrides.yaml") if root.is_dir() else []:
            folder = record.parent.parent
            if exclude is not None and folder.resolve() == exclude.resolve():
                continue
            if same(yaml.safe_load(record.read_text()) or []) == want:
                found.append(folder)
    return found


def locate(spec: str, checkpoint_dir: Path, overrides: list[str], roots: list[Path],
           output_dir: Path | None = None) -> tuple[Path, dict] | None:
    """The checkpoint ``resume=spec`` names, loaded.

    ``PATH``: that checkpoint file, or the newest readable one in that folder (a run's output folder or its
    ``checkpoints/``). ``auto``: the newest readable checkpoint in this config's checkpoint folder if it has one
    (a fixed ``paths.output_dir``), else in the output folders of earlier runs of the same command; None if there is
    none, and the run starts afresh.
    """
    if spec != "auto":
        path = Path(spec)
        if path.is_file():
            ckpt = read_checkpoint(path)
            if ckpt is None:
                raise ResumeError(f"checkpoint {path} is damaged: resume={path.parent} takes the newest readable one")
            return path, ckpt
        folders = [path / "checkpoints", path] if path.is_dir() else []
        found = newest_readable([p for f in folders if f.is_dir() for p in f.glob("*.ckpt")])
        if found is None:
            raise ResumeError(f"resume={spec}: no readable checkpoint " + (
                f"in {path} or {path / 'checkpoints'}" if path.is_dir() else "there (no such file or folder)"))
        return found
    own = list(checkpoint_dir.glob("*.ckpt")) if checkpoint_dir.is_dir() else []
    if own:
        return newest_readable(own)
    runs = earlier_runs(overrides, roots, exclude=output_dir)
    return newest_readable([p for run in runs for p in (run / "checkpoints").glob("*.ckpt")])


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


REFERENCE = re.compile(r"^\$\{([\w.]+)\}$")  # ``${model.image}``: the value of another key, as it is
# Resolvers that read this machine, not the config (``${minilm_dir:}``: a package's folder): where files are
MACHINE = re.compile(r"^\$\{(oc\.env|minilm_dir|clipkit_root|hydra):")


def _references(cfg: DictConfig, prefix: str = "") -> dict[str, str | None]:
    """``key -> source`` for every value that is another key's, as it is (``objective.image_tower: ${model.image}``,
    ``trainer.precision: ${precision}``): a difference there is the source's, and is reported once, at the source.
    ``key -> None`` for a value read from this machine (:data:`MACHINE`): where files are."""
    out = {}
    for key, _ in cfg.items_ex(resolve=False):
        name, node = f"{prefix}{key}", cfg._get_node(key)
        value = str(node._value()) if OmegaConf.is_interpolation(cfg, key) else ""
        if REFERENCE.match(value) or MACHINE.match(value):
            out[name] = REFERENCE.match(value).group(1) if REFERENCE.match(value) else None
        elif isinstance(node, DictConfig):
            out.update(_references(cfg[key], f"{name}."))
    return out


def _source(key: str, references: dict[str, str | None]) -> str | None:
    """Where ``key``'s value comes from, following references (``module.objective.image_tower.depth`` ->
    ``model.image.depth``); None: from this machine."""
    for _ in range(len(references) + 1):  # a cycle would not have resolved; this only bounds the walk
        ref = next((r for r in references if key == r or key.startswith(r + ".")), None)
        if ref is None or references[ref] is None:
            return key if ref is None else None
        key = references[ref] + key[len(ref):]
    return key


def config_differences(stored: DictConfig, cfg: DictConfig) -> list[str]:
    """``key: checkpoint -> now`` for every setting a resumed run would change (all but where files go).

    Resolved values are compared: a key that interpolates another in ``cfg`` (``trainer.precision: ${precision}``)
    may hold a literal in the checkpoint's (resolved) config, set by an override then. Where files go is free, and
    so is what is built from it (``cfg`` is resolved with the checkpoint's paths) or read from this machine
    (:data:`MACHINE`)."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for key in FREE_KEYS:
            key = key.rstrip(".")
            if OmegaConf.select(stored, key) is not None:
                OmegaConf.update(cfg, key, OmegaConf.select(stored, key), merge=False, force_add=True)
    old = _flat(OmegaConf.to_container(stored, resolve=True))
    new = _flat(OmegaConf.to_container(cfg, resolve=True))
    references = _references(cfg)
    out = []
    for key in sorted(old.keys() | new.keys()):
        change = (old.get(key, "<unset>"), new.get(key, "<unset>"))
        if key.startswith(FREE_KEYS) or change[0] == change[1]:
            continue
        source = _source(key, references)
        if source is None or source.startswith(FREE_KEYS):
            continue  # where files are on this machine
        if source != key and (old.get(source, "<unset>"), new.get(source, "<unset>")) == change:
            continue  # reported at its source
        out.append(f"{key}: {change[0]} -> {change[1]}")
    return out


def check_config(stored: DictConfig, cfg: DictConfig, path: Path) -> None:
    diff = config_differences(stored, cfg)
    if diff:
        more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
        raise ResumeError(f"{path} was trained with other settings ({'; '.join(diff[:3])}{more}): a resumed run "
                          f"continues exactly what was started, so resume with the same overrides, or start a new run")


def check_tokenizer(stored_json: str, tokenizer, path: Path) -> None:
    """The tokenizer rebuilt from the data must be the checkpoint's, or token ids would change meaning."""
    from clipkit.tokenization import tokenizer_json

    if tokenizer_json(tokenizer) == tokenizer_json(stored_json):  # also for checkpoints that stored call-time state
        return
    from tokenizers import Tokenizer

    stored = Tokenizer.from_str(stored_json).get_vocab_size()
    raise ResumeError(f"the tokenizer built from the training captions ({len(tokenizer)} tokens) is not the one "
                      f"{path} was trained with ({stored} tokens): the data changed since (or the tokenizer cache "
                      f"under paths.cache_dir did); resume with the data it was trained on, or start a new run")
