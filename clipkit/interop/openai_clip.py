"""OpenAI's CLIP checkpoint layout (``visual.*``, ``transformer.*``, ``text_projection``, ``logit_scale``), which
open_clip's built-in models keep: import into clipkit towers, and export a clipkit model as an open_clip folder.

The architecture of an imported checkpoint is read off its tensor shapes, as OpenAI's own ``build_model`` does.
Two things cannot be: the activation (OpenAI's models use QuickGELU, open_clip's own trainings, names without
``-quickgelu``, GELU), hence ``act``; and the attention heads (64 wide in OpenAI's models and most of open_clip's;
80 in ViT-H-14, 88 in ViT-g-14, 104 in ViT-bigG-14), hence ``image_head_width`` and ``text_head_width``.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from clipkit.interop.keymap import convert_for
from clipkit.interop.layouts import OPENAI_RESNET, OPENAI_TEXT, OPENAI_VIT
from clipkit.interop.towers import (
    NotExportable,
    check_reproduces,
    describe_resnet,
    describe_text,
    describe_vit,
    write_folder,
)
from clipkit.weights import read_weights

ACTIVATIONS = ("quick_gelu", "gelu")
# entries of released state dicts that are not weights: OpenAI's sizes (its build_model deletes them too) and the
# causal mask that TorchScript files keep as a buffer (the text tower builds its own)
NOT_WEIGHTS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


def _is_torchscript(path: Path) -> bool:
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of an OpenAI or open_clip checkpoint: a state dict (``.pt``, ``.bin``, ``.safetensors``), an
    open_clip training checkpoint (``{"state_dict": ...}``, DDP's ``module.`` prefix removed), or OpenAI's
    TorchScript release files. Pickled Python objects are refused (see :func:`clipkit.weights.read_weights`)."""
    path = Path(path)
    if _is_torchscript(path):
        state = torch.jit.load(str(path), map_location="cpu").state_dict()  # TorchScript: no unpickling of code
    else:
        state = read_weights(path)
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items() if k.rsplit(".", 1)[-1] not in NOT_WEIGHTS}
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return state


