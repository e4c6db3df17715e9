"""A clipkit model as a Hugging Face ``CLIPModel`` folder and back: ``CLIPModel.from_pretrained(DIR)`` and
``pipeline("zero-shot-image-classification", model=DIR)`` load it, with its tokenizer and image processor."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from clipkit.interop.keymap import convert_for
from clipkit.interop.layouts import HF_TEXT, HF_VISION
from clipkit.interop.towers import check_reproduces, describe_text, describe_vit, write_folder

LEGACY_EOS = 2  # transformers' CLIP pools at argmax(input_ids), not at the end token, when eos_token_id is 2


def swap_token_ids(tokenizer_json: str, a: int, b: int) -> str:
    """A ``tokenizers`` JSON with token ids ``a`` and ``b`` exchanged everywhere they appear (vocabulary, added
    tokens, the post-processor's special tokens); merges name tokens by text and need no change."""
    data = json.loads(tokenizer_json)

    def swap(i: int) -> int:
        return b if i == a else a if i == b else i

    def walk(node):
        if isinstance(node, dict):
            if "id" in node and isinstance(node["id"], int) and "content" in node:
                node["id"] = swap(node["id"])
            if "ids" in node and isinstance(node["ids"], list):
                node["ids"] = [swap(i) for i in node["ids"]]
            for key in ("sep", "cls"):  # RoBERTa/BERT processors: [token, id]
                if isinstance(node.get(key), list) and len(node[key]) == 2 and isinstance(node[key][1], int):
                    node[key][1] = swap(node[key][1])
            for key, value in node.items():
                if key not in ("id", "ids", "sep", "cls"):
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    vocab = data["model"]["vocab"]
    data["model"]["vocab"] = {token: swap(i) for token, i in vocab.items()}
    walk({k: v for k, v in data.items() if k != "model"})
    return json.dumps(data)


def hf_tokenizer(tokenizer, context_length: int, move_eos_to: int | None):
    """The run's tokenizer as a ``PreTrainedTokenizerFast``, its end token moved to id ``move_eos_to`` if given."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    text = tokenizer.backend_tokenizer.to_str()
    if move_eos_to is not None:
        text = swap_token_ids(text, tokenizer.eos_token_id, move_eos_to)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text), model_max_length=context_length,
                                   padding_side="right", truncation_side="right", **tokenizer.special_tokens_map)


def export_hf(module, stored, tokenizer, out: str | Path) -> tuple[Path, float]:
    """A ``CLIPModel`` folder (config, safetensors weights, tokenizer, ``CLIPImageProcessor`` with the run's
    resize, crop and normalisation), reloaded and checked to reproduce ``module`` before it is put in place."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    objective = module.objective
    vision = describe_vit(objective.image_tower)
    describe_text(objective.text_tower)
    text_config = objective.text_tower.model.config.to_dict()
    state = {k: v for k, v in module.state_dict().items() if k.startswith("objective.")}
    move_to = None
    if tokenizer.eos_token_id == LEGACY_EOS:  # clipkit's BPE: swap the end token with the tokenizer's last id
        move_to = len(tokenizer) - 1
        key = "objective.text_tower.model.embeddings.token_embedding.weight"
        rows = state[key].clone()
        rows[[LEGACY_EOS, move_to]] = rows[[move_to, LEGACY_EOS]]
        state[key] = rows
    exported_tokenizer = hf_tokenizer(tokenizer, text_config["max_position_embeddings"], move_to)
    embed_dim = objective.image_proj.out_features
    text_config.update(projection_dim=embed_dim, pad_token_id=exported_tokenizer.pad_token_id,
                       bos_token_id=exported_tokenizer.bos_token_id, eos_token_id=exported_tokenizer.eos_token_id)
    vision_config = {"hidden_size": vision["width"], "intermediate_size": round(vision["width"] * vision["mlp_ratio"]),
                     "num_hidden_layers": vision["layers"], "num_attention_heads": vision["heads"],
                     "image_size": vision["image_size"], "patch_size": vision["patch_size"],
                     "hidden_act": vision["act"], "layer_norm_eps": vision["eps"], "projection_dim": embed_dim}
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=embed_dim,
                        logit_scale_init_value=objective.logit_scale.item())
    target = CLIPModel(config).eval()
    target.load_state_dict(convert_for(state, HF_VISION + HF_TEXT, True, target, "this model", "CLIPModel"))
    size, data = vision["image_size"], stored.data
    processor = CLIPImageProcessor(do_resize=True, size={"shortest_edge": size}, resample=3, do_center_crop=True,
                                   crop_size={"height": size, "width": size}, do_rescale=True, do_normalize=True,
                                   image_mean=list(data.mean), image_std=list(data.std), do_convert_rgb=True)

    def write(tmp: Path) -> float:
        target.save_pretrained(str(tmp))
        exported_tokenizer.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        loaded = CLIPModel.from_pretrained(str(tmp)).eval()
        their_tokenizer = AutoTokenizer.from_pretrained(str(tmp))

        def encode_text(texts):
            enc = their_tokenizer(texts, padding=True, return_tensors="pt")
            return _normalized(loaded.get_text_features(input_ids=enc["input_ids"],
                                                        attention_mask=enc["attention_mask"]))

        return check_reproduces(module, size, lambda x: _normalized(loaded.get_image_features(pixel_values=x)),
                         encode_text, tokenizer, "Hugging Face")

    return write_folder(out, write)


