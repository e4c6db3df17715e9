"""``clipkit eval``: a checkpoint rebuilds itself, reports every task in JSON, logs to its MLflow run."""

from __future__ import annotations

import json
import re

import mlflow
import pytest
import torch

from clipkit.cli import main
from clipkit.train import fit

FAST = ["fewshot.ks=[1,2]", "fewshot.seeds=[0]", "linear_probe.c_grid=[1.0,10.0]", "data.probe_per_class=4"]


@pytest.fixture
def trained(tiny_cfg, isolated):
    return fit(tiny_cfg("trainer.max_steps=4", "experiment_name=test_eval"))


def test_eval_reports_every_task_and_logs_to_the_training_run(trained, isolated, capsys):
    assert main(["eval", f"ckpt={trained.checkpoint}", *FAST, "data.retrieval_captions=2"]) == 0
    out = capsys.readouterr().out
    assert "linear_probe  scenes" in out and "fewshot       scenes" in out and "report:" in out
    report = json.loads(open(trained.checkpoint.replace(".ckpt", ".eval.json")).read())
    tasks = report["tasks"]
    assert set(tasks) == {"zeroshot", "retrieval", "linear_probe", "fewshot"}
    assert report["images_seen"] == 64 and report["run_id"] == trained.run_id
    # the same model on the same held-out set: eval's zero-shot equals the training callback's last value
    assert tasks["zeroshot"]["scenes"]["top1"] == pytest.approx(trained.metrics["zeroshot/scenes/top1"])
    assert len(tasks["zeroshot"]["scenes"]["per_class"]) == 56
    assert tasks["retrieval"]["scenes"]["captions"] == 2 * tasks["retrieval"]["scenes"]["images"] == 32
    assert set(tasks["fewshot"]["scenes"]) >= {"1_shot", "2_shot"} and tasks["linear_probe"]["scenes"]["C"] in (1.0, 10.0)

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{isolated}/mlflow.db")
    run = client.get_run(trained.run_id)
    assert run.data.metrics["eval/zeroshot/scenes/top1"] == pytest.approx(tasks["zeroshot"]["scenes"]["top1"])
    assert [m.step for m in client.get_metric_history(trained.run_id, "eval/linear_probe/scenes/top1")] == [64]
    assert "eval/last.eval.json" in {a.path for a in client.list_artifacts(trained.run_id, "eval")}


def test_eval_on_other_data_keeps_the_checkpoints_tokenizer(trained, isolated):
    out = isolated / "digits.json"
    assert main(["eval", f"ckpt={trained.checkpoint}", "data=digits", "data.image_size=32", "data.num_workers=0",
                 "tasks=[zeroshot,linear_probe]", *FAST[2:3], f"out={out}", "mlflow=new"]) == 0
    report = json.loads(out.read_text())
    assert report["data"] == "datamodules.digits.DigitsDataModule"
    assert set(report["tasks"]["zeroshot"]) == {"digits"} and report["tasks"]["linear_probe"]["digits"]["train_images"] == 1438  # 80% of 1,797
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{isolated}/mlflow.db")
    evals = client.search_runs([client.get_run(trained.run_id).info.experiment_id],
                               filter_string="tags.`clipkit.kind` = 'evaluation'")
    assert len(evals) == 1 and evals[0].data.tags["clipkit.evaluated_run"] == trained.run_id


def test_checkpoint_carries_its_config_and_tokenizer(trained):
    info = torch.load(trained.checkpoint, map_location="cpu", weights_only=True)["clipkit"]  # no pickled code
    assert "objective:" in info["config"] and '"model"' in info["tokenizer"] and info["run_id"] == trained.run_id


def test_final_weights_are_self_describing_safetensors(trained, isolated):
    assert trained.weights.endswith("model.safetensors")
    out = isolated / "from_weights.json"
    assert main(["eval", f"ckpt={trained.weights}", "tasks=[zeroshot]", f"out={out}", "mlflow=none"]) == 0
    report = json.loads(out.read_text())
    assert report["run_id"] == trained.run_id and report["images_seen"] == 64
    assert report["tasks"]["zeroshot"]["scenes"]["top1"] == pytest.approx(trained.metrics["zeroshot/scenes/top1"])
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{isolated}/mlflow.db")
    assert "model.safetensors" in {a.path for a in client.list_artifacts(trained.run_id)}


class Payload:
    """Stands for any object whose unpickling would run code."""


def test_a_checkpoint_that_would_unpickle_code_is_refused(trained, isolated, capsys):
    ckpt = torch.load(trained.checkpoint, map_location="cpu", weights_only=True)
    ckpt["extra"] = Payload()
    torch.save(ckpt, isolated / "tampered.ckpt")
    assert main(["eval", f"ckpt={isolated / 'tampered.ckpt'}", "mlflow=none"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"clipkit: error: refusing to load \S*tampered.ckpt: it holds pickled Python objects "
                        r"\((tests\.)?test_eval_cli\.Payload\), which could run code when loaded; .*", last), last


@pytest.mark.parametrize("args,message", [
    (["eval"], "eval needs a checkpoint"),
    (["eval", "ckpt=/nowhere/last.ckpt"], "no checkpoint at /nowhere/last.ckpt"),
    (["eval", "ckpt=X", "taks=[zeroshot]"], "unknown config key 'taks': did you mean tasks?"),
])
def test_eval_mistakes_are_one_line(args, message, capsys):
    assert main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"clipkit: error: {message}")


def test_unknown_task_is_named(trained, capsys):
    assert main(["eval", f"ckpt={trained.checkpoint}", "tasks=[zeroshot,linearprobe]", "mlflow=none"]) == 2
    assert "unknown evaluation task 'linearprobe': choose from zeroshot, retrieval, linear_probe, fewshot" in \
        capsys.readouterr().err
