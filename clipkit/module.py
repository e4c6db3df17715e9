"""The LightningModule: an objective (towers + loss), AdamW with the paper's decay rule, warm-up + cosine or
constant with cool-down, the fine-tuning knobs (layer-wise lr decay, a head lr, gradient clipping)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from contextlib import nullcontext

import lightning as L
import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
from transformers import PreTrainedModel

from clipkit.errors import TrainingDiverged
from clipkit.objectives import Objective
from clipkit.optim import layer_scales, param_groups, scale_learning_rates, warmup_constant_cooldown
from clipkit.resume import gather_objects, rng_states, set_rng_states

log = logging.getLogger(__name__)


# transformers has no no_weight_decay(): its position tables (CLIP, BERT: position_embedding(s); GPT-2: wpe) are
# what open_clip's own text tower exempts (`positional_embedding`).
POSITION_TABLE = re.compile(r"(^|\.)(wpe|position_embeddings?)$")


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters of ``model`` that get no weight decay: gains, biases and the temperature (fewer than
    2 dimensions, as in the paper and open_clip), plus what the towers exempt themselves: timm's
    ``no_weight_decay()`` (``pos_embed``, ``cls_token``, ...; names relative to the timm model) and transformers'
    position-embedding tables. Call it on the whole, unsharded model: a flat shard's shape says nothing."""
    names = {n for n, p in model.named_parameters() if p.ndim < 2}
    for prefix, m in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if callable(getattr(m, "no_weight_decay", None)):
            names |= {f"{dot}{n}" for n in m.no_weight_decay()}
        if isinstance(m, PreTrainedModel):
            names |= {f"{dot}{n}.weight" for n, sub in m.named_modules()
                      if isinstance(sub, nn.Embedding) and POSITION_TABLE.search(n)}
    return names & {n for n, _ in model.named_parameters()}


def decay_groups(model: nn.Module, weight_decay: float, exempt: set[str] | None = None) -> list[dict]:
    """AdamW's two parameter groups: decoupled weight decay on every weight, none on the names in ``exempt``
    (default: :func:`no_decay_names` of ``model`` as it is now)."""
    return param_groups(model, weight_decay, no_decay_names(model) if exempt is None else exempt)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  start_factor: float = 1e-3) -> SequentialLR:
    """Linear warm-up for ``warmup_steps`` then cosine decay to zero at ``total_steps`` (stepped per batch)."""
    warmup_steps = max(1, min(warmup_steps, total_steps - 1))
    return SequentialLR(optimizer, [
        LinearLR(optimizer, start_factor=start_factor, total_iters=warmup_steps),
        CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps)),
    ], milestones=[warmup_steps])


