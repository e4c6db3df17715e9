"""``clipkit.load`` and ``clipkit predict``: a trained model classifies and embeds images and text on its own."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import clipkit
from clipkit.cli import main
from clipkit.train import fit

LABELS = ["red circle", "blue square", "green star"]


@pytest.fixture
def trained(tiny_cfg):
    return fit(tiny_cfg("trainer.max_steps=2", "experiment_name=test_predict"))


def _image(path, size=(40, 52), seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def test_load_embeds_and_classifies_as_the_contrastive_objective_scores(trained, isolated):
    model = clipkit.load(trained.weights)
    images = [_image(isolated / "a.png"), _image(isolated / "b.jpg", seed=1)]
    image, text = model.encode_image(images), model.encode_text(LABELS)
    assert image.shape == (2, 16) and text.shape == (3, 16)  # objective.embed_dim of the tiny model
    assert torch.allclose(image.norm(dim=-1), torch.ones(2)) and torch.allclose(text.norm(dim=-1), torch.ones(3))
    probs = model.classify(images, LABELS, ["{}"])
    expected = (model.objective.logit_scale.exp() * image @ text.T).softmax(-1)
    assert torch.allclose(probs, expected, atol=1e-6) and torch.allclose(probs.sum(-1), torch.ones(2))
    # the checkpoint and its safetensors export are the same model
    assert torch.allclose(clipkit.load(trained.checkpoint).classify(images, LABELS), model.classify(images, LABELS))


def test_predict_ranks_labels_for_files_and_folders(trained, isolated, capsys):
    folder = isolated / "photos"
    folder.mkdir()
    paths = [_image(isolated / "a.png"), _image(folder / "b.png", seed=1), _image(folder / "c.jpg", seed=2)]
    (folder / "notes.txt").write_text("not an image, not read")
    out = isolated / "probs.json"
    assert main(["predict", f"ckpt={trained.weights}", f"images=[{paths[0]},{folder}]",
                 f"labels=[{','.join(LABELS)}]", "top_k=2", f"out={out}"]) == 0
    printed = capsys.readouterr().out.splitlines()
    report = json.loads(out.read_text())
    assert list(report["images"]) == [str(p) for p in paths]
    expected = clipkit.load(trained.weights).classify(paths, LABELS)
    for path, row in zip(paths, expected, strict=True):
        assert [report["images"][str(path)][label] for label in LABELS] == pytest.approx(row.tolist(), abs=1e-6)
        at = printed.index(str(path))
        ranked = [line.split("%  ")[1].strip() for line in printed[at + 1:at + 3]]
        assert ranked == [LABELS[i] for i in row.argsort(descending=True)[:2]]


@pytest.mark.parametrize("images,labels,message", [
    (["missing.png"], LABELS, "no such image or folder: missing.png"),
    (["broken.png"], LABELS, "cannot read image broken.png: not_an_image"),
    (["empty"], LABELS, "no images"),
    (["a.png"], ["cat", " "], "labels must be non-empty names"),
])
def test_predict_mistakes_are_one_line(trained, isolated, capsys, images, labels, message):
    _image(isolated / "a.png")
    (isolated / "broken.png").write_bytes(b"these bytes are no image")
    (isolated / "empty").mkdir()
    assert main(["predict", f"ckpt={trained.weights}", f"images=[{','.join(images)}]",
                 f"labels=[{','.join(repr(x) for x in labels)}]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_predict_says_what_it_needs(capsys):
    assert main(["predict", "ckpt=x.safetensors"]) == 2
    assert "predict needs images=..., labels=..." in capsys.readouterr().err


def test_every_objective_classifies_but_only_a_joint_space_embeds(isolated, tiny_cfg):
    result = fit(tiny_cfg("objective=bow_prediction", "trainer.max_steps=1"))
    model = clipkit.load(result.weights)
    image = _image(isolated / "a.png")
    probs = model.classify([image], LABELS)
    assert probs.shape == (1, 3) and float(probs.sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="BagOfWordsPrediction has no joint embedding space"):
        model.encode_image([image])
