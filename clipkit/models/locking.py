"""Locked-tower tuning (LiT, Zhai et al. 2022): a tower frozen except its last few blocks.

Written by hand: timm's ``group_matcher`` groups only timm models, transformers has no freezing helper, and one
rule should hold for both towers. The rule: freeze every parameter registered before the first of the last
``unlocked_layers`` blocks, train it and everything after it (the final norm, the pooling head). Registration
order is forward order in timm's and transformers' models.
"""

from __future__ import annotations

from torch import nn


def freeze(module: nn.Module, blocks: list[nn.Module], unlocked_layers: int) -> None:
    """Freeze ``module`` but its last ``unlocked_layers`` of ``blocks`` (in forward order) and what follows them.
    Frozen parameters get no gradient, so the optimiser holds no state for them."""
    if not 0 <= unlocked_layers <= len(blocks):
        raise ValueError(f"unlocked_layers={unlocked_layers}, but this tower has {len(blocks)} blocks: "
                         f"choose 0 (all locked) to {len(blocks)}")
    first = next(blocks[-unlocked_layers].parameters()) if unlocked_layers else None
    trainable = False
    for p in module.parameters():
        trainable = trainable or p is first
        p.requires_grad_(trainable)


def freeze_modes(module: nn.Module) -> None:
    """Put every sub-module whose parameters are all frozen in eval mode: batch-norm statistics stay those
    loaded, and dropout and stochastic depth stay off, in the locked part."""
    for m in module.modules():
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()


class LockableTower(nn.Module):
    """A tower (``model`` plus ``blocks()`` in forward order) that :meth:`lock` freezes; its ``train()`` keeps the
    locked part in eval mode."""

    locked = False

    def blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def lock(self, unlocked_layers: int = 0) -> None:
        freeze(self.model, self.blocks(), unlocked_layers)
        self.locked = True
        freeze_modes(self)  # Lightning does not call train() before fitting: a module starts in train mode

    def train(self, mode: bool = True) -> LockableTower:
        super().train(mode)
        if self.locked and mode:
            freeze_modes(self)
        return self
