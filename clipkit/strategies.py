"""Fully sharded training on FSDP2 (``torch.distributed.fsdp.fully_shard``): each transformer block of both towers
its own unit, whatever the towers are; the same code on GPUs (NCCL) and on CPUs (gloo)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.constants import default_pg_timeout
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

# The objective's entry points that Lightning calls instead of forward(): FSDP2 gathers the root unit's own
# parameters (projections, embeddings) around them as it does around forward().
FORWARD_METHODS = ("loss",)


def block_types(model: nn.Module) -> set[type[nn.Module]]:
    """The classes of the repeated blocks inside ``model``: what each tower declares (``ImageTower.block_types``
    from timm's block stack; transformers' own ``_no_split_modules`` for every Hugging Face model)."""
    found: set[type[nn.Module]] = set()
    for m in model.modules():
        if callable(getattr(m, "block_types", None)):
            found |= m.block_types()
        if isinstance(m, PreTrainedModel):
            names = set(m._no_split_modules or ())
            found |= {type(sub) for sub in m.modules() if type(sub).__name__ in names}
    return found


def shard(module: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool = True) -> list[nn.Parameter]:
    """Apply ``fully_shard`` to every block :func:`block_types` finds, then to each child of ``module`` (the
    objective) as the root unit holding the rest. Parameters become DTensors that keep their logical shapes.

    FSDP2 cannot shard a scalar (the temperature ``logit_scale`` is one): scalars stay whole on every process, and
    are returned so that their gradients can be averaged like DDP's (:meth:`BlockFSDP.post_backward`)."""
    blocks = tuple(block_types(module))
    if not blocks:
        raise ValueError("trainer=fsdp found no transformer blocks to shard in this model: use trainer=ddp")
    for m in reversed(list(module.modules())):  # FSDP2 wants inner units sharded before the units around them
        if isinstance(m, blocks):
            fully_shard(m, mesh=mesh, reshard_after_forward=reshard_after_forward)
    scalars: list[nn.Parameter] = []
    for child in module.children():
        if not any(True for _ in child.parameters()):
            continue
        kept = {p for p in child.parameters() if p.ndim == 0 and not isinstance(p, DTensor)}
        fully_shard(child, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=kept)
        for name in FORWARD_METHODS:
            if callable(getattr(child, name, None)):
                register_fsdp_forward_method(child, name)
        scalars += [p for p in kept if p.requires_grad]
    return scalars


def _outermost_units(module: nn.Module) -> list[FSDPModule]:
    """The FSDP units of ``module`` that sit in no other unit (parents come before children in named_modules)."""
    units: dict[str, nn.Module] = {}
    for name, m in module.named_modules():
        if isinstance(m, FSDPModule) and not any(outer == "" or name.startswith(f"{outer}.") for outer in units):
            units[name] = m
    return list(units.values())


@contextmanager
def full_params(module: nn.Module) -> Iterator[None]:
    """Whole parameters in the root FSDP units of ``module`` while inside, for code that calls the objective
    outside Lightning's step (mid-run zero-shot evaluation): the blocks gather their own in their forward hooks.
    Does nothing for a module that is not sharded (one process, DDP, DeepSpeed)."""
    units = _outermost_units(module)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def refuse_gradient_cache(accumulate: int) -> None:
    """``accumulate=k`` (GradCache) calls backward inside the objective's ``accumulated_backward``, between FSDP2's
    gathers of the root unit: not supported yet."""
    if accumulate > 1:
        raise ValueError(f"accumulate={accumulate} does not run under trainer=fsdp yet: use trainer=ddp with "
                         f"accumulate, or a smaller data.batch_size with trainer=fsdp")


class BlockFSDP(ModelParallelStrategy):
    """FSDP2 through Lightning's :class:`ModelParallelStrategy`, with the sharding of :func:`shard`.

    ``ModelParallelStrategy`` already does what FSDP2 needs from Lightning (process group on any device type,
    device mesh, model set up before the optimiser, full or distributed checkpoints, resume). What this adds: all
    processes form one data-parallel mesh dimension (the parent's ``auto`` puts a node's processes on tensor
    parallelism), the blocks are found in whatever the config built (the module needs no FSDP code), and checkpoints
    are one full state dict on rank 0 (``clipkit eval`` reads it on one device, as any other checkpoint)."""

    def __init__(self, reshard_after_forward: bool = True, process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout, accumulate: int = 1) -> None:
        refuse_gradient_cache(accumulate)  # told by the config, so the refusal comes before anything starts
        super().__init__(save_distributed_checkpoint=False, process_group_backend=process_group_backend,
                         timeout=timeout)
        self.reshard_after_forward = reshard_after_forward
        self._replicated: list[nn.Parameter] = []

    def setup_environment(self) -> None:
        self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()

    def setup(self, trainer: L.Trainer) -> None:
        refuse_gradient_cache(getattr(self.lightning_module, "accumulate", 1))
        self._replicated = shard(self.lightning_module, self.device_mesh["data_parallel"], self.reshard_after_forward)
        super().setup(trainer)

    def post_backward(self, closure_loss: torch.Tensor) -> None:
        """Average the unsharded scalars' gradients over processes (FSDP averages the sharded ones)."""
        super().post_backward(closure_loss)
        for p in self._replicated:
            if p.grad is not None:
                dist.all_reduce(p.grad)  # gloo has no AVG
                p.grad /= dist.get_world_size()
