"""The config's schema: typed keys that Hydra checks while composing, and the ranges checked right after.

Two layers, both run by :func:`clipkit.config.compose_config`, so every command gets them before anything is built:

1. **Types, at composition.** Dataclasses below are registered in Hydra's ConfigStore and named first in the
   defaults list of ``fit.yaml`` (``_fit_schema``) and of the groups whose keys are stable: ``data/_common``
   (``data/_schema``), ``data/_shuffle`` (``data/_schema_shuffle``), ``module/default``, ``trainer/default``,
   ``callbacks/default`` (``GROUP/_schema``). A word where an integer goes (``data.batch_size=many``) then fails
   inside Hydra, and :func:`type_error` turns OmegaConf's message into ``data.batch_size=many: must be an integer``.

   Each dataclass is stored as an *open* node with typed leaves (:func:`open_node`), not as a strict structured
   config, because every one of these groups legitimately carries keys no schema can list: each datamodule its own
   (``data.supersample``, ``data.shards``), the trainer any ``lightning.Trainer`` argument (``+trainer.
   limit_val_batches=2``), the callbacks one node per callback. A strict dataclass would refuse those; an open node
   keeps Hydra's own rule (a new key needs ``+``, a mistyped one is "unknown config key") and still refuses a value
   of the wrong type for every key it lists. ``model/image``, ``model/text`` and ``objective`` have no schema: their
   ``_target_`` (timm, transformers, the objective classes) decides which keys exist, and a schema there would have
   to be one per choice. Their numbers are typed and ranged by the table in layer 2 instead.

2. **Ranges, after composition.** :data:`RULES` is one table, key pattern -> rule (``fnmatch`` patterns over dotted
   keys: ``*`` also crosses dots), applied by :func:`check_config` to the composed config; the first rule that
   matches a key decides. Values left ``???`` in the ``fit`` config fail with the key and how to set it. To add a
   rule: one line in :data:`RULES`, and the walking test (tests/test_config_schema.py) checks it against every preset.
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode, StringNode

from clipkit.errors import UsageError


# --- layer 1: types ---------------------------------------------------------------------------------------------

@dataclass
class FitSchema:
    seed: Optional[int] = MISSING
    experiment_name: str = MISSING
    resume: Optional[str] = MISSING
    init: Optional[str] = MISSING
    init_strict: bool = MISSING
    precision: str = MISSING
    accumulate: int = MISSING
    compile: bool = MISSING


@dataclass
class DataSchema:
    """``data/_common.yaml``: the keys every datamodule shares (datamodules/base.py)."""
    seed: Optional[int] = MISSING
    image_size: int = MISSING
    batch_size: int = MISSING
    num_workers: int = MISSING
    context_length: int = MISSING
    corpus_size: int = MISSING
    retrieval_size: int = MISSING
    eval_per_class: Optional[int] = MISSING
    max_image_pixels: int = MISSING
    probe: int = MISSING
    val_fraction: float = MISSING
    mean: List[float] = MISSING
    std: List[float] = MISSING


@dataclass
class ShuffleSchema:
    """``data/_shuffle.yaml``: epochs and shuffling of stored data."""
    shuffle: bool = MISSING
    shuffle_buffer: int = MISSING
    resampled: bool = MISSING
    samples_per_epoch: Optional[int] = MISSING


@dataclass
class OptimizerSchema:
    lr: float = MISSING


@dataclass
class ModuleSchema:
    optimizer: OptimizerSchema = field(default_factory=OptimizerSchema)
    weight_decay: float = MISSING
    warmup_steps: int = MISSING
    accumulate: int = MISSING
    compile: bool = MISSING
    max_nonfinite_steps: int = MISSING
    layer_decay: float = MISSING
    head_lr: Optional[float] = MISSING
    schedule: str = MISSING
    cooldown_steps: int = MISSING


@dataclass
class TrainerSchema:
    max_steps: int = MISSING
    max_epochs: Optional[int] = MISSING
    log_every_n_steps: int = MISSING
    gradient_clip_val: Optional[float] = MISSING
    gradient_clip_algorithm: Optional[str] = MISSING
    enable_progress_bar: bool = MISSING
    enable_model_summary: bool = MISSING


@dataclass
class ZeroShotSchema:
    every_n_steps: int = MISSING


@dataclass
class CheckpointSchema:
    every_n_train_steps: int = MISSING
    save_top_k: int = MISSING


@dataclass
class DataHealthSchema:
    max_skip_ratio: float = MISSING
    min_samples: int = MISSING
    log_every_n_steps: int = MISSING


@dataclass
class ThroughputSchema:
    log_every_n_steps: int = MISSING
    window: int = MISSING


@dataclass
class CallbacksSchema:
    zeroshot: ZeroShotSchema = field(default_factory=ZeroShotSchema)
    checkpoint: CheckpointSchema = field(default_factory=CheckpointSchema)
    best: CheckpointSchema = field(default_factory=CheckpointSchema)
    data_health: DataHealthSchema = field(default_factory=DataHealthSchema)
    throughput: ThroughputSchema = field(default_factory=ThroughputSchema)


def open_node(schema) -> DictConfig:
    """The dataclass as a plain (untyped, open) DictConfig whose leaves keep their typed nodes: values are
    validated on every merge and override, but keys the dataclass does not list may still be added."""
    typed = OmegaConf.structured(schema)
    out = OmegaConf.create({})
    for key in typed.keys():
        node = typed._get_node(key)
        out[key] = open_node(node) if isinstance(node, DictConfig) else node
    return out


def register() -> None:
    store = ConfigStore.instance()
    store.store(name="_fit_schema", node=open_node(FitSchema))
    store.store(group="data", name="_schema", node=open_node(DataSchema))
    store.store(group="data", name="_schema_shuffle", node=open_node(ShuffleSchema))
    store.store(group="module", name="_schema", node=open_node(ModuleSchema))
    store.store(group="trainer", name="_schema", node=open_node(TrainerSchema))
    store.store(group="callbacks", name="_schema", node=open_node(CallbacksSchema))


register()

TYPE_WORDS = {IntegerNode: "an integer", FloatNode: "a number", BooleanNode: "true or false", StringNode: "a string"}


def type_error(err: OmegaConfBaseException) -> str | None:
    """OmegaConf's "Value 'x' of type 'str' could not be converted to Integer / full_key: data.batch_size" as
    ``data.batch_size=x: must be an integer``; None when ``err`` is not a typed value refused."""
    key, node = getattr(err, "full_key", None), getattr(err, "child_node", None)
    expected = TYPE_WORDS.get(type(node))
    if expected is None:
        first = str(err).splitlines()[0]
        expected = next((w for n, w in TYPE_WORDS.items() if f"converted to {n.__name__[:-4]}" in first), None)
    if not key or expected is None:
        return None
    null = " or null" if node is not None and node._is_optional() else ""
    return f"{key}={getattr(err, 'value', '?')}: must be {expected}{null}"


# --- layer 2: ranges --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """``ok(value)`` says whether a resolved value is allowed; ``allowed`` says what is, after "must be". A rule
    with ``when`` applies only to configs where ``when(cfg)`` holds (else the next matching pattern decides)."""
    ok: Callable[[Any], bool]
    allowed: str
    when: Callable[[DictConfig], bool] | None = None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def at_least(low: int) -> Rule:
    return Rule(lambda v: _is_int(v) and v >= low, f"an integer >= {low}")


def above(low: float) -> Rule:
    return Rule(lambda v: _is_number(v) and v > low, f"a number > {low:g}")


def not_below(low: float) -> Rule:
    return Rule(lambda v: _is_number(v) and v >= low, f"a number >= {low:g}")


def within(low: float, high: float, closed: str = "[]") -> Rule:
    lo_ok = (lambda v: v >= low) if closed[0] == "[" else (lambda v: v > low)
    hi_ok = (lambda v: v <= high) if closed[1] == "]" else (lambda v: v < high)
    return Rule(lambda v: _is_number(v) and lo_ok(v) and hi_ok(v), f"a number in {closed[0]}{low:g}, {high:g}{closed[1]}")


def or_null(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule.ok(v), f"{rule.allowed} or null")


def each(rule: Rule) -> Rule:
    return Rule(lambda v: isinstance(v, (list, tuple)) and all(rule.ok(x) for x in v), f"a list of {rule.allowed}s")


def one_of(*choices, rule: Rule | None = None) -> Rule:
    words = " or ".join([*(rule.allowed for _ in [rule] if rule), *map(str, choices)])
    return Rule(lambda v: v in choices and not isinstance(v, bool) or (rule is not None and rule.ok(v)), words)


def existing_path() -> Rule:
    return Rule(lambda v: v is None or Path(str(v)).exists(), "an existing file or folder")


def existing_paths() -> Rule:
    return Rule(lambda v: isinstance(v, (list, tuple)) and all(Path(str(p)).exists() for p in v),
                "a list of existing folders")


def cooldown_beyond_the_run(cfg: DictConfig) -> bool:
    steps, run = OmegaConf.select(cfg, "module.cooldown_steps"), OmegaConf.select(cfg, "trainer.max_steps")
    return _is_int(steps) and _is_int(run) and 0 < run < steps  # a run of no steps is trainer.max_steps's error


def cooldown_under_cosine(cfg: DictConfig) -> bool:
    return OmegaConf.select(cfg, "module.schedule") == "cosine"


def uses_bpe(cfg: DictConfig) -> bool:
    return str(OmegaConf.select(cfg, "data.tokenizer._target_", default="")).endswith(".train_or_load_bpe")


def bpe_id(name: str, token_id: int) -> Rule:
    """clipkit's BPE puts its specials first (clipkit.tokenization.SPECIALS): a text model must use those ids."""
    return Rule(lambda v: v == token_id, f"{token_id}, the {name} id of clipkit's BPE (data/tokenizer=bpe)", uses_bpe)


