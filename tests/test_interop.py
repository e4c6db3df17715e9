"""CLIP models in and out: OpenAI/open_clip checkpoints imported into clipkit towers give open_clip's embeddings;
clipkit models exported for transformers and open_clip give clipkit's; towers with no equivalent are refused.
open_clip is the reference (random weights: nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import clipkit
from clipkit.cli import main
from clipkit.interop.keymap import convert
from clipkit.interop.layouts import IMAGE, OPENAI_RESNET, OPENAI_VIT
from clipkit.interop.openai_clip import import_checkpoint
from clipkit.train import fit

SMALL_VIT = {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16}
SMALL_RESNET = {"image_size": 64, "layers": [1, 2, 1, 1], "width": 16}
SMALL_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}
TEXTS = ["a photo of a cat.", "two red circles and a BLUE star!", "a diagram"]
QUICK_GELU_VIT = ["model/image=vit_tiny", "+model.image.act_layer=quick_gelu"]  # CLIP's form, open_clip's activation


def open_clip_model(vision: dict, text: dict = SMALL_TEXT, seed: int = 0, **kwargs) -> torch.nn.Module:
    """An open_clip CLIP with random weights, its gains, biases and batch-norm statistics randomised too, so that
    a weight left at its default or put in the wrong place shows."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=True, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                b.normal_(0, 0.1)
    return model


def embeddings_close(ours: clipkit.api.ClipModel, reference, size: int, atol: float = 1e-5) -> float:
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pairs = [(ours.encode_image(images), reference.encode_image(images, normalize=True)),
                 (ours.encode_text(TEXTS), reference.encode_text(open_clip.tokenize(TEXTS), normalize=True))]
    error = max(float((a - b).abs().max()) for a, b in pairs)
    assert error < atol, error
    return error


@pytest.fixture(params=["vit", "resnet"])
def imported(request, isolated):
    """(open_clip model, its state dict saved as OpenAI's layout, the clipkit import of it)."""
    reference = open_clip_model(SMALL_VIT if request.param == "vit" else SMALL_RESNET)
    torch.save(reference.state_dict(), isolated / "openai.pt")
    out = import_checkpoint(isolated / "openai.pt", isolated / "imported.safetensors")
    return reference, out


def test_imported_towers_give_open_clips_embeddings(imported):
    reference, out = imported
    embeddings_close(clipkit.load(out), reference, 64)


def test_key_tables_agree_with_timms_own_openai_converters(imported):
    """The import tables rename OpenAI's visual towers exactly as timm's checkpoint filters do (proj / c_proj aside:
    timm puts them in a classifier head, clipkit in the objective's image projection)."""
    from timm.models import byobnet, vision_transformer

    reference, out = imported
    model = clipkit.load(out).objective.image_tower.model
    vit = hasattr(model, "blocks")
    state = {k: v for k, v in reference.state_dict().items() if k.startswith("visual.")}
    ours, unmatched = convert(state, OPENAI_VIT if vit else OPENAI_RESNET, to_theirs=False)
    assert unmatched == []
    ours = {k.removeprefix(IMAGE): v for k, v in ours.items() if k.startswith(IMAGE)}
    timms = (vision_transformer if vit else byobnet).checkpoint_filter_fn(state, model)
    timms = {k: v for k, v in timms.items() if not k.startswith(("head.weight", "head.bias", "head.proj"))}
    assert set(ours) == set(timms) and len(ours) > 20
    assert all(torch.equal(ours[k].flatten(), timms[k].flatten()) for k in ours)


def test_the_head_width_the_weights_cannot_show_is_taken_as_told(isolated, capsys):
    """Attention heads are invisible in the weights (ViT-H-14's are 80 wide, OpenAI's 64): the same weights with
    other heads are another model, so the import uses the widths it is given."""
    reference = open_clip_model({**SMALL_VIT, "head_width": 32}, {**SMALL_TEXT, "heads": 2})
    torch.save(reference.state_dict(), isolated / "narrow.pt")
    assert main(["import", f"ckpt={isolated / 'narrow.pt'}", "image_head_width=32", "text_head_width=32"]) == 0
    embeddings_close(clipkit.load(isolated / "narrow.clipkit.safetensors"), reference, 64)
    default = import_checkpoint(isolated / "narrow.pt", isolated / "default.safetensors")  # 64 wide: 1 head each
    with pytest.raises(AssertionError):
        embeddings_close(clipkit.load(default), reference, 64)
    assert main(["import", f"ckpt={isolated / 'narrow.pt'}", "out=x.safetensors", "image_head_width=48"]) == 2
    assert "image_head_width=48 does not divide the image tower's width 64" in capsys.readouterr().err


