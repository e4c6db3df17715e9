"""Classification fine-tuning of a contrastive model, as WiSE-FT (Wortsman et al. 2022) does it: the image tower and
image projection, L2-normalised, under a linear head that starts as the zero-shot classifier."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.errors import DataError
from clipkit.objectives.base import Gather, Objective
from clipkit.objectives.contrastive import Contrastive
from clipkit.zeroshot import class_prompts, on_device


class FinetuneClassifier(Contrastive):
    """A :class:`Contrastive` model (same parts, same parameter names, so pretrained contrastive weights load into it)
    plus ``head``: a linear layer ``[C, D]`` over the normalised image embedding, trained with cross-entropy on
    ``labels`` (``[B]`` class indices, or ``[B, C]`` multi-hot: the normalised target, as :class:`Supervised`).

    The head starts as the zero-shot classifier of ``classnames``: the normalised class-prompt embeddings times the
    logit scale, bias zero (WiSE-FT's ``ClassificationHead``), so before the first step its logits are the source
    model's zero-shot logits. :meth:`initialise_head` does that once, at fit start, after pretrained weights are
    loaded; the persistent buffer ``head.initialised`` (saved in checkpoints) stops a resumed run from doing it again.
    The text tower, text projection and temperature are frozen: only the image side and the head train.

    Zero-shot interface: a class prompt whose class name the head was trained on is scored by its head row; any other
    (another set's classes, retrieval captions) by the frozen text tower, ``logit_scale * cos`` as the source model
    scored it, which is also what that row would have started as.
    """

    batch_coupled = False  # per-sample cross-entropy: trainer.accumulate_grad_batches is exact
    accumulated_backward = Objective.accumulated_backward  # not the contrastive GradCache

    def __init__(self, image_tower: nn.Module, text_tower: nn.Module, classnames: list[str], embed_dim: int = 128,
                 **contrastive) -> None:
        super().__init__(image_tower, text_tower, embed_dim, **contrastive)
        self._add_head(classnames, embed_dim)

    @classmethod
    def from_contrastive(cls, source: Contrastive, classnames: list[str]) -> FinetuneClassifier:
        """A classifier holding copies of ``source``'s parts (its weights, not shared); the head is still to be
        initialised (:meth:`initialise_head` or :meth:`set_zero_shot_head`)."""
        model = cls.__new__(cls)
        Objective.__init__(model)
        for name in ("image_tower", "text_tower", "image_proj", "text_proj"):
            setattr(model, name, copy.deepcopy(getattr(source, name)))
        model.logit_scale = nn.Parameter(source.logit_scale.detach().clone())
        model.max_log_scale, model.local_loss = source.max_log_scale, source.local_loss
        embed_dim = [m for m in source.text_proj.modules() if isinstance(m, nn.Linear)][-1].out_features
        model._add_head(classnames, embed_dim)
        return model.to(source.logit_scale.device)

    def _add_head(self, classnames: list[str], embed_dim: int) -> None:
        """The head ``[C, embed_dim]`` (still to be initialised) and the frozen text side."""
        self.classnames = [str(c) for c in classnames]
        self.head = nn.Linear(embed_dim, len(self.classnames))
        self.head.register_buffer("initialised", torch.zeros((), dtype=torch.bool), persistent=True)
        for part in (self.text_tower, self.text_proj):
            part.requires_grad_(False)
        self.logit_scale.requires_grad_(False)

    @property
    def arm(self) -> str:
        return "fine-tuned classifier (zero-shot head)"

    def new_heads(self) -> list[str]:
        return ["head"]

    @torch.no_grad()
    def zero_shot_head(self, prompts: dict, text_batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight ``[C, D]``, bias ``[C]``): the zero-shot classifier of ``prompts`` ``[C, T, L]`` as a linear layer.
        The text parts run in eval mode (no dropout)."""
        modes = [(m, m.training) for m in (self.text_tower, self.text_proj)]
        for m, _ in modes:
            m.eval()
        try:
            weight = self.logit_scale.exp() * self.class_embeddings(prompts, text_batch_size)
        finally:
            for m, mode in modes:
                m.train(mode)
        return weight, weight.new_zeros(len(weight))

    @torch.no_grad()
    def set_zero_shot_head(self, prompts: dict, text_batch_size: int | None = None) -> None:
        """Overwrite the head with the zero-shot classifier of ``prompts`` (one class per head row, in order)."""
        if prompts["input_ids"].shape[0] != len(self.classnames):
            raise ValueError(f"{prompts['input_ids'].shape[0]} classes of prompts for a head of {len(self.classnames)}")
        weight, bias = self.zero_shot_head(on_device(prompts, self.head.weight.device), text_batch_size)
        self.head.weight.copy_(weight)
        self.head.bias.copy_(bias)
        self.head.initialised.fill_(True)

    def initialise_head(self, datamodule) -> None:
        """At fit start: the zero-shot head over ``classnames`` with the data's tokenizer and templates, unless this
        head was initialised before (a resumed run, or weights of a fine-tuned classifier). A :class:`DataError` (one
        line from the CLI) when the data's classes are not the head's."""
        if bool(self.head.initialised):
            return
        data_classes = getattr(datamodule, "classnames", None)
        data_classes = data_classes() if callable(data_classes) else data_classes
        if data_classes is not None and list(data_classes) != self.classnames:
            data_classes = list(data_classes)
            raise DataError(f"the data's {len(data_classes)} classes ({', '.join(data_classes[:3])}, ...) are not "
                            f"the head's {len(self.classnames)} ({', '.join(self.classnames[:3])}, ...): set "
                            f"objective.classnames to the data's classes")
        self.set_zero_shot_head(class_prompts(datamodule.tokenizer, self.classnames, datamodule.templates,
                                              datamodule.context_length))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` head logits over ``classnames``."""
        return self.head(self.encode_image(images)).float()

    def loss(self, batch, gather: Gather | None = None):
        # no cross-sample term: DDP's gradient averaging gives the global mean
        labels = batch.get("labels")
        if labels is None:
            raise ValueError("objective=finetune_classifier needs class labels with each image: data=synthetic with "
                             "data.labels=true, or data=digits (experiments=finetune_classifier sets it)")
        logits = self.logits(batch["images"])
        if labels.ndim == 1:
            return F.cross_entropy(logits, labels), {}
        if labels.shape[1] != len(self.classnames):
            raise ValueError(f"the data labels {labels.shape[1]} classes, the head has {len(self.classnames)}")
        target = labels.float() / labels.float().sum(1, keepdim=True).clamp_min(1.0)
        return -(target * F.log_softmax(logits, dim=-1)).sum(1).mean(), {}

    def zero_shot_classifier(self, prompts, text_batch_size: int | None = None):
        """(weight ``[C, D]``, bias ``[C]``): head rows for the prompts' class names the head knows, the frozen text
        tower's zero-shot rows (bias 0) for the others (all of them when the prompts carry no class names)."""
        c = prompts["input_ids"].shape[0]
        names = prompts.get("classnames") or [None] * c
        index = {name: i for i, name in enumerate(self.classnames)}
        known = [(j, index[name]) for j, name in enumerate(names) if name in index]
        unknown = [j for j, name in enumerate(names) if name not in index]
        weight = self.head.weight.new_empty(c, self.head.in_features)
        bias = self.head.bias.new_zeros(c)
        if known:
            columns, rows = (list(x) for x in zip(*known, strict=True))
            weight[columns], bias[columns] = self.head.weight[rows], self.head.bias[rows]
        if unknown:
            sub = {k: prompts[k][unknown] for k in ("input_ids", "attention_mask")}
            weight[unknown] = self.zero_shot_head(sub, text_batch_size)[0]
        return weight, bias

    def zero_shot_logits(self, images, classifier):
        if isinstance(classifier, dict):  # prompts: a one-off call
            classifier = self.zero_shot_classifier(classifier)
        weight, bias = classifier
        return (self.encode_image(images) @ weight.to(images.device).T + bias.to(images.device)).float()
