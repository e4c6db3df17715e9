"""CLIP's objective: symmetric InfoNCE between L2-normalised image and text embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.objectives.base import Gather, Objective


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                     all_image: torch.Tensor | None = None, all_text: torch.Tensor | None = None,
                     rank: int = 0) -> torch.Tensor:
    """Symmetric cross-entropy of ``logit_scale * cos`` over the (global) batch.

    ``image``, ``text``: this process's normalised embeddings [B, D]. ``all_*``: the gathered batch
    [world * B, D] (defaults to the local one). Each process scores only its own rows against every
    column (the paper's sharded similarity, open_clip's ``local_loss``), so its positives sit at
    ``rank * B + arange(B)``.
    """
    all_image = image if all_image is None else all_image
    all_text = text if all_text is None else all_text
    labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
    logits_per_image = logit_scale * image @ all_text.T  # [B, world * B]
    logits_per_text = logit_scale * text @ all_image.T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


PROJECTIONS = ("linear", "mlp")


def make_projection(kind: str, width: int, embed_dim: int) -> nn.Module:
    """The paper's linear projection (no bias), or a 2-layer MLP (SimCLR-style) for the paper's comparison."""
    if kind == "linear":
        return nn.Linear(width, embed_dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, embed_dim, bias=False))
    raise ValueError(f"unknown projection {kind!r}: choose from {', '.join(PROJECTIONS)}")


class Contrastive(Objective):
    """Image and text towers, linear projections (no bias) into a joint space, learnable temperature.

    The temperature is log-parameterised and initialised to 0.07 (logit scale ln(1/0.07) ≈ 2.659);
    ``after_optimizer_step`` clamps it in place so logits are never scaled by more than ``max_logit_scale``,
    as in the paper and open_clip (clamping in the forward pass would stop its gradient instead).
    """

    def __init__(self, image_tower: nn.Module, text_tower: nn.Module, embed_dim: int = 128,
                 init_temperature: float = 0.07, max_logit_scale: float = 100.0, learn_temperature: bool = True,
                 projection: str = "linear") -> None:
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_proj = make_projection(projection, image_tower.width, embed_dim)
        self.text_proj = make_projection(projection, text_tower.width, embed_dim)
        # learn_temperature=False keeps it at init_temperature: the ablation the paper argues against
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)), requires_grad=learn_temperature)
        self.max_log_scale = math.log(max_logit_scale)

    @property
    def arm(self) -> str:
        return f"contrastive ({getattr(self.text_tower, 'kind', type(self.text_tower).__name__)} text)"

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image_tower(images)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text_tower(input_ids, attention_mask)), dim=-1)

    def loss(self, batch, gather: Gather | None = None):
        image = self.encode_image(batch["images"])
        text = self.encode_text(batch["input_ids"], batch["attention_mask"])
        scale = self.logit_scale.exp()
        if gather is None:
            loss = contrastive_loss(image, text, scale)
        else:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            loss = contrastive_loss(image, text, scale, gather(image), gather(text), rank)
        return loss, {"logit_scale": scale.detach(), "temperature": 1.0 / scale.detach()}

    def class_embeddings(self, prompts: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[C, T, L]`` prompts -> ``[C, D]``: mean of normalised prompt embeddings, renormalised (ensembling)."""
        c, t, length = prompts["input_ids"].shape
        flat = self.encode_text(prompts["input_ids"].reshape(c * t, length),
                                prompts["attention_mask"].reshape(c * t, length))
        return F.normalize(flat.reshape(c, t, -1).mean(1), dim=-1)

    def zero_shot_logits(self, images, prompts):
        return self.logit_scale.exp() * self.encode_image(images) @ self.class_embeddings(prompts).T

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.logit_scale.clamp_(0.0, self.max_log_scale)
