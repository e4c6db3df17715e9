"""Text tower: a transformers model built from a config or loaded from a local directory, pooled at the end-of-text
token (or cls / mean)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel

from clipkit.models.locking import LockableTower
from clipkit.models.lora import add_lora

POOLINGS = ("eos", "cls", "mean")


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """transformers' own switch: each layer's activations are recomputed in the backward pass (non-reentrant
    ``torch.utils.checkpoint``, PyTorch's recommended mode). ``gradient_checkpointing_enable`` is deprecated
    in transformers 5 and goes away in v6."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_pretrained_model(path: str) -> PreTrainedModel:
    """A transformers encoder from a local directory (never the hub). BERT-style models come with a pooler we do
    not use (the tower pools itself): it is dropped, or DDP would find parameters that get no gradient."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model.text.pretrained={path} is not a directory (a Hugging Face model directory "
                                f"with config.json and weights)")
    model = AutoModel.from_pretrained(path, local_files_only=True)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


class TextTower(LockableTower):
    """``input_ids, attention_mask [B, L] -> features [B, width]``.

    ``eos`` pooling (the paper's) reads the last non-padding position, located from ``attention_mask``
    rather than from ``config.eos_token_id``: transformers' CLIP default (49407) lies outside a small
    vocabulary, and its own pooler then silently reads position 0. ``lora`` (``{r, alpha, dropout,
    target_modules}``, r=0: off) adds LoRA adapters (:mod:`clipkit.models.lora`).
    """

    kind = "transformer"

    def __init__(self, config: PretrainedConfig | None = None, pooling: str = "eos", grad_checkpointing: bool = False,
                 locked: bool = False, unlocked_layers: int = 0, pretrained: str | None = None,
                 lora: dict | None = None, init: str | None = None) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown text pooling {pooling!r}: choose from {', '.join(POOLINGS)}")
        if (config is None) == (pretrained is None):
            raise ValueError("a text tower needs either model.text.config (built from scratch) or "
                             "model.text.pretrained=DIR (a local Hugging Face model directory), not both")
        self.model = load_pretrained_model(pretrained) if pretrained else AutoModel.from_config(config)
        if init:  # the config's architecture, these weights (strictly)
            from clipkit.init import load_tower

            load_tower(self.model, init, "objective.text_tower.model.", "model.text.init")
        config = self.model.config
        self.pooling = pooling
        self.width = config.hidden_size
        self.vocab_size = config.vocab_size
        if grad_checkpointing:
            enable_activation_checkpointing(self.model)
        self.adapted = add_lora(self.model, lora, "model.text", locked)
        if locked:
            self.lock(unlocked_layers)

    def blocks(self) -> list[nn.Module]:
        """The transformer layers in forward order: the modules of transformers' ``_no_split_modules`` classes
        that sit in a layer list (the embeddings are such a class too, but stand alone)."""
        names = set(self.model._no_split_modules or ())
        return [m for parent in self.model.modules() if isinstance(parent, nn.ModuleList)
                for m in parent if type(m).__name__ in names]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, W]
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        last = attention_mask.sum(1).long() - 1  # the end-of-text token: last non-padding position
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
