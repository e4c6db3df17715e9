"""Hydra multiruns as MLflow sweeps: one parent run with the grid, nested child runs with readable names."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest
from omegaconf import OmegaConf

from clipkit.commands.ui import ui_experiment
from clipkit.compare import find_sweep
from clipkit.sweep import parse_overrides, run_name
from tests.test_cli import run_cli
from tests.test_ui import _free_port


def test_run_names_show_the_preset_and_what_changes_what_is_trained():
    assert run_name("contrastive_vit", ["seed=2", "model/image=resnet_clip_tiny", "logger.tracking_uri=x",
                                        "paths.output_dir=/tmp/o", "experiments=contrastive_vit"]) == \
        "contrastive_vit seed=2 model/image=resnet_clip_tiny"
    assert run_name(None, []) == "defaults"
    assert len(run_name("p", [f"+k{i}=v" for i in range(200)])) == 250


def test_sweep_overrides_parse_into_keys_and_values():
    assert [(k, v) for k, v, _ in parse_overrides(["seed=0,1", "+model.image.embed_dim=32", "objective=a,b"])] == \
        [("seed", ["0", "1"]), ("+model.image.embed_dim", ["32"]), ("objective", ["a", "b"])]


def test_ui_opens_on_the_named_experiment_else_on_the_newest_runs(isolated):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{isolated}/ui.db")
    old, new = client.create_experiment("old"), client.create_experiment("new")
    client.create_run(old)
    time.sleep(0.05)
    client.create_run(new)
    cfg = OmegaConf.create({"logger": {"experiment_name": "old"}})
    assert ui_experiment(client, cfg, named=False).experiment_id == new  # what you just trained
    assert ui_experiment(client, cfg, named=True).experiment_id == old
    assert ui_experiment(mlflow.MlflowClient(tracking_uri=f"sqlite:///{isolated}/empty.db"), cfg, False) is None


def test_a_sweep_is_found_by_id_or_newest_name_and_anything_else_is_one_line(isolated):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{isolated}/find.db")
    eid = client.create_experiment("e")
    first = client.create_run(eid, run_name="sweep p seed=0,1", tags={"clipkit.kind": "sweep"})
    time.sleep(0.05)
    newest = client.create_run(eid, run_name="sweep p seed=0,1", tags={"clipkit.kind": "sweep"})
    job = client.create_run(eid, run_name="p seed=0", tags={"mlflow.parentRunId": newest.info.run_id})
    assert find_sweep(client, first.info.run_id, None).info.run_id == first.info.run_id
    assert find_sweep(client, "sweep p seed=0,1", None).info.run_id == newest.info.run_id
    with pytest.raises(ValueError, match=r"no sweep run with id or name 'p' \(newest sweeps: 'sweep p seed=0,1'\)"):
        find_sweep(client, "p", None)
    with pytest.raises(ValueError, match=r"is not a sweep's parent run"):
        find_sweep(client, job.info.run_id, None)


TINY = ["data.image_size=32", "data.batch_size=16", "data.num_workers=0", "data.corpus_size=500", "data.supersample=1",
        "data.eval_per_class=1", "data.retrieval_size=8", "model.image.depth=1", "+model.image.embed_dim=32",
        "+model.image.num_heads=2", "model.text.config.hidden_size=32", "model.text.config.intermediate_size=64",
        "model.text.config.num_hidden_layers=1", "model.text.config.num_attention_heads=2", "module.warmup_steps=1",
        "trainer.max_steps=4", "callbacks.zeroshot.every_n_steps=2", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1"]


@pytest.fixture(params=["sqlite", "server"])
def tracking_uri(request, isolated):
    if request.param == "sqlite":
        yield f"sqlite:///{isolated}/mlflow.db"
        return
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{isolated}/server.db", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, "MLflow server did not start"
                time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_a_2x2_multirun_is_one_parent_with_four_named_children_and_compare_logs_onto_it(tracking_uri, isolated):
    proc = run_cli("fit", "-m", "experiments=contrastive_vit", "objective=contrastive,bow_prediction", "seed=0,1",
                   f"logger.tracking_uri={tracking_uri}", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("contrastive_vit")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("clipkit.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.info.run_name == "sweep contrastive_vit objective=contrastive,bow_prediction seed=0,1"
    assert parent.data.params["sweep/objective"] == "contrastive,bow_prediction"
    assert parent.data.params["sweep/seed"] == "0,1" and parent.data.params["sweep/jobs"] == "4"
    assert parent.data.params["sweep/trainer.max_steps"] == "4"
    assert parent.data.tags["clipkit.sweep_dir"].startswith("file://")
    assert (isolated / parent.data.params["sweep/dir"] / "multirun.yaml").is_file()

    children = [r for r in runs if r is not parent]
    assert len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert {r.info.run_name for r in children} == {f"contrastive_vit objective={o} seed={s}"
                                                   for o in ("contrastive", "bow_prediction") for s in (0, 1)}
    for run in children:
        tags, params = run.data.tags, run.data.params
        assert run.info.status == "FINISHED"
        assert tags["clipkit.seed"] == params["seed"] and tags["clipkit.data"] == "synthetic"
        assert tags["clipkit.image_tower"] == "vit_tiny_hybrid"
        assert tags["clipkit.text_tower"] == ("clip_tiny" if "=contrastive" in run.info.run_name else "none")
        assert tags["clipkit.objective"] in ("Contrastive", "BagOfWordsPrediction")
        # the same metric names for every objective, stepped by images seen (16 per optimiser step)
        for name in ("zeroshot/scenes/top1", "zeroshot/scenes/top5", "retrieval/scenes/image_to_text_r1",
                     "train/loss", "throughput/train_images_per_second"):  # samples/s (its window: 10 steps)
            steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
            assert steps and all(s % 16 == 0 for s in steps) and max(steps) == 64, (name, steps)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "zeroshot/scenes/top1")] == [32, 64]

    proc = run_cli("compare", "--sweep", parent.info.run_name, f"logger.tracking_uri={tracking_uri}", "--out", "s.md")
    assert proc.returncode == 0, proc.stderr[-3000:]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "compare")}
    assert artifacts == {"compare/s.md", "compare/s.png"}
    text = (isolated / "s.md").read_text()
    assert "| contrastive (transformer text) | 2 | 64 |" in text and "| bag-of-words prediction | 2 | 64 |" in text
    assert "compare/bag_of_words_prediction/final_mean" in client.get_run(parent.info.run_id).data.metrics


@pytest.mark.slow
def test_a_requeued_multirun_with_resume_auto_keeps_every_job_under_one_parent(isolated):
    uri = f"sqlite:///{isolated}/mlflow.db"
    grid = ["fit", "-m", "experiments=contrastive_vit", "seed=0,1", f"logger.tracking_uri={uri}", *TINY]
    client = mlflow.MlflowClient(tracking_uri=uri)

    def sweeps():
        runs = client.search_runs([client.get_experiment_by_name("contrastive_vit").experiment_id])
        parents = [r for r in runs if r.data.tags.get("clipkit.kind") == "sweep"]
        return parents, {p.info.run_id: sorted(r.info.run_id for r in runs
                                               if r.data.tags.get("mlflow.parentRunId") == p.info.run_id)
                         for p in parents}

    first = run_cli(*grid, "hydra.sweep.dir=multirun/fixed")
    assert first.returncode == 0, first.stderr[-3000:]
    (parent,), jobs = sweeps()
    # the same grid relaunched into its own folder (a requeue): the parent is reopened, the jobs continue in it
    again = run_cli(*grid, "hydra.sweep.dir=multirun/fixed", "resume=auto")
    assert again.returncode == 0, again.stderr[-3000:]
    parents, after = sweeps()
    assert [p.info.run_id for p in parents] == [parent.info.run_id] and after == jobs
    assert len(jobs[parent.info.run_id]) == 2 and parents[0].info.status == "FINISHED"
    assert all("clipkit.resumed_from" in client.get_run(r).data.tags for r in jobs[parent.info.run_id])
    # relaunched into a new folder: a new parent, and the continued runs move under it
    moved = run_cli(*grid, "resume=auto")
    assert moved.returncode == 0, moved.stderr[-3000:]
    parents, after = sweeps()
    new = next(p for p in parents if p.info.run_id != parent.info.run_id)
    assert after == {parent.info.run_id: [], new.info.run_id: jobs[parent.info.run_id]}
    assert new.info.status == "FINISHED"
