"""CLIP's objective: symmetric InfoNCE between L2-normalised image and text embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.objectives.base import (
    Backward,
    Gather,
    Objective,
    rng_state,
    running_stats_kept,
    set_rng_state,
    split_batch,
)


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                     all_image: torch.Tensor | None = None, all_text: torch.Tensor | None = None,
                     rank: int = 0, local_loss: bool = True) -> torch.Tensor:
    """Symmetric cross-entropy of ``logit_scale * cos`` over the (global) batch.

    ``image``, ``text``: this process's normalised embeddings [B, D]. ``all_*``: the gathered batch
    [world * B, D] (defaults to the local one). With ``local_loss`` each process scores only its own rows
    against every column (the paper's sharded similarity: [B, world * B] logits), so its positives sit at
    ``rank * B + arange(B)``; without it every process scores the whole [world * B, world * B] matrix.
    Either way, once DDP averages gradients they equal one process's on the global batch: the gather's
    backward sums every rank's share into each rank's own rows.
    """
    all_image = image if all_image is None else all_image
    all_text = text if all_text is None else all_text
    if not local_loss:
        image, text, rank = all_image, all_text, 0
    labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
    logits_per_image = logit_scale * image @ all_text.T  # [B, world * B]
    logits_per_text = logit_scale * text @ all_image.T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


PROJECTIONS = ("linear", "affine", "mlp")


def make_projection(kind: str, width: int, embed_dim: int) -> nn.Module:
    """The paper's linear projection (no bias); ``affine``, a linear with a bias: the output projection of the
    attention pool that ends OpenAI's ResNets (imported ones); or a 2-layer MLP (SimCLR-style) for the paper's
    comparison."""
    if kind in ("linear", "affine"):
        return nn.Linear(width, embed_dim, bias=kind == "affine")
    if kind == "mlp":
        return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, embed_dim, bias=False))
    raise ValueError(f"unknown projection {kind!r}: choose from {', '.join(PROJECTIONS)}")


class Contrastive(Objective):
    """Image and text towers, linear projections (no bias) into a joint space, learnable temperature.

    The temperature is log-parameterised and initialised to 0.07 (logit scale ln(1/0.07) ≈ 2.659);
    ``after_optimizer_step`` clamps it in place so logits are never scaled by more than ``max_logit_scale``,
    as in the paper and open_clip (clamping in the forward pass would stop its gradient instead).
    ``local_loss`` (default, the paper's) scores each process's rows against the gathered batch.
    ``image_projection`` overrides ``projection`` on the image side.
    """

    batch_coupled = True  # every sample is every other's negative: see accumulated_backward

    def __init__(self, image_tower: nn.Module, text_tower: nn.Module, embed_dim: int = 128,
                 init_temperature: float = 0.07, max_logit_scale: float = 100.0, learn_temperature: bool = True,
                 projection: str = "linear", local_loss: bool = True, image_projection: str | None = None) -> None:
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_proj = make_projection(image_projection or projection, image_tower.width, embed_dim)
        self.text_proj = make_projection(projection, text_tower.width, embed_dim)
        # learn_temperature=False keeps it at init_temperature: the ablation the paper argues against
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)), requires_grad=learn_temperature)
        self.max_log_scale = math.log(max_logit_scale)
        self.local_loss = local_loss

    @property
    def arm(self) -> str:
        return f"contrastive ({getattr(self.text_tower, 'kind', type(self.text_tower).__name__)} text)"

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image_tower(images)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text_tower(input_ids, attention_mask)), dim=-1)

    def embed(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, D]`` normalised image and text embeddings of a batch."""
        return self.encode_image(batch["images"]), self.encode_text(batch["input_ids"], batch["attention_mask"])

    def loss_of_embeddings(self, image: torch.Tensor, text: torch.Tensor, gather: Gather | None = None):
        scale = self.logit_scale.exp()
        if gather is None:
            loss = contrastive_loss(image, text, scale)
        else:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            loss = contrastive_loss(image, text, scale, gather(image), gather(text), rank, self.local_loss)
        return loss, {"logit_scale": scale.detach(), "temperature": 1.0 / scale.detach()}

    def loss(self, batch, gather: Gather | None = None):
        return self.loss_of_embeddings(*self.embed(batch), gather)

    def accumulated_backward(self, batch, chunks: int, backward: Backward, gather: Gather | None = None):
        """Gradients of the loss over the whole batch, holding the activations of one chunk at a time (GradCache).

        A no-grad pass caches every chunk's embeddings; the loss over the cached batch gives the gradient with
        respect to each embedding (and the temperature); each chunk is then recomputed with grad and
        backpropagates ``sum(embedding * its gradient)``, which by the chain rule adds exactly its share of the
        full-batch gradient. Under mixed precision the cached loss runs in float32 with autocast off. The RNG
        state of the first pass is replayed, so dropout masks agree, and batch-norm running statistics are
        updated by the second pass only. Batch norm itself normalises each micro-batch
        by its own statistics (as DDP does per process), so only towers without it (the paper's ViT, layer norm
        throughout) give exactly the full batch's gradients.
        """
        parts = split_batch(batch, chunks)
        states, images, texts = [], [], []
        with torch.no_grad(), running_stats_kept(self):
            for part in parts:
                states.append(rng_state())
                image, text = self.embed(part)
                images.append(image)
                texts.append(text)
        # the loss over the cached batch in at least float32, outside autocast (under 16-mixed its matmul would run
        # in float16); unscaled: its gradients reach the parameters through ``backward``, which scales them as the
        # step's other backward passes (Lightning's manual_backward: the grad scaler's factor)
        image, text = (torch.cat(x).to(torch.promote_types(x[0].dtype, torch.float32)).requires_grad_()
                       for x in (images, texts))
        with torch.autocast(image.device.type, enabled=False):
            loss, logs = self.loss_of_embeddings(image, text, gather)
            wrt = [image, text] + ([self.logit_scale] if self.logit_scale.requires_grad else [])
            grads = torch.autograd.grad(loss, wrt)
        sizes = [len(x) for x in images]
        image_grads, text_grads = grads[0].split(sizes), grads[1].split(sizes)
        for i, part in enumerate(parts):  # replaying the last chunk leaves the generators where one pass would
            set_rng_state(states[i])
            image, text = self.embed(part)
            surrogate = (image * image_grads[i]).sum() + (text * text_grads[i]).sum()
            if i == len(parts) - 1 and len(grads) == 3:
                surrogate = surrogate + self.logit_scale * grads[2]  # the temperature's gradient, once
            backward(surrogate)
        return loss.detach(), logs

    def class_embeddings(self, prompts: dict[str, torch.Tensor], text_batch_size: int | None = None) -> torch.Tensor:
        """``[C, T, L]`` prompts -> ``[C, D]``: mean of normalised prompt embeddings, renormalised (ensembling, as
        open_clip's ``zero_shot_classifier``). The ``C x T`` prompts go through the text tower once, in chunks of
        ``text_batch_size`` (all at once if None): 1,000 classes x 80 templates is 80k prompts. Padding columns that
        no prompt reaches are dropped first (prompts are short; right padding is masked, so nothing changes)."""
        c, t, length = prompts["input_ids"].shape
        keep = int(prompts["attention_mask"].sum(-1).max())
        ids = prompts["input_ids"].reshape(c * t, length)[:, :keep]
        mask = prompts["attention_mask"].reshape(c * t, length)[:, :keep]
        step = text_batch_size or c * t
        flat = torch.cat([self.encode_text(ids[i:i + step], mask[i:i + step]) for i in range(0, c * t, step)])
        return F.normalize(flat.reshape(c, t, -1).mean(1), dim=-1)

    def zero_shot_classifier(self, prompts, text_batch_size: int | None = None) -> torch.Tensor:
        return self.class_embeddings(prompts, text_batch_size)

    def zero_shot_logits(self, images, classifier):
        if isinstance(classifier, dict):  # prompts: a one-off call
            classifier = self.zero_shot_classifier(classifier)
        return self.logit_scale.exp() * self.encode_image(images) @ classifier.to(images.device).T

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.logit_scale.clamp_(0.0, self.max_log_scale)
