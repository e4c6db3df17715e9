"""Lightning's ``ModelCheckpoint``, plus the save at the end of training that an endless stream never gets, no
metric step lost to a crash just after a save, and no checkpoint left behind by a resume."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint


class Checkpoint(ModelCheckpoint):
    """Saves as ``ModelCheckpoint`` does, and once more when training ends between two periodic saves.

    ``max_steps`` ends our runs in the middle of an (endless) epoch, and a step-based ``ModelCheckpoint`` only
    saves on its steps: without this, the last ``every_n_train_steps - 1`` steps of a run would be in no
    checkpoint. A run that stops on an error saves nothing here, so the last checkpoint stays the last good one.

    Lightning sends a step's metrics to the loggers only after the batch-end hooks, where this saves: a crash in
    between would lose that step's metrics for good, since a resumed run starts at the next step. So they are
    sent before the save (:class:`clipkit.tracking.MLFlowLogger` drops Lightning's repeat of them).

    After any number of resumes the folder keeps what the uninterrupted run keeps. Lightning never deletes the
    checkpoint a run resumed from, even once ``save_top_k`` drops it (a full checkpoint orphaned per resume from a
    periodic file); here our own folder's files go when they drop out. And a run killed between writing a
    checkpoint and deleting the one it replaces would orphan that one: each checkpoint names the files it drops
    (``pending_removal``), and a run resumed from it deletes those that are still there.
    """

    _in_batch_end = False
    _kept: frozenset = frozenset()  # the top-k files on disk after the last completed save
    _pending: tuple = ()  # top-k files the save in progress drops: deleted right after it, or on resume

    def state_dict(self) -> dict:
        return {**super().state_dict(), "pending_removal": list(self._pending)}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._kept = frozenset(self.best_k_models)
        self._pending = tuple(state_dict.get("pending_removal", ()))

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        for path in self._pending:  # dropped by the save we resumed from, which died before deleting them
            if path not in self.best_k_models and Path(path).exists() and self._should_remove_checkpoint(
                    trainer, path, ""):
                self._remove_checkpoint(trainer, path)
        self._pending = ()

    def _should_remove_checkpoint(self, trainer, previous: str, current: str) -> bool:
        """Lightning's rule, except that the file the run resumed from goes too when it is in our folder."""
        if previous == current:
            return False
        folder = Path(self.dirpath or "").absolute()
        if trainer.ckpt_path is not None and Path(previous).absolute() == Path(trainer.ckpt_path).absolute():
            return folder in Path(previous).absolute().parents
        return super()._should_remove_checkpoint(trainer, previous, current)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._in_batch_end = True
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._in_batch_end = False

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        if self._in_batch_end and trainer.loggers:
            trainer._logger_connector.update_train_step_metrics()
        self._pending = tuple(sorted(self._kept - set(self.best_k_models)))
        super()._save_checkpoint(trainer, filepath)
        self._kept = frozenset(self.best_k_models)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._should_skip_saving_checkpoint(trainer):  # includes: this step is saved already
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is not None and self.monitor not in candidates:
            return
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
