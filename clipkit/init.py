"""Start a new run from pretrained weights: ``fit init=PATH`` (a whole model) or ``model.image.init`` /
``model.text.init`` (one tower, read in the tower's constructor).

A source is anything clipkit reads as a model: a ``fit`` checkpoint or its ``model.safetensors``, a file written by
``clipkit import``, or a transformers ``CLIPModel`` folder. It brings its architecture and tokenizer: its stored
config supplies the keys in :data:`ARCHITECTURE` unless the command line sets them, and the data read text with its
tokenizer (``data.tokenizer`` becomes :func:`source_tokenizer`). Its weights then load strictly (:func:`load_init`):
a missing, unexpected or differently shaped tensor is a one-line :class:`InitError` naming it and the config key
to change, raised before the MLflow run exists. The run itself is new: optimiser state, step and images seen start
at zero; only the ``objective.*`` tensors (towers, projections, temperature) are taken.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from clipkit.errors import UsageError

log = logging.getLogger(__name__)

# what a source decides unless the command line sets it: the towers, the joint space, what the towers read
ARCHITECTURE = ("data.image_size", "data.context_length", "data.mean", "data.std", "objective.embed_dim",
                "objective.projection", "objective.image_projection")
# a tower's training switches: this run's, not the source's
TOWER_KNOBS = ("locked", "unlocked_layers", "grad_checkpointing", "init", "lora")
WEIGHTS = ("*.safetensors", "*.bin", "*.pt")
_ABSENT = object()


class InitError(UsageError):
    """The weights asked for cannot start this run: reported in one line before anything is recorded."""


@dataclass
class Source:
    """A model to start from: its ``ClipKitModule`` state dict, the config and tokenizer it came with."""

    path: Path
    state: dict[str, torch.Tensor]
    config: DictConfig
    tokenizer_json: str | None = None
    specials: str | None = None

    @cached_property
    def sha256(self) -> str:
        return sha256_of(self.path)


def sha256_of(path: str | Path) -> str:
    """A file's SHA-256; a folder's is that of its weight files' names and digests (config and tokenizer aside)."""
    path = Path(path)
    if path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    files = sorted({p for pattern in WEIGHTS for p in path.glob(pattern)})
    if len(files) == 1:
        return sha256_of(files[0])
    return hashlib.sha256("".join(f"{p.name} {sha256_of(p)}\n" for p in files).encode()).hexdigest()


def read_source(path: str | Path) -> Source:
    """The model at ``path``: a clipkit checkpoint or ``.safetensors`` (fit's or import's), or a transformers
    ``CLIPModel`` folder. Anything else is an :class:`InitError` saying what would work."""
    from clipkit.weights import read_weights

    path = Path(path)
    if path.is_dir():
        from clipkit.interop.hf_clip import read_hf_folder

        try:
            state, cfg, tokenizer = read_hf_folder(path)
        except (ValueError, OSError) as err:
            raise InitError(f"init={path}: {err}") from None
        from clipkit.tokenization import special_tokens, tokenizer_json

        stored = OmegaConf.create(OmegaConf.to_yaml(cfg, resolve=True))  # as a clipkit file stores it
        return Source(path, state, stored, tokenizer_json(tokenizer), json.dumps(special_tokens(tokenizer)))
    if not path.is_file():
        raise InitError(f"init={path}: no such file or folder (a clipkit checkpoint or .safetensors, a file written "
                        f"by clipkit import, or a transformers CLIPModel folder)")
    try:
        ckpt = read_weights(path)
    except Exception as err:  # noqa: BLE001 (any unreadable file is the user's to fix, in one line)
        raise InitError(f"init={path}: cannot read it as weights ({str(err).splitlines()[0]})") from None
    info = ckpt.get("clipkit") or {}
    if "config" not in info:
        raise InitError(f"init={path} carries no clipkit config: import an OpenAI/open_clip checkpoint first "
                        f"(python -m clipkit import ckpt={path}), or give a clipkit checkpoint or .safetensors")
    return Source(path, ckpt["state_dict"], OmegaConf.create(info["config"]), info.get("tokenizer"),
                  info.get("tokenizer_specials"))


def source_tokenizer(path: str, captions=(), context_length: int = 77):
    """``data.tokenizer`` factory of a run started with ``init=path``: the source's own tokenizer (stored in a
    clipkit file, or the ``CLIPModel`` folder's), whatever captions the new data has."""
    from clipkit.tokenization import StoredTokenizer, pretrained_tokenizer

    if Path(path).is_dir():
        return pretrained_tokenizer(path, context_length=context_length)
    from safetensors import safe_open

    if Path(path).suffix == ".safetensors":  # the metadata alone: no tensor is read
        with safe_open(str(path), framework="pt") as f:
            info = {k.removeprefix("clipkit."): v for k, v in (f.metadata() or {}).items()}
    else:
        from clipkit.weights import read_weights

        info = read_weights(path, mmap=True).get("clipkit") or {}
    if "tokenizer" not in info:
        raise InitError(f"init={path} stores no tokenizer: choose one with data/tokenizer=...")
    return StoredTokenizer(info["tokenizer"], info.get("tokenizer_specials"))(context_length=context_length)


