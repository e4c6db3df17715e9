"""One training step under real 2-process DDP (gloo, CPU), launched by tests/test_distributed.py with torchrun.

Usage: torchrun --nproc_per_node 2 tests/ddp_worker.py OUT_DIR OVERRIDE...
Each rank trains on its half of one fixed global batch, through the real config's ``trainer=ddp`` and
``ClipKitModule``, for each variant below; rank 0 saves the initial weights, the global batch, the loss
averaged over ranks and every parameter's gradient as the optimiser sees it (after DDP's all-reduce).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from clipkit.config import compose_config
from tests.conftest import random_batch

VARIANTS = {"local_loss": ["objective.local_loss=true"], "global_loss": ["objective.local_loss=false"],
            "accumulate": ["objective.local_loss=true", "accumulate=2"]}
GLOBAL_BATCH = 8


class Capture(L.Callback):
    """Records the rank-averaged loss and the gradients the optimiser is about to apply."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}
        self.loss: float | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.loss = trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean").item()


def one_step(cfg, module: L.LightningModule, batch: dict, capture: Capture) -> tuple[int, int]:
    """One optimiser step of ``cfg.trainer`` on this rank's share of the global ``batch``: (rank, world size)."""
    trainer = instantiate(cfg.trainer, callbacks=[capture], logger=False, use_distributed_sampler=False)
    rank, world = trainer.global_rank, trainer.world_size
    share = GLOBAL_BATCH // world
    mine = {k: v[rank * share:(rank + 1) * share] for k, v in batch.items()}
    trainer.fit(module, train_dataloaders=DataLoader([mine], batch_size=None))
    return rank, world


def main(out: Path, overrides: list[str]) -> None:
    for name, variant in VARIANTS.items():
        cfg = compose_config([*overrides, *variant, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                              "trainer.max_steps=1", "~logger", "~callbacks", "+trainer.enable_checkpointing=false"])
        torch.manual_seed(0)
        module = instantiate(cfg.module)
        initial = {k: v.clone() for k, v in module.state_dict().items()}
        batch = random_batch(GLOBAL_BATCH, seed=1, vocab=cfg.model.text.config.vocab_size)
        capture = Capture()
        rank, world = one_step(cfg, module, batch, capture)
        if rank == 0:
            torch.save({"initial": initial, "batch": batch, "loss": capture.loss, "grads": capture.grads,
                        "world": world}, out / f"{name}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
