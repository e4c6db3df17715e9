"""Training through Lightning: the temperature clamp, weight-decay groups, schedule and the MLflow record."""

import math

import lightning as L
import mlflow
import pytest
import torch
import yaml
from hydra.utils import instantiate

from clipkit.module import decay_groups, warmup_cosine
from clipkit.train import fit


class RecordScale(L.Callback):
    def __init__(self):
        self.scales = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.scales.append(pl_module.objective.logit_scale.exp().item())


def test_logit_scale_never_exceeds_100_after_any_step(tiny_cfg):
    """Start above the cap with a huge learning rate: the clamp after every optimiser step must hold."""
    cfg = tiny_cfg("objective.init_temperature=0.001", "module.optimizer.lr=10.0", "trainer.max_steps=4")
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module)
    assert module.objective.logit_scale.exp().item() > 100  # the cap is really exercised
    recorder = RecordScale()
    trainer = instantiate(cfg.trainer, callbacks=[recorder], logger=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=datamodule)
    assert len(recorder.scales) == 4
    assert max(recorder.scales) <= 100.0 + 1e-4


def test_no_weight_decay_on_gains_biases_and_temperature(tiny_cfg):
    objective = instantiate(tiny_cfg().objective)
    decay, no_decay = decay_groups(objective, 0.2)
    no_decay_ids = {id(p) for p in no_decay["params"]}
    named = dict(objective.named_parameters())
    assert id(named["logit_scale"]) in no_decay_ids
    assert all(id(p) in no_decay_ids for n, p in named.items() if n.endswith(".bias") or "norm" in n)
    assert id(named["image_proj.weight"]) not in no_decay_ids and decay["weight_decay"] == 0.2
    assert no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)


def test_warmup_then_cosine_to_zero():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=10, total_steps=110)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < 0.01 and lrs[5] == pytest.approx(0.5, abs=0.01)  # linear warm-up
    assert lrs[10] == pytest.approx(1.0)  # peak
    assert lrs[60] == pytest.approx(0.5, abs=0.01)  # half-way down the cosine
    assert lrs[-1] < 0.001 and all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_finished_run_has_params_tags_metrics_and_config_artifact(tiny_cfg, isolated):
    cfg = tiny_cfg("trainer.max_steps=4", "experiment_name=test_record")
    result = fit(cfg, preset="contrastive_vit")

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{isolated}/mlflow.db")
    run = client.get_run(result.run_id)
    params, tags = run.data.params, run.data.tags
    assert params["trainer/max_steps"] == "4" and params["data/image_size"] == "32"
    assert params["seed"] == "0"
    assert params["objective/image_tower"] == "${model.image}"  # sub-trees are logged once, under their key
    assert tags["clipkit.preset"] == "contrastive_vit" and tags["clipkit.objective"] == "Contrastive"
    assert tags["clipkit.arm"] == "contrastive (transformer text)"  # what `clipkit compare` groups by
    assert len(tags["mlflow.source.git.commit"]) in (40, len("unknown"))

    # metrics are stepped by images seen: 4 steps x 16 images; evaluation every 2 steps and at the end
    history = client.get_metric_history(result.run_id, "zeroshot/scenes/top1")
    assert [m.step for m in history] == [32, 64]
    assert all(0.0 <= m.value <= 1.0 for m in history)
    for name in ("train/loss", "train/lr", "train/logit_scale"):
        assert [m.step for m in client.get_metric_history(result.run_id, name)] == [16, 32, 48, 64], name
    assert result.images_seen == 64

    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert "config.yaml" in artifacts
    local = client.download_artifacts(result.run_id, "config.yaml", str(isolated))
    with open(local) as f:
        logged = yaml.safe_load(f)
    assert logged["trainer"]["max_steps"] == 4 and logged["model"]["image"]["img_size"] == 32
    assert any(a.endswith(".json") for a in artifacts)  # the trained tokenizer
    assert "last/last.ckpt" in {a.path for a in client.list_artifacts(result.run_id, "last")}  # final weights
    assert math.isfinite(result.train_images_per_second)


def test_a_run_records_only_the_towers_its_objective_builds(tiny_cfg, isolated):
    result = fit(tiny_cfg("objective=bow_prediction", "trainer.max_steps=2", "experiment_name=test_bow"))
    run = mlflow.MlflowClient(tracking_uri=f"sqlite:///{isolated}/mlflow.db").get_run(result.run_id)
    assert run.data.tags["clipkit.arm"] == "bag-of-words prediction"
    assert "model/image/name" in run.data.params and not any(k.startswith("model/text/") for k in run.data.params)
    assert "zeroshot/scenes/top1" in result.metrics  # the same metric names as every other objective


def test_images_seen_beyond_float32_reaches_mlflow_exactly(tiny_cfg, monkeypatch):
    """Above 2**24 (16.8M images) float32 cannot hold every count: 2**24 + 17 would be logged as 2**24 + 16."""
    from clipkit.module import ClipKitModule

    start = 2**24 + 1
    monkeypatch.setattr(ClipKitModule, "on_train_start", lambda self: self.images_seen.fill_(start), raising=False)
    result = fit(tiny_cfg("trainer.max_steps=2"))
    client = mlflow.MlflowClient(tracking_uri=result.tracking_uri)
    expected = [start + 16, start + 32]
    assert result.images_seen == expected[-1]
    assert [m.step for m in client.get_metric_history(result.run_id, "train/loss")] == expected
    seen = client.get_metric_history(result.run_id, "images_seen")
    assert [(m.step, m.value) for m in seen] == [(n, n) for n in expected]
    assert [m.step for m in client.get_metric_history(result.run_id, "zeroshot/mean_top1")] == expected[-1:]
