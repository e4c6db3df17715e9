"""Training on stored data through ``fit``: bad samples reach MLflow as counts, too many stop the run,
and written shards train like the streamed default."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pytest

from clipkit.errors import DataError
from clipkit.train import fit
from tests.datafiles import BAD, GOOD, MAX_PIXELS, REPAIRS, write_shard, write_shards


def shards_cfg(tiny_cfg, shards, *overrides):
    return tiny_cfg("data=webdataset", f"data.shards={shards}", f"data.max_image_pixels={MAX_PIXELS}",
                    "data.eval_folders=[]", "data.corpus_size=50", "callbacks.data_health.min_samples=10",
                    "callbacks.data_health.log_every_n_steps=1", *overrides)


def test_skipped_and_repaired_samples_are_logged_to_mlflow_by_kind(tiny_cfg, tmp_path):
    usable, skipped = write_shards(tmp_path / "shards", 2, good_per_shard=20, repairs=REPAIRS)
    assert len(usable) == 45  # 40 good + 5 repaired: one epoch is 3 batches of 16, 16, 13
    cfg = shards_cfg(tiny_cfg, tmp_path / "shards", "trainer.max_steps=3", "callbacks.data_health.max_skip_ratio=0.5")
    result = fit(cfg)
    client = mlflow.MlflowClient(result.tracking_uri)
    metrics = client.get_run(result.run_id).data.metrics
    assert {k: metrics[f"data/skipped/{k}"] for k in skipped} == {k: float(n) for k, n in skipped.items()}
    assert {k: metrics[f"data/repaired/{k}"] for k in REPAIRS} == {k: 1.0 for k in REPAIRS}
    assert metrics["data/skip_ratio"] == pytest.approx(len(BAD) / (len(BAD) + 45))
    assert result.images_seen == 45


def test_too_many_bad_samples_stop_the_run_naming_the_shard_and_mark_it_failed(tiny_cfg, tmp_path):
    write_shards(tmp_path / "shards", 2, good_per_shard=30, bad={})
    junk = [(f"junk{i}", b"<html>", b"an error page") for i in range(30)]
    write_shard(tmp_path / "shards" / "00002.tar", [(f"ok{i}", GOOD, b"fine") for i in range(5)] + junk)
    cfg = shards_cfg(tiny_cfg, tmp_path / "shards", "trainer.max_steps=20", "data.shuffle=false")
    expected = r"more than callbacks.data_health.max_skip_ratio=0.05.*worst shards: \S*00002.tar \(30 bad\)"
    with pytest.raises(DataError, match=expected):
        fit(cfg)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("clipkit").experiment_id])
    assert run.info.status == "FAILED"


def test_cli_reports_a_bad_data_path_in_one_line(tmp_path):
    def run(shards):
        return subprocess.run([sys.executable, "-m", "clipkit", "fit", "data=webdataset", f"data.shards={shards}"],
                              capture_output=True, text=True, timeout=120)

    proc = run(f"'{tmp_path}/nowhere/{{0..3}}.tar'")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == ("clipkit: error: 4 of 4 shards do not exist "
                                                    f"(first: {tmp_path}/nowhere/0.tar): check data.shards")
    unquoted = run(f"{tmp_path}/{{0..3}}.tar")  # Hydra's grammar reads braces as a dict
    assert unquoted.returncode == 2 and "a value with braces must be quoted" in unquoted.stderr
