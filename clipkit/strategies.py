"""FSDP that shards each transformer block of both towers, whatever the towers are."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers import PreTrainedModel


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


class BlockFSDP(FSDPStrategy):
    """Lightning's :class:`FSDPStrategy`, wrapping every block :func:`block_types` finds in its own FSDP unit
    (so parameters are gathered one block at a time), unless an ``auto_wrap_policy`` is given. The policy is
    made at set-up because it depends on the model the config built, not on the strategy's config."""

    def setup(self, trainer: L.Trainer) -> None:
        if "auto_wrap_policy" not in self.kwargs:
            blocks = block_types(self.lightning_module)
            if not blocks:
                raise ValueError("FSDP found no transformer blocks to wrap in this model: pass "
                                 "trainer.strategy.auto_wrap_policy explicitly")
            self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(blocks)
        super().setup(trainer)
