"""Robustness to distribution shift: shifted domains of the generated scenes, the supervised baseline, and the
report of each model on each domain with its effective robustness."""

from __future__ import annotations

import hashlib
import json
import math

import mlflow
import numpy as np
import pytest
import torch
from hydra.utils import instantiate

import clipkit
from clipkit.cli import main
from clipkit.evaluation.robustness import IN_DISTRIBUTION, effective_robustness, trend
from clipkit.models import ImageTower
from clipkit.objectives import Supervised
from clipkit.train import fit
from clipkit.zeroshot import class_prompts
from datamodules import scenes
from datamodules.shifts import SHIFTS, shifted_image

PAIRS = [("red", "circle"), ("blue", "star"), ("green", "ring")]


def _digest(image) -> str:
    return hashlib.sha1(np.asarray(image).tobytes()).hexdigest()


def test_shifted_domains_are_deterministic_distinct_and_never_training_images():
    for domain in SHIFTS:
        first = [np.asarray(shifted_image(domain, 0, i, PAIRS[i % 3], 32)) for i in range(6)]
        again = [np.asarray(shifted_image(domain, 0, i, PAIRS[i % 3], 32)) for i in range(6)]
        assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
        assert not np.array_equal(first[0], np.asarray(shifted_image(domain, 1, 0, PAIRS[0], 32)))  # the seed counts
    same_object = {d: _digest(shifted_image(d, 0, 0, PAIRS[0], 32)) for d in SHIFTS}
    assert len(set(same_object.values())) == len(SHIFTS)  # each domain draws it differently
    training = {_digest(scenes.render(scenes.captioned_scene(0, "train", i, scenes.all_pairs())[0], 32))
                for i in range(2000)}
    shifted = {_digest(shifted_image(d, 0, i, pair, 32)) for d in SHIFTS for i in range(40) for pair in PAIRS}
    assert not training & shifted
    with pytest.raises(ValueError, match="unknown shifted domain 'cartoon': choose from sketch, texture"):
        shifted_image("cartoon", 0, 0, PAIRS[0], 32)


def test_shifted_sets_hold_the_in_distribution_classes(tiny_cfg):
    dm = instantiate(tiny_cfg("data.shift_domains=[sketch,scale]").data)
    scenes_set = next(z for z in dm.zeroshot_sets() if z.name == "scenes")
    sets = dm.shifted_sets()
    assert [s.name for s in sets] == ["sketch", "scale"]
    for s in sets:
        assert s.classnames == scenes_set.classnames == dm.classnames()
        assert torch.equal(torch.bincount(s.labels), torch.full((56,), 2))  # data.eval_per_class=2 of each
        assert s.images.shape == (112, 3, 32, 32) and s.prompts["input_ids"].shape[:2] == (56, len(dm.templates))
    with pytest.raises(Exception, match="unknown shifted domain 'blurry'"):
        instantiate(tiny_cfg("data.shift_domains=[blurry]").data)


def test_training_labels_are_the_pairs_each_scene_shows(tiny_cfg):
    dm = instantiate(tiny_cfg("data.labels=true").data)
    dm.setup("fit")
    batch = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["labels"].shape == (16, 56)
    for key, row in zip(batch["keys"], batch["labels"], strict=True):
        scene, _ = scenes.captioned_scene(0, "train", int(key.split()[-1]), dm.train_pairs)
        assert {dm.classnames()[i] for i in row.nonzero().flatten().tolist()} == \
            {f"{o.colour} {o.shape}" for o in scene.objects}


def _solid_colour_set(n_per_class: int = 8):
    """A separable toy set: 32 px images of one flat colour (plus noise) per class."""
    g = torch.Generator().manual_seed(0)
    colours = torch.tensor([[1.0, -1, -1], [-1, -1, 1.0], [-1, 1.0, -1]])
    labels = torch.arange(3).repeat(n_per_class)
    images = colours[labels][:, :, None, None].expand(-1, -1, 32, 32) + 0.3 * torch.randn(len(labels), 3, 32, 32,
                                                                                        generator=g)
    return images, labels


