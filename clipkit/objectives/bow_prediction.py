"""Bag-of-words prediction (the paper's Figure 2 middle arm): the image predicts which words its caption uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.models import word_mask
from clipkit.objectives.base import Gather, Objective


def bag_of_words(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[B, L]`` token ids -> ``[B, V]`` normalised word counts (rows sum to 1; a caption without words
    gives a zero row). Words are the tokenizer's tokens between the start and end tokens."""
    mask = word_mask(attention_mask).to(torch.float32)
    counts = torch.zeros(input_ids.shape[0], vocab_size, device=input_ids.device)
    counts.scatter_add_(1, input_ids, mask)
    return counts / counts.sum(1, keepdim=True).clamp_min(1.0)


class BagOfWordsPrediction(Objective):
    """Image tower + a linear head over the vocabulary, trained with cross-entropy against the caption's
    normalised bag of words. There is no text tower.

    Zero-shot scores class c by the mean predicted log-probability of its prompts' words, ``log p(w | image)``
    averaged over each prompt's words and then over templates: the negative of the training loss with the
    prompt as the caption, so evaluation asks the same question training optimised.
    """

    def __init__(self, image_tower: nn.Module, vocab_size: int) -> None:
        super().__init__()
        self.image_tower = image_tower
        self.vocab_size = vocab_size
        self.head = nn.Linear(image_tower.width, vocab_size)

    @property
    def arm(self) -> str:
        return "bag-of-words prediction"

    def log_probs(self, images: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.head(self.image_tower(images)).float(), dim=-1)

    def loss(self, batch, gather: Gather | None = None):
        # no cross-sample term: each process's mean is the global mean once DDP averages gradients
        target = bag_of_words(batch["input_ids"], batch["attention_mask"], self.vocab_size)
        nll = -(target * self.log_probs(batch["images"])).sum(1)
        has_words = target.sum(1) > 0
        loss = nll[has_words].mean() if has_words.any() else nll.sum() * 0.0
        return loss, {}

    def zero_shot_classifier(self, prompts, text_batch_size: int | None = None) -> torch.Tensor:
        """``[C, V]``: each class's bags of words averaged over its templates, built once per set."""
        c, t, length = prompts["input_ids"].shape
        bags = bag_of_words(prompts["input_ids"].reshape(c * t, length),
                            prompts["attention_mask"].reshape(c * t, length), self.vocab_size)
        return bags.reshape(c, t, -1).mean(1)

    def zero_shot_logits(self, images, classifier):
        if isinstance(classifier, dict):  # prompts: a one-off call
            classifier = self.zero_shot_classifier(classifier)
        return self.log_probs(images) @ classifier.to(images.device).T