def test_import_refuses_what_it_cannot_place(isolated, capsys):
    state = open_clip_model(SMALL_VIT).state_dict()
    state["visual.extra_adapter.weight"] = torch.zeros(3)
    torch.save(state, isolated / "odd.pt")
    assert main(["import", f"ckpt={isolated / 'odd.pt'}"]) == 2
    assert "1 tensors of the checkpoint have no place in a clipkit CLIP model: visual.extra_adapter.weight" in \
        capsys.readouterr().err
    torch.save({"conv.weight": torch.zeros(3)}, isolated / "other.pt")
    assert main(["import", f"ckpt={isolated / 'other.pt'}"]) == 2
    assert "not an OpenAI/open_clip CLIP checkpoint" in capsys.readouterr().err
    assert main(["import", f"ckpt={isolated / 'missing.pt'}"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert not list(isolated.glob("*.safetensors"))


def test_import_reads_open_clip_training_checkpoints_and_torchscript(isolated, capsys):
    reference = open_clip_model(SMALL_VIT)
    wrapped = {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}
    torch.save(wrapped, isolated / "epoch_3.pt")
    assert main(["import", f"ckpt={isolated / 'epoch_3.pt'}"]) == 0
    assert "imported" in capsys.readouterr().out
    embeddings_close(clipkit.load(isolated / "epoch_3.clipkit.safetensors"), reference, 64)
    traced = torch.jit.trace(reference, (torch.zeros(1, 3, 64, 64), open_clip.tokenize(["a"])), strict=False)
    traced.save(str(isolated / "jit.pt"))  # OpenAI's release format
    assert main(["import", f"ckpt={isolated / 'jit.pt'}", f"out={isolated / 'jit.safetensors'}"]) == 0
    embeddings_close(clipkit.load(isolated / "jit.safetensors"), reference, 64)


def test_the_imported_tokenizer_is_openai_clips():
    from clipkit.tokenization import openai_clip_tokenizer, tokenize

    texts = [*TEXTS, "naïve café, 3.5 dogs", "word " * 100]  # the last one is truncated with its end token kept
    ours = tokenize(openai_clip_tokenizer(), texts, 77)
    assert torch.equal(ours["input_ids"] * ours["attention_mask"], open_clip.tokenize(texts))


def _pipeline_probabilities(folder, image, labels, template):
    from transformers import pipeline

    result = pipeline("zero-shot-image-classification", model=str(folder))(
        str(image), candidate_labels=labels, hypothesis_template=template)
    return torch.tensor([{r["label"]: r["score"] for r in result}[label] for label in labels])


def _images(folder, sizes):
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(sizes):
        paths.append(folder / f"image{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_an_imported_vit_exports_back_to_open_clip_and_to_transformers(isolated):
    from transformers import CLIPModel

    reference = open_clip_model(SMALL_VIT)
    torch.save(reference.state_dict(), isolated / "openai.pt")
    imported = import_checkpoint(isolated / "openai.pt", isolated / "imported.safetensors")
    assert main(["export", f"ckpt={imported}", "format=open_clip", f"out={isolated / 'oc'}"]) == 0
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{isolated / 'oc'}")
    embeddings_close(clipkit.load(imported), loaded.eval(), 64)
    assert preprocess.transforms[0].size == 64  # the run's resize travels with it

    assert main(["export", f"ckpt={imported}", "format=hf", f"out={isolated / 'hf'}"]) == 0
    hf = CLIPModel.from_pretrained(str(isolated / "hf")).eval()
    assert hf.logit_scale.item() == pytest.approx(reference.logit_scale.item())
    labels, template = ["cat", "dog", "red circle"], "This is a photo of {}."
    model = clipkit.load(imported)
    for image in _images(isolated, [(64, 64), (100, 140)]):  # the second is resized and cropped
        ours = model.classify([image], labels, [template])[0]
        assert torch.allclose(_pipeline_probabilities(isolated / "hf", image, labels, template), ours, atol=1e-4)


@pytest.fixture
def trained_vit(tiny_cfg):
    """A clipkit run with CLIP-compatible towers and clipkit's own BPE (end token at id 2)."""
    return fit(tiny_cfg(*QUICK_GELU_VIT, "trainer.max_steps=2", "experiment_name=test_interop"))


def test_a_trained_clipkit_model_exports_with_its_own_tokenizer(trained_vit, isolated):
    from transformers import AutoTokenizer, CLIPModel

    model = clipkit.load(trained_vit.weights)
    assert model.tokenizer.eos_token_id == 2
    assert main(["export", f"ckpt={trained_vit.checkpoint}", "format=hf", f"out={isolated / 'hf'}"]) == 0
    # transformers pools at argmax(ids) when eos_token_id is 2: the export moved the end token to the last id
    exported = AutoTokenizer.from_pretrained(str(isolated / "hf"))
    ours = model.tokenizer(TEXTS)["input_ids"]
    last = len(model.tokenizer) - 1
    config = CLIPModel.from_pretrained(str(isolated / "hf")).config
    assert exported.eos_token_id == last == config.text_config.eos_token_id
    assert exported(TEXTS)["input_ids"] == [[last if i == 2 else 2 if i == last else i for i in row] for row in ours]
    labels, template = ["red circle", "blue square", "green star"], "a photo of a {}."
    for image in _images(isolated, [(32, 32), (50, 40)]):
        assert torch.allclose(_pipeline_probabilities(isolated / "hf", image, labels, template),
                              model.classify([image], labels, [template])[0], atol=1e-4)

    assert main(["export", f"ckpt={trained_vit.weights}", "format=open_clip", f"out={isolated / 'oc'}"]) == 0
    loaded = open_clip.create_model_and_transforms(f"local-dir:{isolated / 'oc'}")[0].eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{isolated / 'oc'}")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images, normalize=True), model.encode_image(images), atol=1e-5)
        assert torch.allclose(loaded.encode_text(tokenizer(TEXTS), normalize=True), model.encode_text(TEXTS), atol=1e-5)


@pytest.mark.parametrize("overrides,fmt,message", [
    ([], "hf", "its patch embedding is a CNN stem (a hybrid ViT)"),  # the default tower
    (["model/image=vit_tiny"], "open_clip", "open_clip uses one activation for both towers"),
    (["model/image=resnet_clip_tiny"], "open_clip", "its features have stride 16"),
    (["model/image=resnet_clip_tiny"], "hf", "Hugging Face's CLIPModel holds only a CLIP-style ViT"),
    ([*QUICK_GELU_VIT, "objective=bow_contrastive"], "hf", "text tower bag of words: only a CLIP text transformer"),
    (["objective=bow_prediction"], "open_clip", "BagOfWordsPrediction has no CLIP equivalent"),
])
def test_towers_without_an_equivalent_are_refused_and_nothing_is_written(tiny_cfg, isolated, capsys, overrides,
                                                                         fmt, message):
    result = fit(tiny_cfg(*overrides, "trainer.max_steps=1"))
    capsys.readouterr()  # training's own log lines
    assert main(["export", f"ckpt={result.weights}", f"format={fmt}", f"out={isolated / 'export'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (isolated / "export").exists() and not list(isolated.glob(".export.*"))


def test_export_mistakes_are_one_line(trained_vit, isolated, capsys):
    (isolated / "full").mkdir()
    (isolated / "full" / "keep.txt").write_text("mine")
    for args, message in [
        ([f"ckpt={trained_vit.weights}", "format=onnx", "out=x"], "format=onnx: choose hf or open_clip"),
        ([f"ckpt={trained_vit.weights}", "format=hf", f"out={isolated / 'full'}"], "exists and is not an empty folder"),
        ([f"ckpt={trained_vit.weights}", "out=x"], "export needs format=..."),
    ]:
        assert main(["export", *args]) == 2
        assert message in capsys.readouterr().err
    assert (isolated / "full" / "keep.txt").read_text() == "mine"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-32-quickgelu", "RN50-quickgelu"])
def test_full_size_openai_layouts_import_within_1e_5(name, isolated):
    """The paper's ViT-B/32 and RN50, built by open_clip at full size with random weights."""
    torch.manual_seed(0)
    reference = open_clip.create_model(name, pretrained=None).eval()
    torch.save(reference.state_dict(), isolated / "openai.pt")
    out = import_checkpoint(isolated / "openai.pt", isolated / "imported.safetensors")
    embeddings_close(clipkit.load(out), reference, 224)
