"""The supervised baseline (the paper's "standard image model", Figure 1 and its robustness section): the same image
tower with a linear classifier over fixed class names, trained on the data's class labels instead of captions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.objectives.base import Gather, Objective


class Supervised(Objective):
    """Image tower + linear classifier, trained with cross-entropy against ``labels [B, C]`` (several per image where
    a scene shows several classes: the normalised multi-hot target, as Mahajan et al. 2018 trained on hashtags).

    Its zero-shot interface is its classifier: class prompts are scored by the class name they were built for
    (``prompts["classnames"]``); a name it was not trained on scores -inf, since a classifier cannot name a class it
    never saw. It reads no free text, so retrieval skips it (``reads_text``).
    """

    reads_text = False

    def __init__(self, image_tower: nn.Module, classnames: list[str]) -> None:
        super().__init__()
        self.image_tower = image_tower
        self.classnames = [str(c) for c in classnames]
        self.head = nn.Linear(image_tower.width, len(self.classnames))

    @property
    def arm(self) -> str:
        return "supervised (classifier)"

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.image_tower(images)).float()

    def loss(self, batch, gather: Gather | None = None):
        labels = batch.get("labels")
        if labels is None:
            raise ValueError("objective=supervised needs class labels with each image: data=synthetic with "
                             "data.labels=true (experiments=supervised_vit sets it)")
        if labels.shape[1] != len(self.classnames):
            raise ValueError(f"the data labels {labels.shape[1]} classes, the classifier has {len(self.classnames)}")
        target = labels.float() / labels.float().sum(1, keepdim=True).clamp_min(1.0)
        return -(target * F.log_softmax(self.logits(batch["images"]), dim=-1)).sum(1).mean(), {}

    def zero_shot_logits(self, images, prompts):
        names = prompts.get("classnames")
        if names is None:
            raise ValueError("the supervised baseline scores class names, and these prompts carry none "
                             "(build them with clipkit.zeroshot.class_prompts)")
        logits, index = self.logits(images), {name: i for i, name in enumerate(self.classnames)}
        out = torch.full((len(images), len(names)), float("-inf"), device=logits.device)
        known = [(j, index[name]) for j, name in enumerate(names) if name in index]
        if known:
            columns, rows = (list(x) for x in zip(*known, strict=True))
            out[:, columns] = logits[:, rows]
        return out
