"""Checkpoints: written atomically, the last few kept every N steps, and the best by validation zero-shot accuracy."""

import logging
from pathlib import Path

import mlflow
import pytest
import torch

import clipkit.checkpoint_io as checkpoint_io
from clipkit.checkpoint_io import AtomicCheckpointIO
from clipkit.train import fit


def test_a_crash_mid_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    def crash(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", crash)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    assert torch.load(path, weights_only=True)["step"] == 1


def test_the_last_k_periodic_checkpoints_and_the_best_by_validation_zero_shot_are_kept(tiny_cfg, isolated):
    result = fit(tiny_cfg("trainer.max_steps=8", "callbacks.checkpoint.every_n_train_steps=2",
                          "callbacks.checkpoint.save_top_k=2", "callbacks.zeroshot.every_n_steps=2"))
    folder = Path(result.checkpoint).parent
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt", "step0000006.ckpt",
                                                        "step0000008.ckpt"]
    client = mlflow.MlflowClient(result.tracking_uri)
    val = client.get_metric_history(result.run_id, "val/zeroshot/mean_top1")
    test = client.get_metric_history(result.run_id, "zeroshot/mean_top1")
    assert [m.step for m in val] == [m.step for m in test] == [32, 64, 96, 128]  # images seen at steps 2, 4, 6, 8
    saved = torch.load(folder / "best.ckpt", weights_only=True)
    # the first of the best validation scores (Lightning keeps the first on ties); the test sets play no part
    best = max(val, key=lambda m: (m.value, -m.step))
    assert saved["global_step"] * 16 == best.step
    assert saved["callbacks"] and any("val/zeroshot/mean_top1" in str(k) for k in saved["callbacks"])


def test_without_a_validation_set_no_best_checkpoint_is_chosen_on_the_test_sets(tiny_cfg, isolated, caplog):
    """Digits with data.val_fraction=0 has only its reported set: nothing may be selected on it."""
    caplog.set_level(logging.INFO, logger="clipkit.train")
    result = fit(tiny_cfg("data=digits", "data.val_fraction=0", "trainer.max_steps=4",
                          "callbacks.checkpoint.every_n_train_steps=2", "callbacks.zeroshot.every_n_steps=2"))
    folder = Path(result.checkpoint).parent
    assert not (folder / "best.ckpt").exists() and (folder / "last.ckpt").exists()
    assert "no validation set" in caplog.text


def test_the_end_of_training_is_checkpointed_between_two_periodic_saves(tiny_cfg):
    """max_steps ends the endless epoch: Lightning's epoch-end save never comes, so the end is saved on its own."""
    result = fit(tiny_cfg("trainer.max_steps=7", "callbacks.checkpoint.every_n_train_steps=3",
                          "callbacks.zeroshot.every_n_steps=0"))
    folder = Path(result.checkpoint).parent
    assert sorted(p.name for p in folder.glob("step*")) == ["step0000003.ckpt", "step0000006.ckpt", "step0000007.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 7


@pytest.mark.slow
def test_after_resumes_the_folder_keeps_what_the_uninterrupted_run_keeps(tiny_cfg, tmp_path, monkeypatch):
    """Two ways a resume orphaned a full checkpoint: Lightning keeps the file a run resumed from forever, and a run
    killed between writing a checkpoint and deleting the one it replaces left that one to no one."""
    from callbacks.checkpointing import Checkpoint
    from clipkit.module import ClipKitModule

    run = ["trainer.max_steps=5", "callbacks.checkpoint.every_n_train_steps=1", "callbacks.checkpoint.save_top_k=2",
           "callbacks.zeroshot.every_n_steps=0"]
    whole = Path(fit(tiny_cfg(*run, f"paths.output_dir={tmp_path}/whole")).checkpoint).parent
    out = f"paths.output_dir={tmp_path}/resumed"
    folder = tmp_path / "resumed" / "checkpoints"

    def power_cut(self, outputs, batch, batch_idx):  # after step 2's checkpoint
        if self.trainer.global_step == 2:
            raise RuntimeError("power cut")

    monkeypatch.setattr(ClipKitModule, "on_train_batch_end", power_cut, raising=False)
    with pytest.raises(RuntimeError, match="power cut"):
        fit(tiny_cfg(*run, out))
    monkeypatch.undo()
    remove = Checkpoint._remove_checkpoint

    def cut_mid_removal(self, trainer, filepath):  # step 3 written, step 1 not yet deleted
        if trainer.global_step == 3:
            raise RuntimeError("power cut")
        remove(self, trainer, filepath)

    monkeypatch.setattr(Checkpoint, "_remove_checkpoint", cut_mid_removal)
    with pytest.raises(RuntimeError, match="power cut"):
        fit(tiny_cfg(*run, out, f"resume={folder / 'step0000002.ckpt'}"))  # killed before last.ckpt was written
    monkeypatch.undo()
    assert (folder / "step0000001.ckpt").exists()
    fit(tiny_cfg(*run, out, f"resume={folder / 'step0000003.ckpt'}"))
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in whole.iterdir())
    assert sorted(p.name for p in folder.glob("step*")) == ["step0000004.ckpt", "step0000005.ckpt"]