# module.schedule -> (optimizer, warmup_steps, total_steps, cooldown_steps) -> per-step scheduler
SCHEDULES = {
    "cosine": lambda opt, warmup, total, cooldown: warmup_cosine(opt, warmup, total),
    "constant": warmup_constant_cooldown,
}


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

    A step whose gradients hold a NaN or an infinity (on any process) is skipped: the parameters and the optimiser
    state stay as they were, and ``train/nonfinite_steps`` counts it; ``max_nonfinite_steps`` in a row stop the run
    with :class:`~clipkit.errors.TrainingDiverged`, the last checkpoint still holding good weights.

    Fine-tuning knobs (README, "Optimiser knobs for fine-tuning"), each off by default: ``layer_decay`` d < 1 multiplies the learning
    rate of tower layer ``i`` of ``L`` by ``d ** (L + 1 - i)`` (:func:`clipkit.optim.layer_scales`); ``head_lr`` is
    the learning rate of the objective's :meth:`~clipkit.objectives.Objective.new_heads`; ``schedule=constant``
    holds the learning rate after warm-up and cools it down linearly to zero over the last ``cooldown_steps``.
    Gradient clipping is the trainer's ``gradient_clip_val``; under ``accumulate>1`` (manual optimisation, where
    Lightning refuses it) the module clips itself: :meth:`clip_manually`.
    """

    def __init__(self, objective: Objective, optimizer: Callable[..., torch.optim.Optimizer],
                 weight_decay: float = 0.2, warmup_steps: int = 2000, accumulate: int = 1,
                 compile: bool = False, max_nonfinite_steps: int = 20, layer_decay: float = 1.0,
                 head_lr: float | None = None, schedule: str = "cosine", cooldown_steps: int = 0) -> None:
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
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_steps = self.nonfinite_in_a_row = 0
        # decided now, on whole parameters: a sharding strategy may have flattened or split them by the time
        # configure_optimizers runs
        self.no_decay = no_decay_names(objective)
        self.layer_scales = layer_scales(objective, layer_decay)  # by name, for the same reason
        self.heads, self.head_lr = objective.new_heads(), head_lr
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown module.schedule={schedule!r}: choose from {', '.join(SCHEDULES)}")
        self.schedule, self.cooldown_steps = schedule, cooldown_steps
        self.manual_clip: tuple[float, str] | None = None  # (value, algorithm): see clip_manually
        self.register_buffer("images_seen", torch.zeros((), dtype=torch.long), persistent=True)
        self.run_info: dict = {}  # set by fit(): resolved config, tokenizer, MLflow run; saved in every checkpoint
        self._resumed_rng: list | None = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # a checkpoint rebuilds its model and tokenizer by itself (clipkit eval), wherever it is copied to
        checkpoint["clipkit"] = self.run_info
        checkpoint["nonfinite_steps"] = [self.nonfinite_steps, self.nonfinite_in_a_row]
        # every process's generators (dropout masks, GradCache's replay): Lightning does not save them
        checkpoint["rng_states"] = gather_objects(rng_states())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning loads the weights before its precision plugin converts the module (64-true, bf16-true): float64
        # weights loaded into the float32 parameters would be rounded. Convert now, as the plugin will anyway.
        if self._trainer is not None and not self.trainer.strategy.restore_checkpoint_after_setup:
            self.trainer.precision_plugin.convert_module(self)
        self.nonfinite_steps, self.nonfinite_in_a_row = checkpoint.get("nonfinite_steps", [0, 0])
        self._resumed_rng = checkpoint.get("rng_states")

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Restored here, as late as possible: set-up after loading (worker start, the first fetch) must not move them.
        if self._resumed_rng is not None:
            set_rng_states(self._resumed_rng[self.trainer.global_rank])
            self._resumed_rng = None

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
        # new heads start from the (pretrained) model, once: not again on resume (the objective saves that it did)
        self.objective.initialise_head(self.trainer.datamodule)

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
        # float64 is exact to 2**53 (float32 only to 2**24, 16.8M images): the loggers step by this value
        self.log("images_seen", self.images_seen.double(), prog_bar=True)
        self.log("train/nonfinite_steps", float(self.nonfinite_steps))
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The NaN/Inf guard. Dropping every gradient makes the optimiser leave each parameter and its state alone
        (AdamW and SGD skip parameters without one); under 16-mixed the grad scaler skips such steps anyway."""
        # each process checks its own shards (FSDP); the decision below is shared
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in self.parameters()
                 if p.grad is not None]
        finite = not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        if not self.trainer.strategy.reduce_boolean_decision(not finite, all=False):  # every rank decides alike
            self.nonfinite_in_a_row = 0
            if self.manual_clip is not None:  # after the check: clipping a non-finite norm would spread NaN
                self.clip_gradients(optimizer, *self.manual_clip)
            return
        for p in self.parameters():
            p.grad = None
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row == 1:
            log.warning("step %d: non-finite gradients, step skipped (counted as train/nonfinite_steps)",
                        self.trainer.global_step)
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            last = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
            raise TrainingDiverged(
                f"the loss or gradients were non-finite for {self.nonfinite_in_a_row} steps in a row (up to step "
                f"{self.trainer.global_step}, {self.nonfinite_steps} in all): lower module.optimizer.lr, lengthen "
                f"module.warmup_steps, or use precision=bf16-mixed rather than 16-mixed; last checkpoint: {last}")

    def clip_manually(self, gradient_clip_val: float | None, gradient_clip_algorithm: str | None) -> dict:
        """Take over ``trainer.gradient_clip_val`` when Lightning will not clip: under manual optimisation
        (``accumulate>1``) it refuses the setting. Returns the trainer arguments that replace the config's (none
        under automatic optimisation, where Lightning clips after :meth:`on_before_optimizer_step`, as here)."""
        if self.automatic_optimization or not gradient_clip_val:
            return {}
        self.manual_clip = (gradient_clip_val, gradient_clip_algorithm or "norm")
        return {"gradient_clip_val": None}

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
        optimizer = self.optimizer_factory(param_groups(self.objective, self.weight_decay, self.no_decay,
                                                        self.layer_scales, self.heads, self.head_lr))
        scale_learning_rates(optimizer)
        total = self.trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ValueError("the learning-rate schedule needs a finite run: set trainer.max_steps")
        scheduler = SCHEDULES[self.schedule](optimizer, self.warmup_steps, int(total), self.cooldown_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
