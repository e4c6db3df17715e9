"""The LightningModule: an objective (towers + loss), AdamW with the paper's decay rule, warm-up + cosine."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import lightning as L
import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

from clipkit.objectives import Objective


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decoupled weight decay on weights only: gains, biases and the temperature (ndim < 2) are exempt,
    as in the paper and open_clip."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  start_factor: float = 1e-3) -> SequentialLR:
    """Linear warm-up for ``warmup_steps`` then cosine decay to zero at ``total_steps`` (stepped per batch)."""
    warmup_steps = max(1, min(warmup_steps, total_steps - 1))
    return SequentialLR(optimizer, [
        LinearLR(optimizer, start_factor=start_factor, total_iters=warmup_steps),
        CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps)),
    ], milestones=[warmup_steps])


class ClipKitModule(L.LightningModule):
    """Trains any :class:`~clipkit.objectives.Objective`.

    ``optimizer`` is a partial (``_partial_: true`` in Hydra) taking parameter groups; its
    ``weight_decay`` is applied to the decayed group only. ``images_seen`` counts training images over all
    processes and is saved in checkpoints: it is the x-axis of every logged metric (the paper's Figure 2).

    ``accumulate=k`` computes each batch in k micro-batches with the objective's
    :meth:`~clipkit.objectives.Objective.accumulated_backward` (GradCache for the contrastive loss): the loss and
    its gradients stay those of the whole batch, only peak memory shrinks. It runs under Lightning's manual
    optimisation, which takes the k backward passes. ``compile=True`` compiles each part of the objective
    (towers, projections) with ``torch.compile`` in place, so checkpoints keep their parameter names.
    """

    def __init__(self, objective: Objective, optimizer: Callable[..., torch.optim.Optimizer],
                 weight_decay: float = 0.2, warmup_steps: int = 2000, accumulate: int = 1,
                 compile: bool = False) -> None:
        super().__init__()
        self.objective = objective
        self.optimizer_factory = optimizer
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        if accumulate < 1:
            raise ValueError(f"accumulate must be a positive number of micro-batches, not {accumulate}")
        if accumulate > 1 and type(objective).accumulated_backward is Objective.accumulated_backward:
            objective.accumulated_backward({}, accumulate, None)  # raises, naming what to use instead
        self.accumulate = accumulate
        self.automatic_optimization = accumulate == 1
        self.compile_parts = compile
        self.register_buffer("images_seen", torch.zeros((), dtype=torch.long), persistent=True)
        self.run_info: dict = {}  # set by fit(): resolved config, tokenizer, MLflow run; saved in every checkpoint

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # a checkpoint rebuilds its model and tokenizer by itself (clipkit eval), wherever it is copied to
        checkpoint["clipkit"] = self.run_info

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        # Lightning's default sync_grads=False would detach the other ranks' negatives.
        return self.all_gather(x, sync_grads=True).reshape(-1, *x.shape[1:])

    def configure_model(self) -> None:
        if self.compile_parts:
            for part in self.objective.children():
                part.compile()

    def on_fit_start(self) -> None:
        if self.objective.batch_coupled and self.trainer.accumulate_grad_batches > 1:
            raise ValueError(
                f"trainer.accumulate_grad_batches={self.trainer.accumulate_grad_batches} would split the contrastive "
                f"batch into separate, smaller ones (each micro-batch its own negatives): use accumulate=k instead, "
                f"which keeps data.batch_size as the contrastive batch and computes it in k micro-batches")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        gather = self._gather if self.trainer.world_size > 1 else None
        if self.automatic_optimization:
            loss, logs = self.objective.loss(batch, gather=gather)
        else:
            loss, logs = self._accumulated_step(batch, gather)
        self.images_seen += batch["images"].shape[0] * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in logs.items()})
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        self.log("images_seen", self.images_seen.float(), prog_bar=True)
        return loss

    def _accumulated_step(self, batch, gather):
        """One optimiser step over ``batch`` in ``accumulate`` backward passes (Lightning's manual optimisation:
        ``manual_backward`` applies precision scaling). DDP all-reduces once, in the last pass."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad(set_to_none=True)
        passes = 0

        def backward(surrogate: torch.Tensor) -> None:
            nonlocal passes
            passes += 1
            last = passes == self.accumulate
            block = getattr(self.trainer.strategy, "block_backward_sync", None)
            with nullcontext() if last or block is None else block():
                self.manual_backward(surrogate)

        loss, logs = self.objective.accumulated_backward(batch, self.accumulate, backward, gather)
        optimizer.step()
        scheduler.step()
        self.objective.after_optimizer_step()
        return loss, logs

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.objective.after_optimizer_step()

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(decay_groups(self.objective, self.weight_decay))
        total = self.trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ValueError("the learning-rate schedule needs a finite run: set trainer.max_steps")
        scheduler = warmup_cosine(optimizer, self.warmup_steps, int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
