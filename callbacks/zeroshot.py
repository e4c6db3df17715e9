"""Zero-shot classification and image↔text retrieval on the datamodule's held-out sets, during training."""

from __future__ import annotations

import logging
import time

import lightning as L
import torch

from clipkit.evaluation import recall_at_k, topk_accuracy
from clipkit.evaluation.suite import scores
from clipkit.strategies import full_params

log = logging.getLogger(__name__)


class ZeroShotEvaluation(L.Callback):
    """Every ``every_n_steps`` optimiser steps and at the end of training, score the held-out sets that the
    datamodule offers (``zeroshot_sets()``, ``retrieval_sets()``) through ``objective.zero_shot_logits``.

    Logs ``zeroshot/<set>/top1|top5``, ``zeroshot/mean_top1`` (over the sets: what the best checkpoint is kept
    by) and ``retrieval/<set>/image_to_text_r1|r5`` (and text_to_image) against images seen. Works for any objective: it never asks which one it is scoring.
    """

    def __init__(self, every_n_steps: int = 250, batch_size: int = 512) -> None:
        self.every_n_steps, self.batch_size = every_n_steps, batch_size
        self.last_step = -1
        self.results: dict[str, float] = {}
        self.seconds = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self.last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self.last_step:
            self.evaluate(trainer, pl_module)

    def _scores(self, objective, images: torch.Tensor, prompts: dict, device) -> torch.Tensor:
        return scores(objective, images, prompts, device, self.batch_size)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        start = time.perf_counter()
        self.last_step = trainer.global_step
        datamodule, objective, device = trainer.datamodule, pl_module.objective, pl_module.device
        was_training = objective.training
        objective.eval()
        metrics: dict[str, float] = {}
        with full_params(pl_module), trainer.precision_plugin.forward_context():  # FSDP: the root units whole
            for zs in datamodule.zeroshot_sets():
                acc = topk_accuracy(self._scores(objective, zs.images, zs.prompts, device), zs.labels)
                metrics.update({f"zeroshot/{zs.name}/{k}": v for k, v in acc.items()})
            for rs in datamodule.retrieval_sets() if objective.reads_text else []:
                scores = self._scores(objective, rs.images, rs.prompts, device)  # [images, captions]
                for direction, s, pos in (("image_to_text", scores, rs.positives),
                                          ("text_to_image", scores.T, rs.positives.T)):
                    metrics.update({f"retrieval/{rs.name}/{direction}_{k}": v for k, v in recall_at_k(s, pos).items()})
        objective.train(was_training)
        top1 = [v for k, v in metrics.items() if k.startswith("zeroshot/") and k.endswith("/top1")]
        if top1:  # one number to keep the best checkpoint by (callbacks.best)
            metrics["zeroshot/mean_top1"] = sum(top1) / len(top1)
        seen = int(pl_module.images_seen)
        for logger in trainer.loggers:
            logger.log_metrics({**metrics, "images_seen": seen}, step=seen)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        self.results = {**metrics, "images_seen": seen}
        self.seconds += time.perf_counter() - start
        if trainer.is_global_zero:
            headline = ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k.endswith(("top1", "_r1")))
            log.info("zero-shot after %d images: %s", seen, headline)
        return metrics
