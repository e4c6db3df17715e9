"""Caption prediction (the paper's Figure 2 slowest arm, after VirTex): an image-conditioned transformer
language model, trained with teacher forcing to predict the caption's next token."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from clipkit.models.text import enable_activation_checkpointing
from clipkit.objectives.base import Gather, Objective


class CaptionLM(Objective):
    """Image tower -> linear projection of its unpooled tokens -> cross-attention memory of a causal decoder
    built from a transformers config (GPT-2 style, ``add_cross_attention`` switched on here). No text encoder.

    Zero-shot scores class c by the length-normalised log-likelihood of its prompts given the image (mean
    log-probability per predicted token, end token included), averaged over templates. Scoring is a decoder
    pass per (image, prompt) pair, run in blocks of ``score_batch`` sequences to bound memory.
    """

    def __init__(self, image_tower: nn.Module, decoder: PretrainedConfig, grad_checkpointing: bool = False,
                 score_batch: int = 256) -> None:
        super().__init__()
        decoder.add_cross_attention = True
        self.image_tower = image_tower
        self.decoder = AutoModelForCausalLM.from_config(decoder)
        if "encoder_hidden_states" not in inspect.signature(self.decoder.forward).parameters:
            raise ValueError(f"{type(self.decoder).__name__} cannot attend to the image (no cross-attention): "
                             "use a decoder config that supports add_cross_attention, such as GPT2Config")
        self.image_proj = nn.Linear(image_tower.token_width, decoder.hidden_size, bias=False)
        self.score_batch = score_batch
        if grad_checkpointing:
            enable_activation_checkpointing(self.decoder)

    @property
    def arm(self) -> str:
        return "caption prediction (transformer LM)"

    def memory(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, N, hidden]``: the image's tokens in the decoder's width, attended to by every layer."""
        return self.image_proj(self.image_tower.tokens(images))

    def token_nll(self, memory: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, L-1]``: column t-1 is ``-log p(token t | tokens < t, image)``, zero at padding."""
        logits = self.decoder(input_ids=input_ids, attention_mask=attention_mask,
                              encoder_hidden_states=memory).logits
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
        return nll * attention_mask[:, 1:]

    def loss(self, batch, gather: Gather | None = None):
        # mean over this process's tokens; no cross-sample term, so DDP's gradient averaging is enough
        mask = batch["attention_mask"]
        nll = self.token_nll(self.memory(batch["images"]), batch["input_ids"], mask)
        loss = nll.sum() / mask[:, 1:].sum().clamp_min(1)
        return loss, {"perplexity": loss.detach().exp()}

    def zero_shot_logits(self, images, prompts):
        c, t, length = prompts["input_ids"].shape
        keep = int(prompts["attention_mask"].sum(-1).max())  # drop all-padding columns: prompts are short
        ids = prompts["input_ids"].reshape(c * t, length)[:, :keep]
        mask = prompts["attention_mask"].reshape(c * t, length)[:, :keep]
        memory = self.memory(images)
        n_prompts = ids.shape[0]
        per_block = min(n_prompts, self.score_batch)
        images_per_block = max(1, self.score_batch // n_prompts)
        scores = torch.empty(images.shape[0], n_prompts, device=images.device)
        counts = mask[:, 1:].sum(1).clamp_min(1)
        for i in range(0, images.shape[0], images_per_block):
            block = memory[i:i + images_per_block]
            b = block.shape[0]
            for j in range(0, n_prompts, per_block):
                q = min(per_block, n_prompts - j)
                nll = self.token_nll(block.repeat_interleave(q, 0), ids[j:j + q].repeat(b, 1),
                                     mask[j:j + q].repeat(b, 1))
                scores[i:i + b, j:j + q] = -(nll.sum(1) / counts[j:j + q].repeat(b)).view(b, q)
        return scores.view(-1, c, t).mean(2)
