"""One training step under real FSDP2 (gloo, CPU), launched by tests/test_fsdp.py with torchrun: two processes on
one node, or one process on each of two "nodes" (two torchrun invocations, ``trainer.num_nodes=2``).

Usage: torchrun ... tests/fsdp_worker.py OUT_DIR OVERRIDE...
Each rank trains on its share of one fixed global batch through the real config's ``trainer=fsdp`` and
``ClipKitModule``; rank 0 saves the initial weights, the global batch, the rank-averaged loss, every parameter's
whole gradient as the optimiser sees it (gathered from the shards) and the optimiser's decay groups by name.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from torch.distributed.tensor import DTensor

from clipkit.config import compose_config
from tests.conftest import random_batch
from tests.ddp_worker import GLOBAL_BATCH, Capture, one_step


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class WholeGrads(Capture):
    """:class:`Capture`, gathering each sharded gradient (a collective: every rank runs it) and the decay groups."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = {n: whole(p.grad).detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.groups = [(g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in optimizer.param_groups]
        self.sharded = sorted(n for n, p in pl_module.named_parameters() if isinstance(p, DTensor))


def main(out: Path, overrides: list[str]) -> None:
    # Lightning's ModelParallelStrategy refuses precision=64-true by name (FSDP2 itself shards float64 fine): the
    # module and the batch are made float64 here, under a precision setting that leaves them as they are.
    cfg = compose_config([*overrides, "precision=32-true", "trainer=fsdp", "trainer.accelerator=cpu",
                          "trainer.max_steps=1", "~logger", "~callbacks", "+trainer.enable_checkpointing=false"])
    torch.manual_seed(0)
    module = instantiate(cfg.module).double()
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    batch = random_batch(GLOBAL_BATCH, seed=1, vocab=cfg.model.text.config.vocab_size, dtype=torch.float64)
    capture = WholeGrads()
    rank, world = one_step(cfg, module, batch, capture)
    if rank == 0:
        torch.save({"initial": initial, "batch": batch, "loss": capture.loss, "grads": capture.grads, "world": world,
                    "groups": capture.groups, "sharded": capture.sharded}, out / "result.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
