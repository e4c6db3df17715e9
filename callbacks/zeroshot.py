"""Zero-shot classification and image↔text retrieval on the datamodule's held-out sets, during training."""

from __future__ import annotations

import logging
import time

import lightning as L
import torch

from clipkit.evaluation import retrieval_report, topk_accuracy
from clipkit.evaluation.suite import gather_rows, rank_rows, scores
from clipkit.strategies import full_params

log = logging.getLogger(__name__)


def mean_top1(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """``{prefix + "mean_top1": ...}``, the mean of the ``<prefix><set>/top1`` entries (none if there are none)."""
    top1 = [v for k, v in metrics.items() if k.startswith(prefix) and k.endswith("/top1")]
    return {f"{prefix}mean_top1": sum(top1) / len(top1)} if top1 else {}


class ZeroShotEvaluation(L.Callback):
    """Every ``every_n_steps`` optimiser steps and at the end of training, score the held-out sets that the
    datamodule offers through the objective's one interface (``zero_shot_classifier``, once per set, then
    ``zero_shot_logits`` per ``batch_size`` images); it never asks which objective it is scoring.

    Validation (``validation_sets()``, drawn apart from every reported set): ``val/zeroshot/<set>/top1|top5`` and
    ``val/zeroshot/mean_top1``, what the best checkpoint is chosen by. Test (the reported sets, ``zeroshot_sets()``,
    ``retrieval_sets()``): ``zeroshot/<set>/top1|top5``, ``zeroshot/mean_top1`` and
    ``retrieval/<set>/image_to_text_r1|r5`` (and text_to_image), all against images seen.

    Under DDP each rank scores its share of every set's images and the scores are gathered, so N ranks do the
    image work of one; every rank builds the (small) classifier itself.
    """

    def __init__(self, every_n_steps: int = 250, batch_size: int = 512, text_batch_size: int | None = 1024) -> None:
        self.every_n_steps, self.batch_size, self.text_batch_size = every_n_steps, batch_size, text_batch_size
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

    def _scores(self, trainer, pl_module, images: torch.Tensor, prompts: dict) -> torch.Tensor:
        """``[N, C]`` scores of a whole set, this rank scoring only its share of the images."""
        objective, device, world = pl_module.objective, pl_module.device, trainer.world_size
        if world == 1:
            return scores(objective, images, prompts, device, self.batch_size, self.text_batch_size)
        mine = images[rank_rows(len(images), trainer.global_rank, world)]
        local = scores(objective, mine, prompts, device, self.batch_size, self.text_batch_size).to(device)
        return gather_rows(local, len(images), world, pl_module.all_gather).cpu()

    def _classification(self, trainer, pl_module, sets, prefix: str) -> dict[str, float]:
        metrics = {}
        for zs in sets:
            acc = topk_accuracy(self._scores(trainer, pl_module, zs.images, zs.prompts), zs.labels)
            metrics.update({f"{prefix}{zs.name}/{k}": v for k, v in acc.items()})
        return {**metrics, **mean_top1(metrics, prefix)}

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        start = time.perf_counter()
        self.last_step = trainer.global_step
        datamodule, objective = trainer.datamodule, pl_module.objective
        was_training = objective.training
        objective.eval()
        metrics: dict[str, float] = {}
        with full_params(pl_module), trainer.precision_plugin.forward_context():  # FSDP: the root units whole
            metrics.update(self._classification(trainer, pl_module, datamodule.validation_sets(), "val/zeroshot/"))
            metrics.update(self._classification(trainer, pl_module, datamodule.zeroshot_sets(), "zeroshot/"))
            for rs in datamodule.retrieval_sets() if objective.reads_text else []:
                s = self._scores(trainer, pl_module, rs.images, rs.prompts)  # [images, captions]
                report = retrieval_report(s, rs.positives, ks=(1, 5))  # both directions, as clipkit eval
                metrics.update({f"retrieval/{rs.name}/{k}": v for k, v in report.items()})
        objective.train(was_training)
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