def _normalized(features) -> torch.Tensor:
    features = getattr(features, "pooler_output", features)  # transformers 5 may return a model output
    return torch.nn.functional.normalize(features, dim=-1)


# timm ViT in CLIP's form (pre-norm, class token, bias-free patches) by layer-norm epsilon: OpenAI's 1e-5, timm's 1e-6
TIMM_VIT_BY_EPS = {1e-5: "vit_base_patch32_clip_224", 1e-6: "vit_tiny_patch16_224"}
TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id")


def hf_clipkit_config(config, tokenizer, folder: Path, mean=None, std=None):
    """The clipkit run config of a ``CLIPModel``'s ``CLIPConfig`` (the inverse of :func:`export_hf`'s)."""
    from omegaconf import open_dict

    from clipkit.config import compose_config

    vision, text = config.vision_config, config.text_config
    name = TIMM_VIT_BY_EPS.get(vision.layer_norm_eps)
    if name is None or vision.hidden_act not in ("quick_gelu", "gelu"):
        raise ValueError(f"its vision tower (layer_norm_eps={vision.layer_norm_eps}, {vision.hidden_act}) has no timm "
                         f"equivalent in clipkit (eps 1e-5 or 1e-6, quick_gelu or gelu)")
    if len(tokenizer) > text.vocab_size:
        raise ValueError(f"its tokenizer has {len(tokenizer)} ids, more than its text tower's {text.vocab_size}")
    image = {"_target_": "clipkit.models.ImageTower", "name": name, "img_size": vision.image_size,
             "patch_size": vision.patch_size, "embed_dim": vision.hidden_size, "depth": vision.num_hidden_layers,
             "num_heads": vision.num_attention_heads, "mlp_ratio": vision.intermediate_size / vision.hidden_size,
             "pre_norm": True, "act_layer": vision.hidden_act}
    text_config = {"_target_": "transformers.CLIPTextConfig", **{k: getattr(text, k) for k in TEXT_KEYS}}
    cfg = compose_config([f"data.image_size={vision.image_size}", f"data.context_length={text.max_position_embeddings}",
                          "experiment_name=imported", f"paths.output_dir={folder.resolve().parent}"])
    with open_dict(cfg):
        cfg.model.image = image
        cfg.model.text = {"_target_": "clipkit.models.TextTower", "pooling": "eos", "config": text_config}
        cfg.objective.embed_dim = config.projection_dim
        if mean is not None and std is not None:
            cfg.data.mean, cfg.data.std = list(mean), list(std)
        cfg.imported_from = str(folder.resolve())
    return cfg


def read_hf_folder(folder: str | Path):
    """(``ClipKitModule`` state dict, run config, tokenizer) of a transformers ``CLIPModel`` folder: what
    :func:`export_hf` writes, or any CLIP ViT saved by transformers. Local files only."""
    from hydra.utils import instantiate
    from transformers import CLIPConfig, CLIPModel

    from clipkit.tokenization import pretrained_tokenizer

    folder = Path(folder)
    try:
        config = CLIPConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"not a transformers CLIPModel folder ({str(err).splitlines()[0]})") from None
    tokenizer = pretrained_tokenizer(folder, context_length=config.text_config.max_position_embeddings)
    processor = folder / "preprocessor_config.json"
    pre = json.loads(processor.read_text()) if processor.is_file() else {}
    cfg = hf_clipkit_config(config, tokenizer, folder, pre.get("image_mean"), pre.get("image_std"))
    state = CLIPModel.from_pretrained(str(folder), local_files_only=True).state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    weights = convert_for(state, HF_VISION + HF_TEXT, False, instantiate(cfg.module), "the CLIPModel folder",
                          "a clipkit CLIP model")
    return weights, cfg, tokenizer


def import_hf(folder: str | Path, out: str | Path) -> Path:
    """A ``CLIPModel`` folder as a self-describing clipkit ``.safetensors`` (as ``clipkit import`` writes)."""
    from omegaconf import OmegaConf

    from clipkit.tokenization import special_tokens, tokenizer_json
    from clipkit.weights import export_weights

    weights, cfg, tokenizer = read_hf_folder(folder)
    info = {"config": OmegaConf.to_yaml(cfg, resolve=True), "tokenizer": tokenizer_json(tokenizer),
            "tokenizer_specials": json.dumps(special_tokens(tokenizer))}
    return export_weights(weights, info, out)