def adapted(tower: str) -> Callable[[DictConfig], bool]:
    """Whether ``tower`` (``model.image``) has LoRA adapters (``lora.r > 0``)."""
    return lambda cfg: _is_int(r := OmegaConf.select(cfg, f"{tower}.lora.r", default=0)) and r > 0


def not_locked_with_lora(tower: str) -> Rule:
    """LoRA freezes a tower's weights itself (clipkit.models.lora): a locked tower would have nothing to adapt."""
    return Rule(lambda v: v is not True,
                f"false while {tower}.lora.r > 0 (LoRA freezes the tower's weights itself and trains only its "
                f"adapters): drop {tower}.locked=true, or set {tower}.lora.r=0 to keep the tower locked",
                adapted(tower))


SIZE = at_least(1)
COUNT = at_least(0)
SEED = or_null(at_least(0))
TOKEN_ID = at_least(0)

# key pattern -> rule; the first pattern that matches a key decides. Interpolated values (${...}) are checked
# where they come from.
RULES: list[tuple[str, Rule]] = [
    # run
    ("seed", SEED),
    ("accumulate", SIZE),
    ("module.accumulate", SIZE),
    ("precision", one_of("32-true", "32", "64-true", "64", "bf16-mixed", "16-mixed", "bf16-true", "16-true",
                         "bf16", "16", "transformer-engine", "transformer-engine-float16")),
    # data
    ("data.seed", SEED),
    ("data.batch_size", SIZE),
    ("data.image_size", SIZE),
    ("data.num_workers", COUNT),
    ("data.context_length", at_least(3)),       # start and end tokens, and one word
    ("data.corpus_size", SIZE),
    ("data.retrieval_size", SIZE),
    ("data.eval_per_class", or_null(SIZE)),
    ("data.max_image_pixels", SIZE),
    ("data.probe", SIZE),
    ("data.probe_per_class", SIZE),
    ("data.retrieval_captions", SIZE),
    ("data.supersample", SIZE),
    ("data.zeroshot_fraction", within(0, 1, "()")),
    ("data.val_fraction", within(0, 1, "[)")),     # of each eval folder, per class; 0: no validation from folders
    ("data.shuffle_buffer", COUNT),
    ("data.samples_per_epoch", or_null(SIZE)),
    ("data.rows_per_shard", SIZE),
    ("data.objects_p", each(within(0, 1))),
    ("data.mean", each(within(0, 1))),
    ("data.std", each(above(0))),
    ("data.path", existing_path()),
    ("init", existing_path()),
    ("model.*.init", existing_path()),
    ("data.retrieval_path", existing_path()),
    ("data.eval_folders", existing_paths()),
    ("data.tokenizer.vocab_size", SIZE),
    # towers and objectives: sizes >= 1, token ids >= 0
    ("*.pad_token_id", bpe_id("pad", 0)),
    ("*.bos_token_id", bpe_id("start", 1)),
    ("*.eos_token_id", bpe_id("end", 2)),
    ("*_token_id", TOKEN_ID),
    ("*.unlocked_layers", COUNT),
    ("model.image.locked", not_locked_with_lora("model.image")),
    ("model.text.locked", not_locked_with_lora("model.text")),
    ("*.lora.r", COUNT),                            # 0: no adapters
    ("*.lora.alpha", above(0)),
    ("*dropout*", within(0, 1)),
    ("*drop_rate", within(0, 1)),
    *((f"*.{name}", SIZE) for name in (
        "img_size", "patch_size", "depth", "embed_dim", "num_heads", "width", "vocab_size", "hidden_size",
        "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
        "n_embd", "n_head", "n_inner", "n_layer", "n_positions", "score_batch")),
    ("objective.init_temperature", above(0)),
    ("objective.max_logit_scale", above(0)),
    # optimisation
    ("module.optimizer.lr", above(0)),
    ("module.optimizer.eps", above(0)),
    ("module.optimizer.betas", each(within(0, 1, "[)"))),
    ("module.weight_decay", not_below(0)),
    ("module.warmup_steps", COUNT),
    ("module.max_nonfinite_steps", SIZE),
    ("module.layer_decay", within(0, 1, "(]")),   # 1: off
    ("module.head_lr", or_null(above(0))),
    ("module.schedule", one_of("cosine", "constant")),
    ("module.cooldown_steps", Rule(lambda v: False, "at most trainer.max_steps", cooldown_beyond_the_run)),
    ("module.cooldown_steps", Rule(lambda v: v == 0, "0 under module.schedule=cosine (cosine cools down by itself; "
                                   "set module.schedule=constant)", cooldown_under_cosine)),
    ("module.cooldown_steps", COUNT),
    # trainer
    ("trainer.max_steps", SIZE),                # -1 (Lightning's "no limit") would never end: the stream is endless
    ("trainer.max_epochs", or_null(one_of(-1, rule=SIZE))),  # -1: no limit (max_steps ends the run)
    ("trainer.log_every_n_steps", SIZE),
    ("trainer.devices", one_of("auto", rule=SIZE)),
    ("trainer.num_nodes", SIZE),
    ("trainer.gradient_clip_val", or_null(above(0))),
    ("trainer.gradient_clip_algorithm", or_null(one_of("norm", "value"))),
    ("trainer.accumulate_grad_batches", SIZE),
    # callbacks (0: off)
    ("callbacks.*.every_n_steps", COUNT),
    ("callbacks.*.every_n_train_steps", COUNT),
    ("callbacks.*.save_top_k", at_least(-1)),
    ("callbacks.*.max_skip_ratio", within(0, 1)),
    ("callbacks.*.min_samples", COUNT),
    ("callbacks.*.log_every_n_steps", SIZE),
    ("callbacks.*.window", SIZE),
    ("callbacks.zeroshot.batch_size", SIZE),
    ("callbacks.zeroshot.text_batch_size", or_null(SIZE)),  # null: every prompt of a set in one pass
    # the other commands' own keys
    ("batch_size", SIZE),
    ("text_batch_size", or_null(SIZE)),
    ("top_k", SIZE),
    ("linear_probe.val_fraction", within(0, 1, "()")),
    ("fewshot.ks", each(SIZE)),
]

