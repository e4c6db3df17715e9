"""Lightning's ``ModelCheckpoint``, plus the save at the end of training that an endless stream never gets, and
no metric step lost to a crash just after a save."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class Checkpoint(ModelCheckpoint):
    """Saves as ``ModelCheckpoint`` does, and once more when training ends between two periodic saves.

    ``max_steps`` ends our runs in the middle of an (endless) epoch, and a step-based ``ModelCheckpoint`` only
    saves on its steps: without this, the last ``every_n_train_steps - 1`` steps of a run would be in no
    checkpoint. A run that stops on an error saves nothing here, so the last checkpoint stays the last good one.

    Lightning sends a step's metrics to the loggers only after the batch-end hooks, where this saves: a crash in
    between would lose that step's metrics for good, since a resumed run starts at the next step. So they are
    sent before the save (:class:`clipkit.tracking.MLFlowLogger` drops Lightning's repeat of them).
    """

    _in_batch_end = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._in_batch_end = True
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._in_batch_end = False

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        if self._in_batch_end and trainer.loggers:
            trainer._logger_connector.update_train_step_metrics()
        super()._save_checkpoint(trainer, filepath)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._should_skip_saving_checkpoint(trainer):  # includes: this step is saved already
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is not None and self.monitor not in candidates:
            return
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
