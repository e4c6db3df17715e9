"""The one interface every objective implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

Gather = Callable[[torch.Tensor], torch.Tensor]  # [B, ...] -> [world * B, ...], carrying gradients


class Objective(nn.Module, ABC):
    """A model plus its loss.

    ``batch`` holds ``images [B, 3, H, W]``, ``input_ids`` and ``attention_mask [B, L]``.
    ``prompts`` holds ``input_ids`` and ``attention_mask [C, T, L]``: T prompt templates for each of
    C classes; retrieval passes one caption per "class" (T = 1).
    """

    @abstractmethod
    def loss(self, batch: dict[str, torch.Tensor], gather: Gather | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss and a dict of diagnostics to log. ``gather`` collects features across processes."""

    @abstractmethod
    def zero_shot_logits(self, images: torch.Tensor, prompts: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, C]`` scores: higher means the image matches class c's prompts better."""

    @property
    @abstractmethod
    def arm(self) -> str:
        """A readable label of what this objective trains, e.g. "contrastive (bag of words text)": runs are
        grouped by it in MLflow (tag ``clipkit.arm``) and in ``clipkit compare``."""

    def after_optimizer_step(self) -> None:
        """Hook for in-place parameter constraints after each optimiser step (e.g. clamping)."""
