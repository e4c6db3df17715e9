"""Evaluation shared by every objective: zero-shot classification, retrieval recall@k, linear and few-shot probes.

Metrics come from torchmetrics; the probes use scikit-learn's L-BFGS logistic regression, as the paper did.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_recall
from torchmetrics.retrieval import RetrievalHitRate


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """``logits [N, C]``, ``labels [N]`` -> ``{"top1": ..., "top5": ...}`` as fractions (k capped at C)."""
    c = logits.shape[1]
    return {f"top{k}": multiclass_accuracy(logits, labels, num_classes=c, top_k=min(k, c), average="micro").item()
            for k in ks}


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[C]``: top-1 accuracy within each class (its recall); NaN for a class with no images."""
    c = logits.shape[1]
    recall = multiclass_recall(logits, labels, num_classes=c, average="none")
    present = torch.bincount(labels, minlength=c) > 0
    return torch.where(present, recall, torch.full_like(recall, float("nan")))


def classification_report(logits: torch.Tensor, labels: torch.Tensor, classnames: list[str]) -> dict:
    """Top-1/top-5, mean per-class recall (the paper's metric for unbalanced sets) and per-class accuracy."""
    per_class = per_class_accuracy(logits, labels)
    return {**topk_accuracy(logits, labels), "mean_per_class_recall": float(per_class.nanmean()),
            "per_class": {name: float(v) for name, v in zip(classnames, per_class, strict=True)}}


def recall_at_k(scores: torch.Tensor, positives: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Recall@k of each query row of ``scores [Q, G]`` against a gallery, averaged over queries.

    A query hits when **any** of its positives (``positives [Q, G]`` bool) ranks in the top k: the
    CLIP_benchmark protocol (COCO has five captions per image), which is torchmetrics' hit rate.
    """
    query = torch.arange(scores.shape[0]).unsqueeze(1).expand_as(scores)
    return {f"r{k}": RetrievalHitRate(top_k=k)(scores.float().flatten(), positives.flatten(), indexes=query.flatten()).item()
            for k in ks}


def retrieval_report(scores: torch.Tensor, positives: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """``scores [images, captions]`` -> image→text and text→image recall@k (any positive counts)."""
    out = {}
    for direction, s, pos in (("image_to_text", scores, positives), ("text_to_image", scores.T, positives.T)):
        out.update({f"{direction}_{k}": v for k, v in recall_at_k(s, pos, ks).items()})
    return out
