"""The NaN/Inf guard: a non-finite step is skipped and counted; too many in a row stop the run in one line."""

import math
import subprocess
import sys

import mlflow
import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from clipkit.errors import TrainingDiverged
from tests.conftest import random_batch


def batches(n: int, poisoned: set[int]) -> list[dict]:
    """``n`` batches; those at the ``poisoned`` positions carry one NaN pixel."""
    out = [random_batch(8, seed=i) for i in range(n)]
    for i in poisoned:
        out[i]["images"][0, 0, 0, 0] = math.nan
    return out


def train(tiny_cfg, data: list[dict], *overrides):
    cfg = tiny_cfg("model/image=vit_tiny", *overrides)
    torch.manual_seed(0)
    module = instantiate(cfg.module)
    trainer = instantiate(cfg.trainer, max_steps=len(data), logger=False, enable_checkpointing=False)
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
    return module, trainer


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_poisoned_batch_is_skipped_and_counted(tiny_cfg, accumulate):
    module, trainer = train(tiny_cfg, batches(5, poisoned={1, 3}), f"accumulate={accumulate}")
    assert module.nonfinite_steps == 2 and trainer.global_step == 5
    assert all(torch.isfinite(p).all() for p in module.parameters())
    state = trainer.optimizers[0].state[module.objective.logit_scale]
    assert int(state["step"]) == 3  # AdamW stepped only on the three clean batches
    assert trainer.callback_metrics["train/nonfinite_steps"] == 2.0  # logged before the last step


def test_a_skipped_step_leaves_every_weight_as_it_was(tiny_cfg):
    clean = batches(1, poisoned=set())
    poisoned = batches(2, poisoned={1})[1]
    before, _ = train(tiny_cfg, clean)
    after, _ = train(tiny_cfg, [*clean, poisoned])
    assert after.nonfinite_steps == 1
    for (name, a), b in zip(before.objective.state_dict().items(), after.objective.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_too_many_non_finite_steps_in_a_row_stop_the_run(tiny_cfg):
    with pytest.raises(TrainingDiverged, match=r"non-finite for 3 steps in a row .*lower module.optimizer.lr"):
        train(tiny_cfg, batches(6, poisoned={2, 3, 4, 5}), "module.max_nonfinite_steps=3")


@pytest.mark.slow
def test_a_diverging_run_ends_in_one_line_and_a_failed_mlflow_run(isolated):
    from tests.conftest import TINY

    cli = subprocess.run([sys.executable, "-m", "clipkit", "fit", *TINY, "data.supersample=1", "trainer.max_steps=30",
                          "module.optimizer.lr=1e30", "module.max_nonfinite_steps=2",
                          "logger.tracking_uri=sqlite:///mlflow.db"], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 1
    last = cli.stderr.strip().splitlines()[-1]
    assert last.startswith("clipkit: error: the loss or gradients were non-finite for 2 steps in a row"), last
    (run,) = mlflow.MlflowClient(tracking_uri=f"sqlite:///{isolated}/mlflow.db").search_runs(["1"])
    assert run.info.status == "FAILED"
