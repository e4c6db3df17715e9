"""What a clipkit model must be to leave clipkit as a CLIP model, and the check that an export really is it.

``describe_*`` read the sizes another library needs off the built towers and refuse, in one line, a tower that
has no equivalent there (a hybrid ViT, average pooling, a bag-of-words or BERT text tower...). Whatever they do
not catch, :func:`check_reproduces` does: every export is reloaded through the other library and must give
clipkit's embeddings, or nothing is written.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from clipkit.tokenization import tokenize

TOLERANCE = 1e-4  # largest embedding difference an export may show (float32 summation order: ~1e-6)


class NotExportable(ValueError):
    """The model has no equivalent in the target format: nothing is written."""


def _activation(module: nn.Module) -> str:
    from timm.layers import QuickGELU

    if isinstance(module, QuickGELU) or type(module).__name__ == "QuickGELU":
        return "quick_gelu"
    if isinstance(module, nn.GELU) and module.approximate == "none":
        return "gelu"
    raise NotExportable(f"activation {module} has no CLIP equivalent (quick_gelu or gelu)")


def describe_vit(tower) -> dict:
    """Sizes of a timm ViT in CLIP's form: pre-norm, class-token pooling, bias-free patch embedding, plain blocks."""
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import VisionTransformer

    m = tower.model

    def refuse(why: str) -> None:
        raise NotExportable(f"image tower {tower.name}: {why}; Hugging Face's CLIPModel holds only a CLIP-style ViT "
                            f"(model/image=vit_tiny), open_clip also OpenAI's attention-pooled ResNet")

    if not isinstance(m, VisionTransformer):
        refuse("not a timm VisionTransformer")
    if type(m.patch_embed) is not PatchEmbed:
        refuse("its patch embedding is a CNN stem (a hybrid ViT), which CLIP's ViT has no place for")
    if m.cls_token is None or m.global_pool != "token" or m.attn_pool is not None:
        refuse(f"it pools by {m.global_pool or 'nothing'}, CLIP by its class token")
    if isinstance(m.norm_pre, nn.Identity):
        refuse("it has no layer norm before the transformer (CLIP's ln_pre: model.image.pre_norm=true)")
    if m.patch_embed.proj.bias is not None:
        refuse("its patch embedding has a bias, CLIP's has none")
    if m.num_reg_tokens or m.no_embed_class or not isinstance(m.fc_norm, nn.Identity) or m.dynamic_img_size:
        refuse("it has register tokens, a pooled-feature norm or dynamic image sizes")
    if any(not isinstance(b.ls1, nn.Identity) or not isinstance(b.attn.q_norm, nn.Identity)
           for b in m.blocks):
        refuse("its blocks use layer scale or query/key norms")
    eps = {x.eps for x in m.modules() if isinstance(x, nn.LayerNorm)}
    if len(eps) != 1:
        refuse(f"its layer norms use several epsilons ({sorted(eps)})")
    size, patch = m.patch_embed.img_size, m.patch_embed.patch_size
    if size[0] != size[1] or patch[0] != patch[1]:
        refuse("its images or patches are not square")
    return {"image_size": size[0], "patch_size": patch[0], "width": m.embed_dim, "layers": len(m.blocks),
            "heads": m.blocks[0].attn.num_heads, "mlp_ratio": m.blocks[0].mlp.fc1.out_features / m.embed_dim,
            "eps": eps.pop(), "act": _activation(m.blocks[0].mlp.act)}


def describe_resnet(tower) -> dict:
    """Sizes of timm's resnet50_clip family as OpenAI's ModifiedResNet has them (open_clip's ``layers``, ``width``)."""
    from timm.layers import AttentionPool2d
    from timm.models.byobnet import ByobNet

    m = tower.model
    if not isinstance(m, ByobNet) or not isinstance(m.head, AttentionPool2d):
        raise NotExportable(f"image tower {tower.name}: only a CLIP-style ViT or OpenAI's attention-pooled ResNet "
                            f"(timm's resnet50_clip family) has a CLIP equivalent")
    stride = m.feature_info[-1]["reduction"]
    if stride != 32 or len(m.stages) != 4:
        raise NotExportable(f"image tower {tower.name}: its features have stride {stride}, OpenAI's ModifiedResNet "
                            f"downsamples 4 stages to stride 32 (model/image=resnet_clip_tiny keeps stride 16)")
    width = m.stem.conv3.conv.out_channels
    grid = round((m.head.pos_embed.shape[0] - 1) ** 0.5)
    if m.head.num_heads != width * 32 // 64:
        raise NotExportable(f"image tower {tower.name}: {m.head.num_heads} attention-pool heads, OpenAI's has "
                            f"{width * 32 // 64} at width {width}")
    return {"image_size": grid * 32, "layers": [len(s) for s in m.stages], "width": width}


def describe_text(tower) -> dict:
    """Sizes of a CLIP text transformer (transformers' ``CLIPTextModel``, end-of-text pooling)."""
    from transformers import CLIPTextModel

    model = getattr(tower, "model", None)
    if not isinstance(model, CLIPTextModel):
        kind = type(model).__name__ if model is not None else getattr(tower, "kind", type(tower).__name__)
        raise NotExportable(f"text tower {kind}: only a CLIP text transformer (transformers' CLIPTextModel, "
                            f"model/text=clip_tiny) has a CLIP equivalent")
    if tower.pooling != "eos":
        raise NotExportable(f"text tower pools by {tower.pooling}; CLIP pools at the end-of-text token (eos)")
    c = model.config
    if c.hidden_act not in ("quick_gelu", "gelu"):
        raise NotExportable(f"text activation {c.hidden_act} has no CLIP equivalent (quick_gelu or gelu)")
    return {"context_length": c.max_position_embeddings, "vocab_size": c.vocab_size, "width": c.hidden_size,
            "heads": c.num_attention_heads, "layers": c.num_hidden_layers, "eps": c.layer_norm_eps,
            "mlp_ratio": c.intermediate_size / c.hidden_size, "act": c.hidden_act}


PROBE_TEXTS = ["a photo of a red circle.", "two blue squares and a green star beside a purple ring"]


@torch.no_grad()
def check_reproduces(module, image_size: int, encode_image: Callable, encode_text: Callable, tokenizer,
                     what: str) -> float:
    """Compare the exported model's normalised embeddings (``encode_image(images)``, ``encode_text(texts)``, the
    other library's own tokenizer inside) with clipkit's on seeded noise images and two captions; the largest
    difference, or :class:`NotExportable` past :data:`TOLERANCE`."""
    objective = module.objective.eval()
    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    context = objective.text_tower.model.config.max_position_embeddings
    ours = (objective.encode_image(images), objective.encode_text(**tokenize(tokenizer, PROBE_TEXTS, context)))
    theirs = (encode_image(images), encode_text(PROBE_TEXTS))
    error = max(float((a - b).abs().max()) for a, b in zip(ours, theirs, strict=True))
    if not error <= TOLERANCE:
        raise NotExportable(f"the {what} export does not reproduce this model (largest embedding difference "
                            f"{error:.2g} > {TOLERANCE:g}): its towers differ in a way clipkit does not map")
    return error


def write_folder(out: str | Path, write: Callable[[Path], float]) -> tuple[Path, float]:
    """``write(tmp)`` a folder beside ``out``, then rename it to ``out``: a failed or refused export leaves nothing.
    An existing folder with files in it is refused, so nothing of the user's is overwritten. Returns ``out`` and
    what ``write`` returned (the export's measured embedding difference)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"out={out} exists and is not an empty folder: choose a new one")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        result = write(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, result
