"""Counts skipped and repaired samples, warns once per kind, logs them, and stops a run whose data is bad.

Batches from :mod:`datamodules.stream` carry ``data_stats`` (counts since the reader's previous batch);
this callback takes them out of the batch before the objective sees it.
"""

from __future__ import annotations

import logging
from collections import Counter

import lightning as L
import torch

from clipkit.errors import DataError
from clipkit.resume import gather_objects
from datamodules.decode import REPAIR_KINDS, SKIP_KINDS

log = logging.getLogger(__name__)


class DataHealth(L.Callback):
    """``max_skip_ratio``: fraction of skipped samples (of all read) that stops the run, checked once
    ``min_samples`` have been read, with an error naming the worst shards (each process checks what it read).
    Metrics, against images seen: ``data/skipped/<kind>``, ``data/repaired/<kind>`` (cumulative, summed over
    processes) and ``data/skip_ratio``."""

    def __init__(self, max_skip_ratio: float = 0.05, min_samples: int = 1000, log_every_n_steps: int = 50) -> None:
        self.max_skip_ratio, self.min_samples, self.log_every_n_steps = max_skip_ratio, min_samples, log_every_n_steps
        self.good, self.skipped, self.repaired, self.bad_shards = 0, Counter(), Counter(), Counter()
        self.warned: set[str] = set()
        self._dirty = False
        self._loaded: list | None = None  # every rank's counts from a checkpoint, taken up at fit start

    @property
    def read(self) -> int:
        return self.good + sum(self.skipped.values())

    def update(self, stats: dict) -> None:
        self.good += stats["samples"]
        self.skipped.update(stats["skipped"])
        self.repaired.update(stats["repaired"])
        self.bad_shards.update(stats["bad_shards"])
        self._dirty |= bool(stats["skipped"] or stats["repaired"])
        for kind, example in stats["examples"].items():
            if kind not in self.warned:
                self.warned.add(kind)
                log.warning("data: skipping %s samples (%s), e.g. %s; further ones are counted as "
                            "data/skipped/%s, not reported", kind, SKIP_KINDS[kind], example, kind)
        for kind in stats["repaired"]:
            if kind not in self.warned:
                self.warned.add(kind)
                log.warning("data: repairing %s images (%s); counted as data/repaired/%s", kind, REPAIR_KINDS[kind], kind)

    def check(self) -> None:
        skipped = sum(self.skipped.values())
        if self.read < self.min_samples or skipped <= self.max_skip_ratio * self.read:
            return
        worst = ", ".join(f"{shard} ({n} bad)" for shard, n in self.bad_shards.most_common(3))
        kinds = ", ".join(f"{k} {n}" for k, n in self.skipped.most_common())
        raise DataError(f"skipped {skipped} of {self.read} samples ({skipped / self.read:.1%}, more than "
                        f"callbacks.data_health.max_skip_ratio={self.max_skip_ratio:g}): {kinds}; "
                        f"worst shards: {worst}. Fix or drop those shards, or raise the ratio")

    def counts(self, trainer: L.Trainer | None = None, device=None) -> tuple[float, dict, dict]:
        """Good samples, skips and repairs by kind, summed over the trainer's processes (a collective: every rank
        calls it); this process's alone without a trainer."""
        if trainer is None or trainer.world_size == 1:
            return self.good, dict(self.skipped), dict(self.repaired)
        local = [self.good, *(self.skipped[k] for k in SKIP_KINDS), *(self.repaired[k] for k in REPAIR_KINDS)]
        total = trainer.strategy.reduce(torch.tensor(local, dtype=torch.float64, device=device), reduce_op="sum")
        good, *rest = total.tolist()
        skipped, repaired = rest[:len(SKIP_KINDS)], rest[len(SKIP_KINDS):]
        return (good, {k: n for k, n in zip(SKIP_KINDS, skipped, strict=True) if n},
                {k: n for k, n in zip(REPAIR_KINDS, repaired, strict=True) if n})

    def metrics(self, trainer: L.Trainer | None = None, device=None) -> dict[str, float]:
        good, skipped, repaired = self.counts(trainer, device)
        out = {f"data/skipped/{k}": float(n) for k, n in skipped.items()}
        out.update({f"data/repaired/{k}": float(n) for k, n in repaired.items()})
        out["data/skip_ratio"] = sum(skipped.values()) / max(good + sum(skipped.values()), 1)
        return out

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = self.metrics(trainer, pl_module.device)
        seen = int(getattr(pl_module, "images_seen", trainer.global_step))
        for logger in trainer.loggers:
            logger.log_metrics({**metrics, "images_seen": seen}, step=seen)
        self._dirty = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        stats = batch.pop("data_stats", None) if isinstance(batch, dict) else None
        if stats is None:
            return
        self.update(stats)
        self.check()
        # with several processes every rank takes part in the sum, dirty or not
        if (self._dirty or trainer.world_size > 1) and trainer.global_step % self.log_every_n_steps == 0:
            self._log(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.read or trainer.world_size > 1:
            self._log(trainer, pl_module)

    def state_dict(self) -> dict:
        """Every process's counts (each counts what it read), so a resumed run sums the same totals."""
        own = {"good": self.good, "skipped": dict(self.skipped), "repaired": dict(self.repaired),
               "bad_shards": dict(self.bad_shards)}
        return {"ranks": gather_objects(own)}

    def load_state_dict(self, state: dict) -> None:
        self._loaded = state["ranks"]

    def on_fit_start(self, trainer, pl_module) -> None:
        if self._loaded is None:
            return
        own = self._loaded[trainer.global_rank]
        self.good = own["good"]
        self.skipped, self.repaired = Counter(own["skipped"]), Counter(own["repaired"])
        self.bad_shards = Counter(own["bad_shards"])
        self._loaded = None