def test_the_supervised_baseline_learns_a_separable_toy_set_and_scores_only_names_it_knows():
    torch.manual_seed(0)
    names = ["red thing", "blue thing", "green thing"]
    model = Supervised(ImageTower("resnet18"), names)
    images, labels = _solid_colour_set()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(30):
        loss, _ = model.loss({"images": images, "labels": torch.nn.functional.one_hot(labels, 3)})
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    prompts = {"classnames": ["green thing", "purple thing", "red thing", "blue thing"]}
    with torch.no_grad():
        logits = model.zero_shot_logits(images, prompts)
    assert torch.isinf(logits[:, 1]).all()  # never trained on: it cannot be named
    order = torch.tensor([2, 3, 0])  # where each trained class sits among the prompts
    assert (logits.argmax(1) == order[labels]).float().mean() == 1.0
    with pytest.raises(ValueError, match="needs class labels with each image"):
        model.loss({"images": images})


def test_effective_robustness_is_the_distance_above_the_supervised_logit_trend():
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    supervised = [{"kind": "supervised", "accuracy": {IN_DISTRIBUTION: x, "sketch": sig(logit(x) - 1)}}
                  for x in (0.2, 0.5, 0.8)]  # exactly on logit(shifted) = logit(in) - 1
    assert trend([(r["accuracy"][IN_DISTRIBUTION], r["accuracy"]["sketch"]) for r in supervised]) == \
        pytest.approx((1.0, -1.0))
    zero_shot = {"kind": "zero-shot", "accuracy": {IN_DISTRIBUTION: 0.6, "sketch": 0.5}}
    far = {"kind": "zero-shot", "accuracy": {IN_DISTRIBUTION: 0.95, "sketch": 0.5}}
    rows = effective_robustness([*supervised, zero_shot, far], "supervised")
    assert rows[3]["effective_robustness"]["sketch"] == pytest.approx(0.5 - sig(logit(0.6) - 1))
    assert rows[3]["extrapolated"] is False and rows[4]["extrapolated"] is True
    assert "effective_robustness" not in rows[0]


def test_robustness_reports_every_model_on_every_domain_and_logs_it(tiny_cfg, isolated, capsys):
    small = ["data.shift_domains=[sketch,clutter]", "data.probe_per_class=4", "trainer.max_steps=2"]
    contrastive = fit(tiny_cfg(*small, "experiment_name=test_robustness"))
    supervised = fit(tiny_cfg(*small, "objective=supervised", "data.labels=true",
                              "callbacks.checkpoint.every_n_train_steps=1", f"paths.output_dir={isolated}/sup",
                              "experiment_name=test_robustness"))
    assert supervised.metrics["zeroshot/novel_pairs/top1"] == 0.0  # a classifier cannot name an unseen pair
    with pytest.raises(ValueError, match=r"scores none of the labels \['cat'\]: it knows only red square, red triangle"):
        clipkit.load(supervised.weights).classify(torch.zeros(1, 3, 32, 32), ["cat"])
    assert not any(k.startswith("retrieval/") for k in supervised.metrics)  # nor read a caption
    capsys.readouterr()
    assert main(["robustness", f"ckpts=[{contrastive.checkpoint},{isolated}/sup/checkpoints]",
                 f"out={isolated}/rob", f"tracking_uri=sqlite:///{isolated}/mlflow.db"]) == 0
    report = json.loads((isolated / "rob" / "robustness.json").read_text())
    kinds = [r["kind"] for r in report["rows"]]
    assert kinds == ["zero-shot", "linear probe", "supervised", "supervised"]  # 2 supervised checkpoints
    assert [r["images_seen"] for r in report["rows"][2:]] == [16, 32]
    for row in report["rows"]:
        assert set(row["accuracy"]) == {IN_DISTRIBUTION, "sketch", "clutter"}
        assert all(0.0 <= v <= 1.0 for v in row["accuracy"].values())
        assert ("effective_robustness" in row) == (row["kind"] != "supervised")
    assert "| contrastive (transformer text) @ 32 images | zero-shot |" in capsys.readouterr().out
    assert (isolated / "rob" / "effective_robustness.png").stat().st_size > 10_000
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{isolated}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("robustness").experiment_id])[0]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == \
        {"robustness.json", "robustness.md", "effective_robustness.png"}
    history = client.get_metric_history(run.info.run_id, "robustness/supervised/sketch/top1")
    assert [m.step for m in history] == [16, 32]  # against images seen
    assert set(run.data.tags["clipkit.evaluated_runs"].split(",")) == {contrastive.run_id, supervised.run_id}


def test_class_prompts_carry_their_class_names(tiny_cfg):
    dm = instantiate(tiny_cfg().data)
    prompts = class_prompts(dm.tokenizer, ["red circle", "blue star"], ["a {}."], 16)
    assert prompts["classnames"] == ["red circle", "blue star"] and prompts["input_ids"].shape == (2, 1, 16)