def override_keys(overrides: list[str]) -> list[str]:
    """The config keys a command line sets: ``a.b=1`` and ``+a.b=1`` -> ``a.b``; a group, ``model/image=x`` ->
    ``model.image``; ``~a.b`` -> ``a.b``."""
    return [o.split("=", 1)[0].lstrip("+~").replace("/", ".") for o in overrides]


def _set_by(key: str, keys: list[str]) -> list[str]:
    """The keys in ``keys`` that set ``key`` or a part of it (``model.image.depth`` sets part of ``model.image``)."""
    return [k for k in keys if k == key or k.startswith(key + ".") or key.startswith(k + ".")]


def apply_source(cfg: DictConfig, source: Source, overrides: list[str]) -> list[str]:
    """Put the source's architecture into ``cfg`` (its towers, :data:`ARCHITECTURE`) and its tokenizer into
    ``cfg.data.tokenizer``, except where ``overrides`` (the command line) set a key: those stay. Returns the keys
    taken from the source."""
    keys, taken, stored = override_keys(overrides), [], source.config
    with open_dict(cfg):
        for name, tower in (stored.get("model") or {}).items():
            key = f"model.{name}"
            if name not in cfg.get("model", {}) or any(k in ("model", key) for k in keys):
                continue  # no such tower here, or the user chose this one
            new = copy.deepcopy(tower)
            for knob in TOWER_KNOBS:
                if knob in cfg.model[name]:
                    new[knob] = cfg.model[name][knob]
                elif knob in new:
                    del new[knob]
            for k in keys:  # the command line's keys inside the tower win
                if k.startswith(key + "."):
                    sub, value = k[len(key) + 1:], OmegaConf.select(cfg, k, default=_ABSENT)
                    if value is _ABSENT:  # ~key: removed
                        parent, _, leaf = sub.rpartition(".")
                        node = OmegaConf.select(new, parent) if parent else new
                        if isinstance(node, DictConfig) and leaf in node:
                            del node[leaf]
                    else:
                        OmegaConf.update(new, sub, value, merge=False, force_add=True)
            cfg.model[name] = new
            taken.append(key)
        for key in ARCHITECTURE:
            value = OmegaConf.select(stored, key, default=None)
            if value is None or _set_by(key, keys) or OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
                continue
            OmegaConf.update(cfg, key, value, merge=False)
            taken.append(key)
        if source.tokenizer_json is not None and not _set_by("data.tokenizer", keys):
            cfg.data.tokenizer = {"_target_": "clipkit.init.source_tokenizer", "_partial_": True,
                                  "path": str(Path(source.path).resolve())}
            taken.append("data.tokenizer")
    return taken


def changed_keys(cfg: DictConfig, source: Source, keys: list[str]) -> list[str]:
    """The keys of ``keys`` (set on the command line) whose value here differs from the source's."""
    return [k for k in keys if OmegaConf.select(cfg, k, default=_ABSENT) !=
            OmegaConf.select(source.config, k, default=_ABSENT)]


def _config_key(tensor: str) -> str:
    """The config key that decides a ``ClipKitModule`` tensor's shape."""
    for prefix, key in (("objective.image_tower.", "model.image"), ("objective.text_tower.", "model.text"),
                        ("objective.image_proj", "objective.embed_dim"),
                        ("objective.text_proj", "objective.embed_dim")):
        if tensor.startswith(prefix):
            return key
    return "objective"


def _names(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


@dataclass
class Match:
    """How a source state dict meets a model's: ``pairs`` model key -> source key, and what does not fit."""

    pairs: dict[str, str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple, tuple]]  # (model key, source shape, model shape)

    @property
    def fits(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def match_state(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor], fresh: tuple[str, ...] = ()) -> Match:
    """Match a model's state dict to a source's by name. A LoRA-wrapped layer (peft) keeps the original weight under
    ``<layer>.base_layer.<p>``: that is the source's ``<layer>.<p>``; its adapters (``lora_*``) are new and not
    expected in the source, nor are keys starting with one of ``fresh`` (parts the run adds, such as a new head)."""
    def plain(key: str) -> str:
        return key.replace(".base_layer.", ".")

    by_plain = {plain(k): k for k in source}
    pairs, missing, mismatched = {}, [], []
    for key, value in target.items():
        if "lora_" in key or (key.startswith(fresh) and plain(key) not in by_plain):
            continue
        found = by_plain.get(plain(key))
        if found is None:
            missing.append(key)
        elif tuple(source[found].shape) != tuple(value.shape):
            mismatched.append((key, tuple(source[found].shape), tuple(value.shape)))
        else:
            pairs[key] = found
    used = set(pairs.values()) | {by_plain.get(plain(k)) for k, _, _ in mismatched}
    unexpected = sorted(k for k in source if k not in used)
    return Match(pairs, sorted(missing), unexpected, mismatched)


