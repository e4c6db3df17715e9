"""Classification fine-tuning (WiSE-FT's recipe): a head that starts as the source model's zero-shot classifier, once,
trains with cross-entropy, and still answers the shared zero-shot interface."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from clipkit.errors import DataError
from clipkit.evaluate import load_checkpoint
from clipkit.objectives import Contrastive, FinetuneClassifier, Objective
from clipkit.train import fit
from clipkit.zeroshot import class_prompts


@pytest.fixture
def source(tiny_cfg):
    """(a tiny contrastive model in eval mode, its datamodule, the scenes' zero-shot set)."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = instantiate(cfg.module).objective.eval()
    dm = instantiate(cfg.data)
    scenes = next(z for z in dm.zeroshot_sets() if z.name == "scenes")
    return model, dm, scenes


def test_the_head_starts_as_the_source_models_zero_shot_classifier(source):
    model, dm, scenes = source
    classifier = FinetuneClassifier.from_contrastive(model, dm.classnames()).eval()
    assert classifier.new_heads() == ["head"] and not bool(classifier.head.initialised)
    classifier.initialise_head(dm)
    assert bool(classifier.head.initialised)
    with torch.no_grad():
        expected = model.zero_shot_logits(scenes.images, scenes.prompts)  # the scenes set is over dm.classnames()
        assert torch.allclose(classifier.logits(scenes.images), expected, atol=1e-5, rtol=0)
        assert torch.allclose(classifier.zero_shot_logits(scenes.images, scenes.prompts), expected, atol=1e-5, rtol=0)
    before = classifier.head.weight.detach().clone()
    with torch.no_grad():
        classifier.head.weight.mul_(2.0)
    classifier.initialise_head(dm)  # initialised once: a second call (a resumed run) leaves the trained head alone
    assert torch.equal(classifier.head.weight, 2.0 * before)
    assert Objective.new_heads(model) == []


def test_classes_the_head_knows_use_its_rows_and_others_the_frozen_text_tower(source):
    model, dm, scenes = source
    classifier = FinetuneClassifier.from_contrastive(model, dm.classnames()).eval()
    classifier.initialise_head(dm)
    with torch.no_grad():
        classifier.head.weight.add_(torch.randn_like(classifier.head.weight))  # as training would move it
        classifier.head.bias.fill_(0.5)
    names = [dm.classnames()[3], "purple blob", dm.classnames()[0]]
    prompts = class_prompts(dm.tokenizer, names, dm.templates, dm.context_length)
    with torch.no_grad():
        logits = classifier.zero_shot_logits(scenes.images, prompts)
        head = classifier.logits(scenes.images)
        text = model.zero_shot_logits(scenes.images, prompts)
    assert torch.allclose(logits[:, [0, 2]], head[:, [3, 0]], atol=1e-5)
    assert torch.allclose(logits[:, 1], text[:, 1], atol=1e-5)  # an unknown class: the source model's own score
    anonymous = {k: v for k, v in prompts.items() if k != "classnames"}  # retrieval captions carry no class names
    with torch.no_grad():
        assert torch.allclose(classifier.zero_shot_logits(scenes.images, anonymous), text, atol=1e-5)


def test_it_trains_the_image_side_and_head_only(source):
    model, dm, scenes = source
    classifier = FinetuneClassifier.from_contrastive(model, dm.classnames())
    classifier.initialise_head(dm)
    batch = {"images": scenes.images[:8]}  # data.labels=false: a one-line refusal, not a shape error
    with pytest.raises(ValueError, match="needs class labels with each image: data=synthetic with data.labels=true"):
        classifier.loss(batch)
    torch.manual_seed(0)
    labels = torch.randint(0, len(dm.classnames()), (len(batch["images"]),))
    batch = {"images": batch["images"], "labels": labels}
    frozen = {n: p.detach().clone() for n, p in classifier.named_parameters() if not p.requires_grad}
    assert set(frozen) == {"logit_scale"} | {n for n, _ in classifier.named_parameters()
                                              if n.startswith(("text_tower.", "text_proj."))}
    optimiser = torch.optim.AdamW([p for p in classifier.parameters() if p.requires_grad], lr=1e-3)
    first = classifier.loss(batch)[0].item()
    for _ in range(10):
        loss, _ = classifier.loss(batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert classifier.loss(batch)[0].item() < 0.7 * first
    assert all(torch.equal(p, frozen[n]) for n, p in classifier.named_parameters() if n in frozen)
    multi_hot = torch.nn.functional.one_hot(labels, len(dm.classnames()))  # the scenes' labels: several per image
    assert torch.isclose(classifier.loss({**batch, "labels": multi_hot})[0],
                         classifier.loss(batch)[0], atol=1e-5)


def test_a_head_over_other_classes_than_the_data_is_refused(source):
    model, dm, _ = source
    classifier = FinetuneClassifier.from_contrastive(model, ["red circle", "blue star"])
    with pytest.raises(DataError, match="the data's 56 classes .* are not the head's 2 .*set objective.classnames"):
        classifier.initialise_head(dm)


def test_from_contrastive_keeps_the_source_parameter_names(source):
    model, dm, _ = source
    classifier = FinetuneClassifier.from_contrastive(model, dm.classnames())
    names = set(classifier.state_dict())
    assert names - set(model.state_dict()) == {"head.weight", "head.bias", "head.initialised"}
    assert set(model.state_dict()) <= names
    assert isinstance(classifier, Contrastive)


def test_fit_initialises_the_head_once_and_a_resumed_run_does_not_again(tiny_cfg, monkeypatch):
    calls = []
    original = FinetuneClassifier.set_zero_shot_head
    monkeypatch.setattr(FinetuneClassifier, "set_zero_shot_head",
                        lambda self, *a, **k: (calls.append(1), original(self, *a, **k))[1])
    run = ["objective=finetune_classifier", "data.labels=true", "trainer.max_steps=4",
           "callbacks.checkpoint.every_n_train_steps=2", "callbacks.checkpoint.save_top_k=-1"]
    full = fit(tiny_cfg(*run))
    assert calls == [1]
    assert "zeroshot/novel_pairs/top1" in full.metrics and "retrieval/scenes/image_to_text_r1" in full.metrics
    ckpt, _ = load_checkpoint(full.checkpoint)
    assert bool(ckpt["state_dict"]["objective.head.initialised"])
    middle = Path(full.checkpoint).parent / "step0000002.ckpt"
    resumed = fit(tiny_cfg(*run, f"resume={middle}"))
    assert calls == [1]  # not again
    end, _ = load_checkpoint(resumed.checkpoint)
    for name, value in ckpt["state_dict"].items():
        assert torch.equal(end["state_dict"][name], value), name


def test_digits_batches_carry_each_scans_digit_for_the_classifier(tiny_cfg):
    dm = instantiate(tiny_cfg("data=digits", "data.labels=true").data)
    assert dm.classnames() == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    dm.setup("fit")
    batch = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    captions = dm.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert batch["labels"].shape == (len(captions),)
    for caption, label in zip(captions, batch["labels"].tolist(), strict=True):  # the caption names the same digit
        assert dm.classnames()[label] in caption.replace(" ", "") or str(label) in caption, caption
