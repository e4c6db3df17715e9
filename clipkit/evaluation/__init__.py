"""Evaluation metrics shared by every objective: zero-shot top-k accuracy and retrieval recall@k."""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_accuracy
from torchmetrics.retrieval import RetrievalHitRate


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """``logits [N, C]``, ``labels [N]`` -> ``{"top1": ..., "top5": ...}`` as fractions (k capped at C)."""
    c = logits.shape[1]
    return {f"top{k}": multiclass_accuracy(logits, labels, num_classes=c, top_k=min(k, c), average="micro").item()
            for k in ks}


def recall_at_k(scores: torch.Tensor, positives: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Recall@k of each query row of ``scores [Q, G]`` against a gallery, averaged over queries.

    A query hits when **any** of its positives (``positives [Q, G]`` bool) ranks in the top k: the
    CLIP_benchmark protocol (COCO has five captions per image), which is torchmetrics' hit rate.
    """
    query = torch.arange(scores.shape[0]).unsqueeze(1).expand_as(scores)
    return {f"r{k}": RetrievalHitRate(top_k=k)(scores.float().flatten(), positives.flatten(), indexes=query.flatten()).item()
            for k in ks}
