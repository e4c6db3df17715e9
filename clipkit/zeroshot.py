"""Held-out evaluation sets and prompt ensembling, independent of the objective and the dataset.

A datamodule offers ``validation_sets()`` (model selection), ``zeroshot_sets()`` and ``retrieval_sets()`` (the
reported test sets); the zero-shot callback scores them with ``objective.zero_shot_classifier`` and
``zero_shot_logits``. Everything is small enough to hold in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from clipkit.tokenization import tokenize

# The paper's default prompt plus a few of its ensemble's templates that suit drawn scenes.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a drawing of a {}.",
    "an illustration of a {}.",
    "a picture of a {}.",
    "a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
)


@dataclass
class ZeroShotSet:
    """Labelled images ``[N, 3, H, W]`` with class prompts ``[C, T, L]`` (T templates per class)."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classnames: list[str]
    prompts: dict[str, torch.Tensor]


@dataclass
class RetrievalSet:
    """Images ``[N, 3, H, W]``, captions as prompts ``[M, 1, L]`` and which captions match which image."""

    name: str
    images: torch.Tensor
    captions: list[str]
    prompts: dict[str, torch.Tensor]
    positives: torch.Tensor  # [N, M] bool


@dataclass
class ProbeSet:
    """Labelled images for linear and few-shot probes: a training split and a test split over the same classes.
    The test split is the zero-shot set's images, so zero-shot and probe accuracies are comparable."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classnames: list[str]


def class_prompts(tokenizer, classnames: list[str], templates: tuple[str, ...] | list[str],
                  context_length: int) -> dict[str, torch.Tensor]:
    """Every template filled with every class name, tokenised to ``[C, T, L]``; ``classnames`` travel along, for an
    objective that scores class names rather than text (the supervised baseline's classifier)."""
    texts = [t.format(c) for c in classnames for t in templates]
    enc = tokenize(tokenizer, texts, context_length)
    prompts = {k: v.reshape(len(classnames), len(templates), context_length) for k, v in enc.items()}
    return {**prompts, "classnames": list(classnames)}


def on_device(prompts: dict, device) -> dict:
    """``prompts`` with its tensors on ``device`` (its class names stay as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in prompts.items()}


def per_class_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask holding out ``fraction`` of each class's samples (rounded), chosen by ``seed``: the one split
    behind digits' held-out scans and every validation set carved from a held-out set."""
    rng, held = np.random.default_rng(seed), np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        held[idx[: round(fraction * len(idx))]] = True
    return held


def split_off(zs: ZeroShotSet, fraction: float, seed: int) -> tuple[ZeroShotSet, ZeroShotSet | None]:
    """(the rest of ``zs``, a validation set of ``fraction`` of each class's images), disjoint and chosen by
    ``seed``; no validation set when ``fraction`` picks no image. Both keep the set's name, classes and prompts."""
    held = torch.from_numpy(per_class_mask(zs.labels.numpy(), fraction, seed))
    if not held.any():
        return zs, None
    return (replace(zs, images=zs.images[~held], labels=zs.labels[~held]),
            replace(zs, images=zs.images[held], labels=zs.labels[held]))