def _count(state: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def _heads(width: int, head_width: int, what: str) -> int:
    if head_width <= 0 or width % head_width:
        raise ValueError(f"{what}_head_width={head_width} does not divide the {what} tower's width {width}")
    return width // head_width


def image_config(state: dict, act: str, head_width: int = 64) -> tuple[dict, int, str]:
    """(clipkit image-tower config, image size, the objective's image projection kind) of OpenAI's visual tower."""
    if "visual.class_embedding" in state:
        width, _, patch, _ = state["visual.conv1.weight"].shape
        size = patch * round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        tower = {"name": "vit_base_patch32_clip_224",  # timm's CLIP ViT: pre-norm, LayerNorm eps 1e-5, no patch bias
                 "img_size": size, "patch_size": patch, "embed_dim": width,
                 "depth": _count(state, "visual.transformer.resblocks."), "num_heads": _heads(width, head_width, "image"),
                 "mlp_ratio": state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
                 "act_layer": act}
        return {"_target_": "clipkit.models.ImageTower", **tower}, size, "linear"
    if "visual.layer1.0.conv1.weight" in state:
        width = state["visual.layer1.0.conv1.weight"].shape[0]  # OpenAI's `width`: 64 for RN50
        size = 32 * round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        blocks = [{"_target_": "timm.models.byobnet.ByoBlockCfg", "type": "bottle", "br": 0.25,
                   "d": _count(state, f"visual.layer{s}."), "c": width * 4 * 2 ** (s - 1), "s": 1 if s == 1 else 2}
                  for s in range(1, 5)]
        tower = {"_convert_": "all", "name": "resnet50_clip", "img_size": size,
                 "stem_chs": [width // 2, width // 2, width], "blocks": blocks}
        return {"_target_": "clipkit.models.ImageTower", **tower}, size, "affine"
    raise ValueError("not an OpenAI/open_clip CLIP checkpoint: no visual.class_embedding (ViT) or "
                     "visual.layer1.* (ResNet) weights")


def text_config(state: dict, act: str, tokenizer, head_width: int = 64) -> dict:
    """clipkit text-tower config (a transformers ``CLIPTextConfig``, end-of-text pooling) of OpenAI's text tower."""
    if "token_embedding.weight" not in state:
        raise ValueError("not an OpenAI/open_clip CLIP checkpoint: no token_embedding.weight (its text tower)")
    width = state["ln_final.weight"].shape[0]
    config = {"_target_": "transformers.CLIPTextConfig", "vocab_size": state["token_embedding.weight"].shape[0],
              "hidden_size": width, "intermediate_size": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
              "num_hidden_layers": _count(state, "transformer.resblocks."),
              "num_attention_heads": _heads(width, head_width, "text"),
              "max_position_embeddings": state["positional_embedding"].shape[0], "hidden_act": act,
              "layer_norm_eps": 1e-5, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id}
    return {"_target_": "clipkit.models.TextTower", "pooling": "eos", "config": config}


def clipkit_config(state: dict, act: str, tokenizer, source: str, output_dir: str, head_widths: tuple[int, int]):
    """The full run config of an imported checkpoint (the default fit config with these towers and sizes), so it
    is a clipkit model like any other: ``clipkit eval``, ``predict`` and ``export`` read it."""
    from clipkit.config import compose_config

    if act not in ACTIVATIONS:
        raise ValueError(f"act={act!r}: choose quick_gelu (OpenAI's models, open_clip's *-quickgelu) or gelu")
    image, size, image_projection = image_config(state, act, head_widths[0])
    text = text_config(state, act, tokenizer, head_widths[1])
    context = text["config"]["max_position_embeddings"]
    if len(tokenizer) != text["config"]["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(tokenizer)} ids, the checkpoint's text tower "
                         f"{text['config']['vocab_size']}: pass the tokenizer it was trained with (tokenizer=DIR)")
    cfg = compose_config([f"data.image_size={size}", f"data.context_length={context}", "experiment_name=imported",
                          f"paths.output_dir={output_dir}"])
    with open_dict(cfg):
        cfg.model.image, cfg.model.text = image, text
        cfg.objective.embed_dim = state["text_projection"].shape[1]
        cfg.objective.image_projection = image_projection
        cfg.imported_from = source
    return cfg


def import_state(state: dict, cfg) -> dict[str, torch.Tensor]:
    """OpenAI-layout ``state`` as the state dict of the ``ClipKitModule`` that ``cfg`` builds (checked against it)."""
    rules = (OPENAI_VIT if "visual.class_embedding" in state else OPENAI_RESNET) + OPENAI_TEXT
    return convert_for(state, rules, False, instantiate(cfg.module), "the checkpoint", "a clipkit CLIP model")


def open_clip_config(objective, data_cfg, tokenizer, folder: Path) -> dict:
    """``open_clip_config.json`` for a contrastive clipkit model whose towers open_clip's CLIP can hold."""
    image = objective.image_tower
    vit = hasattr(image.model, "blocks")
    vision = describe_vit(image) if vit else describe_resnet(image)
    text = describe_text(objective.text_tower)
    if vit and vision["act"] != text["act"]:
        raise NotExportable(f"open_clip uses one activation for both towers; this image tower uses {vision['act']}, "
                            f"the text tower {text['act']} (train with model.image.act_layer={text['act']} to export)")
    vision_cfg = ({"image_size": vision["image_size"], "layers": vision["layers"], "width": vision["width"],
                   "head_width": vision["width"] // vision["heads"], "patch_size": vision["patch_size"],
                   "mlp_ratio": vision["mlp_ratio"], "norm_kwargs": {"eps": vision["eps"]}} if vit else
                  {"image_size": vision["image_size"], "layers": vision["layers"], "width": vision["width"]})
    text_cfg = {"context_length": text["context_length"], "vocab_size": text["vocab_size"], "width": text["width"],
                "heads": text["heads"], "layers": text["layers"], "mlp_ratio": text["mlp_ratio"],
                "norm_kwargs": {"eps": text["eps"]}, "pool_type": "eos", "eos_id": tokenizer.eos_token_id,
                "pad_id": tokenizer.pad_token_id, "hf_tokenizer_name": str(folder.resolve())}
    preprocess = {"size": data_cfg.image_size, "mean": list(data_cfg.mean), "std": list(data_cfg.std),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    return {"model_cfg": {"embed_dim": objective.image_proj.out_features, "quick_gelu": text["act"] == "quick_gelu",
                          "vision_cfg": vision_cfg, "text_cfg": text_cfg}, "preprocess_cfg": preprocess}


def export_open_clip(module, stored, tokenizer, out: str | Path) -> tuple[Path, float]:
    """An open_clip folder (``open_clip_config.json``, ``open_clip_model.safetensors``, the tokenizer) that
    ``open_clip.create_model_and_transforms("local-dir:" + out)`` loads; reloaded and checked to reproduce
    ``module`` before it is put in place."""
    try:
        import open_clip
    except ImportError:
        raise ValueError("format=open_clip needs open_clip_torch installed (pip install open_clip_torch)") from None
    from safetensors.torch import save_file

    config = open_clip_config(module.objective, stored.data, tokenizer, Path(out))
    target = open_clip.model.CLIP(**config["model_cfg"])
    reference = target.state_dict()
    vit = "visual.class_embedding" in reference
    state = {k: v for k, v in module.state_dict().items() if k.startswith("objective.")}
    if not vit and "objective.image_proj.bias" not in state:  # a linear image projection: the pool's bias is zero
        state["objective.image_proj.bias"] = torch.zeros_like(reference["visual.attnpool.c_proj.bias"])
    rules = (OPENAI_VIT if vit else OPENAI_RESNET) + OPENAI_TEXT
    target.load_state_dict(convert_for(state, rules, True, target, "this model", "open_clip's CLIP"))

    def write(tmp: Path) -> float:
        save_file({k: v.contiguous() for k, v in target.state_dict().items()}, str(tmp / "open_clip_model.safetensors"))
        (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(str(tmp))
        loaded = open_clip.create_model_and_transforms(f"local-dir:{tmp}")[0].eval()
        their_tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp}")
        return check_reproduces(module, stored.data.image_size, lambda x: loaded.encode_image(x, normalize=True),
                                lambda t: loaded.encode_text(their_tokenizer(t), normalize=True), tokenizer,
                                "open_clip")

    return write_folder(out, write)


def import_checkpoint(path: str | Path, out: str | Path, act: str = "quick_gelu", tokenizer_dir: str | None = None,
                      image_head_width: int = 64, text_head_width: int = 64) -> Path:
    """Convert an OpenAI/open_clip checkpoint into a self-describing clipkit ``.safetensors`` (config, tokenizer
    and weights: ``clipkit eval``, ``predict``, ``export`` and ``clipkit.load`` read it). The head widths are for
    ViTs: a ResNet's attention pool has 64-wide heads, in OpenAI's models and timm's ``resnet50_clip`` alike."""
    from clipkit.tokenization import openai_clip_tokenizer, pretrained_tokenizer, special_tokens, tokenizer_json
    from clipkit.weights import export_weights

    state = read_state_dict(path)
    context = state["positional_embedding"].shape[0] if "positional_embedding" in state else 77
    tokenizer = pretrained_tokenizer(tokenizer_dir, context_length=context) if tokenizer_dir else \
        openai_clip_tokenizer(context)
    cfg = clipkit_config(state, act, tokenizer, str(Path(path).resolve()), str(Path(out).resolve().parent),
                         (image_head_width, text_head_width))
    weights = import_state(state, cfg)
    info = {"config": OmegaConf.to_yaml(cfg, resolve=True), "tokenizer": tokenizer_json(tokenizer),
            "tokenizer_specials": json.dumps(special_tokens(tokenizer))}
    return export_weights(weights, info, out)
