"""Bag-of-words text tower (CBOW): the mean embedding of a caption's words, for the paper's Figure 2
contrastive arm. The linear layer of "mean of token embeddings + linear" is the objective's projection."""

from __future__ import annotations

import torch
from torch import nn

from clipkit.models.lora import add_lora


def word_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``attention_mask [B, L]`` without its first and last real positions: the start and end tokens that
    every tokenised caption carries, so a bag holds the caption's words only (no special-token ids needed)."""
    mask = attention_mask.bool().clone()
    lengths = mask.sum(1)
    rows = torch.arange(mask.shape[0], device=mask.device)
    mask[rows, (lengths - 1).clamp_min(0)] = False
    mask[:, 0] = False
    return mask


class BagOfWordsTower(nn.Module):
    """``input_ids, attention_mask [B, L] -> [B, width]``: the mean of the caption's word embeddings.

    Order-free by construction: the same words in any order give the same feature. LoRA has no default layers
    here (the tower is one embedding table): ``lora.r > 0`` needs ``lora.target_modules=[embedding]``.
    """

    kind = "bag of words"

    def __init__(self, vocab_size: int, width: int = 128, lora: dict | None = None) -> None:
        super().__init__()
        self.vocab_size, self.width = vocab_size, width
        self.embedding = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.adapted = add_lora(self, lora, "model.text")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = word_mask(attention_mask).unsqueeze(-1).to(self.embedding.weight.dtype)
        return (self.embedding(input_ids) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
