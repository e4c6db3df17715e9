"""Exports the final weights as self-describing safetensors and records them in MLflow."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from clipkit.models.lora import has_adapters, merged_weights
from clipkit.weights import export_weights


class ExportWeights(L.Callback):
    """At the end of training, ``path`` gets the model's weights as safetensors with the run's config and tokenizer
    as metadata (``clipkit eval ckpt=PATH`` rebuilds the model from it alone), logged as an MLflow artifact.
    The state dict is taken while the strategy is still set up, on every rank (a collective when sharded).
    A run with LoRA adapters exports them merged into the towers, under a config with ``lora.r=0``: everything that
    reads the file (eval, load, export, init) gets a plain model and needs no peft; the checkpoints keep the adapters."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.exported: str | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = trainer.strategy.lightning_module_state_dict()
        if not trainer.is_global_zero:
            return
        info = getattr(pl_module, "run_info", {})
        if has_adapters(state) and info.get("config"):  # LoRA: merged weights, config with lora.r=0 (needs no peft)
            state, info = merged_weights(state, info)
        self.exported = str(export_weights(state, info, self.path))
        for logger in trainer.loggers:
            if hasattr(logger, "run_id") and hasattr(logger.experiment, "log_artifact"):
                logger.experiment.log_artifact(logger.run_id, self.exported)
