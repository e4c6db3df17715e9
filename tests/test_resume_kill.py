"""The acceptance test of exact resume: SIGKILL a training run at random moments, ``resume=auto`` each time, and
end with the uninterrupted run's weights, bit for bit, and its MLflow history, each step once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
STEPS = 40
OWN = ["data.supersample=1", "data.num_workers=2", "+trainer.deterministic=true", f"trainer.max_steps={STEPS}",
       "callbacks.checkpoint.every_n_train_steps=3", "callbacks.checkpoint.save_top_k=-1",
       "callbacks.zeroshot.every_n_steps=5", "+model.image.drop_path_rate=0.2",
       "+model.text.config.attention_dropout=0.2", "callbacks.export=null"]
RUN = [o for o in TINY if o.split("=")[0] not in {k.split("=")[0] for k in OWN}] + OWN


def command(tmp_path: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "clipkit", "fit", *RUN, f"paths.output_dir={tmp_path / name}",
            f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"experiment_name={name}", "resume=auto"]


def steps_written(folder: Path) -> int:
    return max((int(p.stem.removeprefix("step")) for p in folder.glob("step*.ckpt")), default=0)


def history(tracking_uri: str, experiment: str) -> dict[str, list[tuple[int, float]]]:
    client = mlflow.MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED"
    return {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
            for key in run.data.metrics}


@pytest.mark.slow
def test_a_run_killed_at_random_moments_ends_exactly_like_an_uninterrupted_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(command(tmp_path, "whole"), check=True, capture_output=True, env=env, timeout=600)

    rng, kills = random.Random(7), []
    folder = tmp_path / "killed" / "checkpoints"
    for target in sorted(rng.sample(range(3, STEPS - 3), 3)):
        proc = subprocess.Popen(command(tmp_path, "killed"), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while steps_written(folder) < target and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.4))  # anywhere: mid-step, mid-evaluation, mid-checkpoint, mid-log
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(steps_written(folder))
    assert kills == sorted(kills) and kills[-1] < STEPS, f"every kill must land before the end: {kills}"
    subprocess.run(command(tmp_path, "killed"), check=True, capture_output=True, env=env, timeout=600)

    whole = torch.load(tmp_path / "whole/checkpoints/last.ckpt", weights_only=True)
    killed = torch.load(folder / "last.ckpt", weights_only=True)
    assert whole["global_step"] == killed["global_step"] == STEPS
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, killed["state_dict"][key]), key
    for a, b in zip(whole["optimizer_states"][0]["state"].values(), killed["optimizer_states"][0]["state"].values(),
                    strict=True):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    expected, got = history(uri, "whole"), history(uri, "killed")
    assert expected.keys() == got.keys()
    for key, points in got.items():
        steps = [step for step, _ in points]
        assert steps == sorted(set(steps)), f"{key}: a step logged twice or out of order"
        if not key.startswith("throughput/"):  # rates are measured, so they differ; and restart their window
            assert points == expected[key], key
