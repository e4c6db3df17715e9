"""The fine-tuning recipe's optimiser pieces: layer-wise learning-rate decay over both towers, a learning rate of its
own for new heads, parameter groups keyed by (learning rate, weight decay), and the constant-with-cool-down schedule.

Layer-wise decay is written here once for both towers rather than taken from timm's ``param_groups_layer_decay``:
that one groups timm models only (through their ``group_matcher``), transformers has no equivalent, and a text tower
decayed by another rule than the image tower would make ``module.layer_decay`` mean two things. The one rule reads
each tower's ``blocks()`` (the same block order that locking and FSDP use) and registration order, which is forward
order in timm's and transformers' models (``clipkit.models.locking`` relies on it too).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.lr_scheduler import ConstantLR, LinearLR, SequentialLR

from clipkit.models.locking import LockableTower


def layer_ids(tower: LockableTower) -> tuple[dict[str, int], int]:
    """Each parameter name of ``tower`` (relative to it) -> its layer id, and the tower's depth ``L``: the BEiT/timm
    numbering, 0 for everything registered before the first block (stem, patch and token embeddings, position
    tables, class token), ``i`` for block ``i`` (1..L), ``L + 1`` for everything after the last block (final norms,
    pooling heads). A parameter between two blocks (a CNN stage's down-sampling) belongs to the block it feeds."""
    blocks = tower.blocks()
    depth = len(blocks)
    in_block = {id(p): i for i, block in enumerate(blocks, 1) for p in block.parameters()}
    ids, last = {}, 0  # last: the block of the latest block parameter seen
    for name, p in tower.named_parameters():
        if id(p) in in_block:
            last = in_block[id(p)]
            ids[name] = last
        else:
            ids[name] = 0 if last == 0 else last + 1
    return ids, depth


def layer_scales(model: nn.Module, decay: float) -> dict[str, float]:
    """Learning-rate multipliers ``decay ** (L + 1 - layer_id)`` of the parameters of every tower in ``model`` (names
    relative to ``model``), each tower by its own depth ``L``; parameters outside the towers (projections, heads,
    the temperature) are absent, i.e. scale 1. Empty when ``decay`` is 1 (off)."""
    if decay == 1.0:
        return {}
    scales: dict[str, float] = {}
    done: list[str] = []  # a tower inside a tower is decayed by the outer one's rule
    for prefix, tower in model.named_modules():
        if not isinstance(tower, LockableTower) or is_under(prefix, done):
            continue
        done.append(prefix)
        ids, depth = layer_ids(tower)
        dot = f"{prefix}." if prefix else ""
        scales.update({f"{dot}{name}": decay ** (depth + 1 - i) for name, i in ids.items()})
    return scales


def is_under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in prefixes)


def param_groups(model: nn.Module, weight_decay: float, exempt: set[str], scales: dict[str, float] | None = None,
                 heads: list[str] | tuple = (), head_lr: float | None = None) -> list[dict]:
    """AdamW's parameter groups, one per (learning rate, weight decay): weight decay on every weight but the names
    in ``exempt``; layer-decay multiplier ``scales[name]`` kept as the group's ``lr_scale`` (applied to the
    optimiser's learning rate once it is built, :func:`scale_learning_rates`); parameters under the ``heads``
    prefixes take ``head_lr`` (when set) and no layer decay. The first two groups are always the base ones (scale 1,
    with and without decay), so with no decay, no head lr, they are the paper's two groups exactly."""
    scales = scales or {}
    groups: dict[tuple, dict] = {}
    for key in ((None, 1.0, weight_decay), (None, 1.0, 0.0)):
        groups[key] = {"params": [], "weight_decay": key[2]}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = is_under(name, list(heads))
        lr = head_lr if head else None
        scale = 1.0 if head else scales.get(name, 1.0)
        key = (lr, scale, 0.0 if name in exempt else weight_decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": key[2]}
            if lr is not None:
                groups[key]["lr"] = lr
            if scale != 1.0:
                groups[key]["lr_scale"] = scale
        groups[key]["params"].append(p)
    base = list(groups.values())[:2]
    return base + [g for g in list(groups.values())[2:] if g["params"]]


def scale_learning_rates(optimizer: torch.optim.Optimizer) -> None:
    """Each group's ``lr`` times its ``lr_scale``, before any scheduler is built: schedulers scale each group's
    initial learning rate (``initial_lr``), so the layer-wise ratios hold at every step."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_scale", 1.0)


def warmup_constant_cooldown(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                             cooldown_steps: int, start_factor: float = 1e-3) -> SequentialLR:
    """Linear warm-up for ``warmup_steps``, the base learning rate held, then a linear cool-down to zero over the
    last ``cooldown_steps`` (Zhai et al. 2022; Hägele et al. 2024, who find ~20% of the run enough to match cosine):
    the run's length need not be fixed in advance, only the cool-down's. Stepped per batch; a warm-up that would
    run into the cool-down is shortened to fit."""
    cooldown = max(0, min(cooldown_steps, total_steps - 1))
    warmup = max(1, min(warmup_steps, total_steps - cooldown))
    flat = total_steps - warmup - cooldown
    phases = [LinearLR(optimizer, start_factor=start_factor, total_iters=warmup)]
    if flat > 0:
        phases.append(ConstantLR(optimizer, factor=1.0, total_iters=flat))
    if cooldown:
        phases.append(LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=cooldown))
    milestones = [warmup, warmup + flat][:len(phases) - 1]
    return SequentialLR(optimizer, phases, milestones=milestones)
