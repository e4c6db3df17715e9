"""Image tower: any timm model by name, its classifier removed, returning pooled features."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import timm
import torch
from torch import nn

from clipkit.models.locking import LockableTower
from clipkit.models.lora import add_lora


def create_timm_model(name: str, init: str | None = None, **kwargs) -> nn.Module:
    """``timm.create_model`` without a classifier or a download, with a one-line error for a typo. ``init``: a local
    weights file, loaded by timm's own mechanism (its checkpoint filters adapt OpenAI's and older layouts) and
    strictly: a classifier head in the file is dropped, any other misfit is a one-line error naming the tensors."""
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=1, cutoff=0.6)
        hint = f": did you mean {close[0]}?" if close else " (see timm.list_models())"
        raise ValueError(f"unknown image backbone {name!r}{hint}")
    if init is None:  # timm's own pretrained weights need the hub, which this kit never reaches
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if not Path(init).is_file():
        raise FileNotFoundError(f"model.image.init={init}: no such weights file")
    try:  # the file's classes set to 0 as the model's, so timm keeps its load strict
        return timm.create_model(name, pretrained=True, num_classes=0,
                                 pretrained_cfg_overlay=dict(file=str(init), num_classes=0), **kwargs)
    except RuntimeError as err:
        problems = " ".join(line.strip() for line in str(err).splitlines()[1:])
        head = re.fullmatch(r'Unexpected key\(s\) in state_dict: ((?:"(?:head|fc|classifier)[^"]*"(?:, )?)+)\.?',
                            problems)
        if head is None:
            raise ValueError(f"model.image.init={init} does not fit {name}: {problems[:300]}") from None
    # only a classifier head did not fit: timm drops it (and then loads the rest without strictness)
    return timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(init)),
                             **kwargs)


def check_patch_grid(model: nn.Module) -> None:
    """A ViT whose image size is not a multiple of its patch size silently drops the last pixels (timm's strided
    patch convolution); refuse it in one line."""
    embed = getattr(model, "patch_embed", None)
    size, patch = getattr(embed, "img_size", None), getattr(embed, "patch_size", None)
    if not size or not patch or all(s % p == 0 for s, p in zip(size, patch, strict=True)):
        return
    s, p = size[0], patch[0]
    raise ValueError(f"image size {s} is not a multiple of the patch size {p}: the last {s % p} pixel rows and columns "
                     f"would be dropped; use data.image_size={s - s % p} or {s - s % p + p}, or another patch size")


def _blocks(stack: nn.Module):
    """The blocks of a stack, looking through plain containers and stages that hold ``blocks``."""
    for m in stack.children():
        inner = m if type(m) in (nn.Sequential, nn.ModuleList) else getattr(m, "blocks", None)
        if isinstance(inner, (nn.Sequential, nn.ModuleList)):
            yield from _blocks(inner)
        else:
            yield m


class ImageTower(LockableTower):
    """``images [B, 3, H, W] -> features [B, width]`` from timm's own pooling (cls token, avg or attention pool).

    Keyword arguments go to the timm constructor unchanged (``img_size``, ``patch_size``, ``depth``...),
    so every timm model is usable without a wrapper per family. ``tokens`` gives the unpooled grid
    ``[B, N, token_width]`` for objectives that attend over the image (the caption decoder).
    ``lora`` (``{r, alpha, dropout, target_modules}``, r=0: off) adds LoRA adapters (:mod:`clipkit.models.lora`).
    """

    def __init__(self, name: str, grad_checkpointing: bool = False, locked: bool = False, unlocked_layers: int = 0,
                 lora: dict | None = None, init: str | None = None, **kwargs) -> None:
        super().__init__()
        self.name = name
        self.model = create_timm_model(name, init, **kwargs)
        check_patch_grid(self.model)
        # an attention-pool head (CLIP's ResNets) may pool to another width than the feature map's
        self.width = getattr(self.model, "head_hidden_size", None) or self.model.num_features
        self.token_width = self.model.num_features
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.adapted = add_lora(self.model, lora, "model.image", locked)
        if locked:
            self.lock(unlocked_layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def blocks(self) -> list[nn.Module]:
        """The backbone's repeated blocks in forward order (a ViT's ``blocks``, the blocks inside a CNN's stages)."""
        stacks = [getattr(self.model, name, None) for name in ("blocks", "stages")]
        stacks += [getattr(self.model, f"layer{i}", None) for i in range(1, 5)]  # torchvision-style ResNets
        inside = {id(b) for stack in stacks if stack is not None for b in _blocks(stack)}
        return [m for m in self.model.modules() if id(m) in inside]

    def block_types(self) -> set[type[nn.Module]]:
        """Classes of the backbone's repeated blocks: FSDP's wrapping units."""
        return {type(block) for block in self.blocks()}

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The unpooled features as a sequence: a ViT's tokens, or a CNN's map flattened to ``[B, H*W, C]``."""
        features = self.model.forward_features(images)
        return features.flatten(2).transpose(1, 2) if features.ndim == 4 else features