HOW_TO_SET = {
    "data.shards": "data.shards='/data/cc3m/{00000..00331}.tar' (a brace pattern, a '::'-separated list, a list, "
                   "or a folder of *.tar)",
    "data.path": "data.path=/data/cc3m/train.tsv (the CSV/TSV file)",
}


@functools.lru_cache(maxsize=4096)
def _candidates(key: str) -> tuple[Rule, ...]:
    return tuple(rule for pattern, rule in RULES if fnmatch.fnmatchcase(key, pattern))


def rule_for(key: str, cfg: DictConfig) -> Rule | None:
    """The first rule of :data:`RULES` whose pattern matches ``key`` and which applies to ``cfg``."""
    return next((rule for rule in _candidates(key) if rule.when is None or rule.when(cfg)), None)


def leaves(cfg: DictConfig, prefix: str = ""):
    """(dotted key, parent node, key in parent) of every value in ``cfg`` that is not itself a mapping; lists are
    leaves (a rule may check their items)."""
    for key in cfg.keys():
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_none() and not OmegaConf.is_interpolation(cfg, key):
            yield from leaves(node, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", cfg, key


def check_config(cfg: DictConfig, config_name: str = "fit") -> None:
    """Every rule of :data:`RULES` against the composed config (and, for ``fit``, no ``???`` left): the first
    broken one raises :class:`UsageError` in one line, ``data.batch_size=-4: must be an integer >= 1``."""
    for key, parent, name in leaves(cfg):
        if key.startswith("hydra."):
            continue
        if OmegaConf.is_missing(parent, name):
            if config_name == "fit":
                how = HOW_TO_SET.get(key, f"{key}=...")
                raise UsageError(f"{key} is required and not set: give it on the command line, {how}")
            continue
        rule = rule_for(key, cfg)
        if rule is None or OmegaConf.is_interpolation(parent, name):
            continue
        value = parent[name]
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        if not rule.ok(value):
            shown = f"[{','.join(map(str, value))}]" if isinstance(value, list) else value
            raise UsageError(f"{key}={shown}: must be {rule.allowed}")