def describe(match: Match, what: str, set_keys: list[str] = ()) -> str:
    """One line naming what does not fit and the config key to change."""
    parts = []
    if match.mismatched:
        key, theirs, ours = match.mismatched[0]
        config = _config_key(key)
        told = list(dict.fromkeys(_set_by(config, list(set_keys))))
        hint = f"you set {', '.join(told)}: drop it" if told else f"set {config}.* as the source has it"
        more = f" (+{len(match.mismatched) - 1} more)" if len(match.mismatched) > 1 else ""
        parts.append(f"{key} is {list(theirs)} there but {list(ours)} here{more}: {hint}")
    if match.missing:
        parts.append(f"missing {_names(match.missing)} (check {_config_key(match.missing[0])})")
    if match.unexpected:
        lora = any("lora_" in k for k in match.unexpected)
        parts.append(f"unexpected {_names(match.unexpected)}"
                     + (" (LoRA adapters: start from its export, which merges them)" if lora else
                        f" (check {_config_key(match.unexpected[0])})"))
    return f"{what} does not fit this model: " + "; ".join(parts)


def load_init(module: torch.nn.Module, source: Source, strict: bool = True, set_keys: list[str] = ()) -> list[str]:
    """Copy the source's ``objective.*`` tensors into ``module`` (counters and optimiser state stay new). Strict: a
    one-line :class:`InitError` unless every tensor fits; otherwise what fits is loaded and the rest listed (the
    return value, also logged)."""
    target = {k: v for k, v in module.state_dict().items() if k.startswith("objective.")}
    theirs = {k: v for k, v in source.state.items() if k.startswith("objective.")}
    # an objective may name parts it adds to a pretrained model (a classifier head): new unless the source has them
    fresh = tuple(f"objective.{p}." for p in module.objective.new_heads())
    match = match_state(target, theirs, fresh)
    if strict and not match.fits:
        raise InitError(describe(match, f"init={source.path}", set_keys) + ", or init_strict=false to load what fits")
    module.load_state_dict({k: theirs[s] for k, s in match.pairs.items()}, strict=False)
    skipped = match.missing + match.unexpected + [k for k, _, _ in match.mismatched]
    if skipped:
        log.warning("init=%s: loaded %d tensors, skipped %d: %s", source.path, len(match.pairs), len(skipped),
                    describe(match, "the rest").split(": ", 1)[1])
    return skipped


def load_tower(model: torch.nn.Module, path: str | Path, prefix: str, what: str) -> None:
    """A tower's own weights, strictly: ``state`` from a transformers folder or a clipkit file (its tensors under
    ``prefix``)."""
    from clipkit.weights import read_weights

    path = Path(path)
    if path.is_dir():
        from transformers import AutoModel

        state = AutoModel.from_pretrained(str(path), local_files_only=True).state_dict()
    elif path.is_file():
        state = {k[len(prefix):]: v for k, v in read_weights(path)["state_dict"].items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"{what}={path} holds no {prefix}* tensors (no such tower in it)")
    else:
        raise FileNotFoundError(f"{what}={path}: no such file or folder")
    match = match_state(model.state_dict(), state)
    ignored = [k for k in match.missing if k.endswith("position_ids")]  # a buffer transformers may not save
    match.missing = [k for k in match.missing if k not in ignored]
    if not match.fits:
        raise ValueError(describe(match, f"{what}={path}").replace(" (check objective)", ""))
    model.load_state_dict({k: state[s] for k, s in match.pairs.items()}, strict=False)


def prepare(cfg: DictConfig, overrides: list[str]) -> Source | None:
    """``cfg.init``'s source with its architecture and tokenizer put into ``cfg``; None without ``init``."""
    if not cfg.get("init"):
        return None
    source = read_source(cfg.init)
    taken = apply_source(cfg, source, overrides)
    log.info("init=%s: architecture and tokenizer from it (%s); the command line's keys kept", source.path,
             ", ".join(taken) or "nothing")
    return source


def init_tags(cfg: DictConfig, source: Source | None) -> dict[str, str]:
    """What the MLflow run records of its starting point: path and SHA-256 of ``init`` and of each tower's own."""
    tags = {}
    if source is not None:
        tags.update({"init.path": str(Path(source.path).resolve()), "init.sha256": source.sha256})
    for name, tower in (cfg.get("model") or {}).items():
        path = tower.get("init") if isinstance(tower, DictConfig) else None
        if path:
            tags.update({f"init.{name}.path": str(Path(path).resolve()), f"init.{name}.sha256": sha256_of(path)})
    return tags
