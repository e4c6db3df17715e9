"""LoRA adapters (Hu et al. 2022) on either tower, through ``peft``: ``model.image.lora.r=8``, ``model.text.lora.r=8``.

A tower with ``lora.r > 0`` gets peft's LoRA layers injected at construction (``inject_adapter_in_model``), so a
checkpoint, ``build()`` and ``init=`` all see the same parameter names, peft's own:

    model.blocks.0.attn.qkv.base_layer.weight     the pretrained weight, frozen
    model.blocks.0.attn.qkv.lora_A.default.weight the adapter, trained ([r, in])
    model.blocks.0.attn.qkv.lora_B.default.weight the adapter, trained ([out, r], starts at zero)

Every base weight of an adapted tower is frozen (peft's rule), so the optimiser holds state only for the adapters
and for what lies outside the towers (projections, temperature, heads). :func:`merge_adapters` folds the adapters
into their base layers (peft's ``merge``) and puts the plain layers back: what ``clipkit.load``, ``export`` and the
run's final ``model.safetensors`` hold, so none of them needs peft.

``peft`` is imported only when a tower is adapted (it takes seconds to import).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

# family -> the layers LoRA adapts by default (peft's target_modules: a list matches name suffixes, a string is a
# regular expression over the whole module name)
TARGETS: dict[str, str | list[str]] = {
    # attention qkv/proj and MLP fc1/fc2 of the transformer blocks only: a hybrid's CNN stem and the patch
    # embedding (also named ``proj``) stay as they are
    "timm ViT": r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))",
    "CLIP text transformer": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    # MiniLM: query/key/value and the dense layers of the encoder (the attention and MLP outputs), not a pooler's
    "BERT-like text transformer":
        r"(.*\.)?encoder\.layer\.\d+\.(attention\.(self\.(query|key|value)|output\.dense)|intermediate\.dense|output\.dense)",
}
BERT_LIKE = ("bert", "roberta", "xlm-roberta", "electra", "camembert")


def base_key(name: str) -> str:
    """The name a parameter has in the tower without adapters: peft keeps the adapted layer's own weights under
    ``base_layer`` (``...qkv.base_layer.weight`` -> ``...qkv.weight``). ``init=`` maps source keys this way."""
    return name.replace(".base_layer.", ".")


def is_adapter_key(name: str) -> bool:
    """Whether ``name`` is an adapter's parameter (``lora_A``, ``lora_B``, ``lora_embedding_A`` ...): new in a run
    started from pretrained weights, which carry none."""
    return any(part.startswith("lora_") for part in name.split("."))


def family(model: nn.Module) -> str | None:
    """The tower family of ``model`` (a key of :data:`TARGETS`), or None for one LoRA has no default for."""
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return "timm ViT"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ("clip_text_model", "clip"):
        return "CLIP text transformer"
    if model_type in BERT_LIKE:
        return "BERT-like text transformer"
    return None


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def add_lora(model: nn.Module, lora: Mapping | None, key: str, locked: bool = False) -> bool:
    """Inject LoRA adapters into ``model`` in place if ``lora["r"] > 0`` (``lora``: the tower's ``lora`` config,
    ``key``: its config path, ``model.image``, for messages). Returns whether it did. One-line ``ValueError`` for a
    locked tower, a family without default targets, or targets that name no layer."""
    lora = dict(_plain(lora) or {})
    r = lora.get("r") or 0
    if r <= 0:
        return False
    if locked:
        raise ValueError(f"{key}.lora.r={r} on a locked tower ({key}.locked=true): LoRA freezes the tower's weights "
                         f"itself and trains only its adapters; drop {key}.locked=true, or set {key}.lora.r=0 to keep "
                         f"the tower locked without adapters")
    targets = lora.get("target_modules")
    kind = family(model)
    if not targets:
        if kind is None:
            raise ValueError(f"{key}.lora: no default LoRA layers for a {type(model).__name__} tower (clipkit knows "
                             f"{', '.join(TARGETS)}); name the layers to adapt with {key}.lora.target_modules=[...]")
        targets = TARGETS[kind]
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ValueError(f"{key}.lora.r={r} needs the peft package: pip install peft==0.21.2 (make install adds it)"
                         ) from None
    config = LoraConfig(r=int(r), lora_alpha=float(lora.get("alpha", 16)), lora_dropout=float(lora.get("dropout", 0.0)),
                        target_modules=targets)
    try:
        inject_adapter_in_model(config, model)
    except ValueError as err:
        raise ValueError(f"{key}.lora.target_modules={targets}: {str(err).splitlines()[0]}") from None
    return True


def merge_adapters(module: nn.Module) -> int:
    """Fold every LoRA adapter in ``module`` into its base layer (peft's ``merge``: W + scale * B A) and put the plain
    base layer back in its place, so the module has the names and classes of one built with ``lora.r=0``. Returns
    how many layers were merged. In place; weights stay frozen as they were."""
    if "peft" not in sys.modules:  # nothing can be adapted if peft was never imported
        return 0
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(name, m) for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in layers:
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent), child, layer.get_base_layer())
    for m in module.modules():  # inject_adapter_in_model leaves its config on the adapted model
        if "peft_config" in vars(m):
            del m.peft_config
    return len(layers)


def without_lora(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` with every tower's ``lora.r`` set to 0: the config of a model whose adapters are merged."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))

    def walk(node) -> None:
        if isinstance(node, DictConfig):
            for k in node.keys():
                child = node._get_node(k)
                if k == "lora" and isinstance(child, DictConfig) and "r" in child:
                    child.r = 0
                elif isinstance(child, (DictConfig, ListConfig)):
                    walk(child)
        elif isinstance(node, ListConfig):
            for child in node:
                walk(child)

    walk(cfg)
    return cfg


def merged_weights(state_dict: dict, info: dict) -> tuple[dict, dict]:
    """(merged state dict, run info whose config has ``lora.r=0``) of a run's state dict with adapters: the module is
    rebuilt from ``info["config"]`` (``ClipKitModule.run_info``), loaded, and merged by :func:`merge_adapters`."""
    from hydra.utils import instantiate

    cfg = OmegaConf.create(info["config"])
    module = instantiate(cfg.module)
    dtype = next((v.dtype for v in state_dict.values() if v.is_floating_point()), None)
    if dtype is not None:
        module.to(dtype)  # merge and export in the run's own precision (64-true stays float64, bf16-true bf16)
    module.load_state_dict(state_dict)
    merge_adapters(module)
    return module.state_dict(), {**info, "config": OmegaConf.to_yaml(without_lora(cfg))}


def has_adapters(state_dict: Mapping[str, object]) -> bool:
    """Whether a state dict holds LoRA adapters (a run with ``lora.r > 0`` before merging)."""
    return any(is_adapter_key(k) for k in state_dict)
