"""The one interface every objective implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

Gather = Callable[[torch.Tensor], torch.Tensor]  # [B, ...] -> [world * B, ...], carrying gradients
# Lightning's manual_backward (precision scaling, DDP sync) or Tensor.backward; called once per micro-batch, in order
Backward = Callable[[torch.Tensor], None]


def split_batch(batch: dict, chunks: int) -> list[dict]:
    """``batch`` cut into ``chunks`` micro-batches of (nearly) equal size along the sample axis; entries that are
    not per-sample (data statistics) travel with every micro-batch."""
    size = len(batch["images"])
    if not 1 <= chunks <= size:
        raise ValueError(f"accumulate={chunks} cannot split a batch of {size} samples: use 1 to {size}")
    bounds = [round(i * size / chunks) for i in range(chunks + 1)]
    per_sample = {k for k, v in batch.items() if isinstance(v, (torch.Tensor, list)) and len(v) == size}
    return [{k: v[a:b] if k in per_sample else v for k, v in batch.items()} for a, b in zip(bounds, bounds[1:], strict=False)]


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@contextmanager
def running_stats_kept(module: nn.Module) -> Iterator[None]:
    """Leave batch-norm running statistics as they were on entry: a no-grad pass that is replayed with grad
    would otherwise update them twice."""
    saved = [(b, b.clone()) for m in module.modules() if isinstance(m, BATCH_NORMS) for b in m.buffers(recurse=False)]
    try:
        yield
    finally:
        for buffer, value in saved:
            buffer.copy_(value)


def rng_state() -> tuple:
    """The CPU and (if in use) CUDA generator states, to replay a forward pass with the same dropout masks."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)


def set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


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

    def zero_shot_classifier(self, prompts: dict[str, torch.Tensor], text_batch_size: int | None = None):
        """What :meth:`zero_shot_logits` scores images against, built once per evaluation set (not per chunk of
        images). Opaque to the callers: the contrastive family returns the ``[C, D]`` class embeddings, encoding
        the ``C x T`` prompts ``text_batch_size`` at a time; an objective that scores each (image, prompt) pair
        (caption likelihood) or class names (the supervised classifier) keeps the prompts, the default."""
        return prompts

    @abstractmethod
    def zero_shot_logits(self, images: torch.Tensor, classifier) -> torch.Tensor:
        """``[B, C]`` scores: higher means the image matches class c's prompts better. ``classifier`` is what
        :meth:`zero_shot_classifier` built (a prompts dict is accepted too and turned into one first)."""

    @property
    @abstractmethod
    def arm(self) -> str:
        """A readable label of what this objective trains, e.g. "contrastive (bag of words text)": runs are
        grouped by it in MLflow (tag ``clipkit.arm``) and in ``clipkit compare``."""

    #: False for an objective that scores class names only (the supervised classifier): it reads no free text, so
    #: retrieval skips it.
    reads_text = True

    #: True when the loss couples the samples of a batch (each is the others' negative): then splitting the batch
    #: with ``trainer.accumulate_grad_batches`` changes the objective, and ``accumulate`` must be used instead.
    batch_coupled = False

    def accumulated_backward(self, batch: dict[str, torch.Tensor], chunks: int, backward: Backward,
                             gather: Gather | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Backpropagate the loss of ``batch`` in ``chunks`` micro-batches (the ``accumulate`` option); returns
        what :meth:`loss` does, detached."""
        raise NotImplementedError(
            f"accumulate>1 is implemented for batch-coupled (contrastive) objectives; {type(self).__name__}'s loss is "
            f"per sample, so use trainer.accumulate_grad_batches for it")

    def after_optimizer_step(self) -> None:
        """Hook for in-place parameter constraints after each optimiser step (e.g. clamping)."""

    def new_heads(self) -> list[str]:
        """Prefixes of parameter names (relative to the objective) of heads that fine-tuning adds, which a
        pretrained model does not have (a classifier head): ``init`` does not expect them in its source, and they
        take ``module.head_lr`` and no layer-wise decay. None by default."""
        return []

    def initialise_head(self, datamodule) -> None:
        """Fit-start hook, after pretrained weights are loaded and before the first step: set up new heads from the
        model itself (the fine-tuned classifier's zero-shot head). Must do nothing on a resumed run."""
