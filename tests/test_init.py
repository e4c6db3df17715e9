"""``fit init=PATH``: a new run starts from any model clipkit reads (a fit checkpoint or its safetensors, an imported
open_clip file, a transformers CLIPModel folder) or from one tower's weights; the source brings its architecture and
tokenizer, its tensors must fit exactly, and the MLflow run records where it started."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import mlflow
import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

import clipkit
from clipkit.cli import main
from clipkit.evaluate import build, load_checkpoint
from clipkit.init import InitError, match_state
from clipkit.interop.openai_clip import import_checkpoint
from clipkit.tokenization import special_tokens, tokenizer_json
from clipkit.train import fit, prepare
from clipkit.weights import export_weights
from tests.conftest import TINY
from tests.test_interop import QUICK_GELU_VIT, SMALL_RESNET, SMALL_VIT, TEXTS, open_clip_model


def objective_state(module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if k.startswith("objective.")}


def same_weights(a, b) -> bool:
    a, b = objective_state(a), objective_state(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def source(tiny_cfg, isolated):
    """(a tiny untrained model, a clipkit .safetensors of it): a source for init= without training one."""
    run = prepare(tiny_cfg("seed=7"))
    info = {"config": run.record.config_yaml, "tokenizer": tokenizer_json(run.tokenizer),
            "tokenizer_specials": json.dumps(special_tokens(run.tokenizer))}
    return run.module, export_weights(run.module.state_dict(), info, isolated / "source.safetensors")


@pytest.mark.parametrize("vision", [SMALL_VIT, SMALL_RESNET], ids=["vit", "resnet"])
def test_a_run_from_an_imported_open_clip_model_gives_its_zero_shot_logits_before_training(vision, tiny_cfg, isolated):
    """The issue's acceptance test: open_clip (random weights) -> clipkit import -> fit init=; the module fit would
    train gives open_clip's zero-shot logits, its architecture, image size and tokenizer taken from the source."""
    reference = open_clip_model(vision)
    torch.save(reference.state_dict(), isolated / "openai.pt")
    imported = import_checkpoint(isolated / "openai.pt", isolated / "imported.safetensors")
    cfg = tiny_cfg(f"init={imported}")
    run = prepare(cfg)
    assert cfg.data.image_size == 64 and cfg.objective.embed_dim == 32 and len(run.tokenizer) == 49408
    assert int(run.module.images_seen) == 0
    labels = ["a photo of a cat.", "a photo of a dog.", "a diagram"]
    prompts = {k: v.unsqueeze(1) for k, v in run.datamodule.tokenizer(labels, padding="max_length", max_length=77,
                                                                       return_tensors="pt").items()
               if k in ("input_ids", "attention_mask")}
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    objective = run.module.objective.eval()
    with torch.no_grad():
        ours = objective.zero_shot_logits(images, objective.zero_shot_classifier(prompts))
        text = reference.encode_text(open_clip.tokenize(labels), normalize=True)
        theirs = reference.logit_scale.exp() * reference.encode_image(images, normalize=True) @ text.T
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()


@pytest.mark.slow
def test_a_fit_checkpoint_and_its_safetensors_start_a_new_run_recorded_with_their_sha256(tiny_cfg, isolated):
    first = fit(tiny_cfg("trainer.max_steps=2", "experiment_name=source"))
    for path in (first.checkpoint, first.weights):
        again = prepare(tiny_cfg(f"init={path}", "seed=11"))
        assert same_weights(again.module, build(*load_checkpoint(first.weights)))
        assert int(again.module.images_seen) == 0
    image = isolated / "image.pth"
    torch.save(build(*load_checkpoint(first.weights)).objective.image_tower.model.state_dict(), image)
    overrides = (f"init={first.checkpoint}", f"model.image.init={image}", "trainer.max_steps=1",
                 "experiment_name=started")
    started = fit(tiny_cfg(*overrides))
    assert started.images_seen == 16  # a new run: one step of 16 images, not the source's 32 more
    tags = mlflow.MlflowClient(started.tracking_uri).get_run(started.run_id).data.tags
    assert tags["init.sha256"] == hashlib.sha256(Path(first.checkpoint).read_bytes()).hexdigest()
    assert tags["init.path"] == first.checkpoint and tags["init.image.path"] == str(image)
    assert tags["init.image.sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    # resume and init together: the run continues from its checkpoint; init's weights are not put in first
    resumed = prepare(tiny_cfg(*overrides, f"resume={started.checkpoint}"))
    assert resumed.resume is not None and not same_weights(resumed.module, build(*load_checkpoint(first.weights)))


def test_the_loaded_weights_are_the_sources(source, tiny_cfg):
    module, path = source
    assert same_weights(prepare(tiny_cfg(f"init={path}", "seed=3")).module, module)
    assert not same_weights(prepare(tiny_cfg("seed=3")).module, module)


def test_a_transformers_clipmodel_folder_is_a_source_and_imports(tiny_cfg, isolated, capsys):
    """The inverse of format=hf export: the folder's model, read back, gives the exported embeddings."""
    from clipkit.interop.hf_clip import export_hf

    cfg = tiny_cfg(*QUICK_GELU_VIT)
    run = prepare(cfg)
    export_hf(run.module, cfg, run.tokenizer, isolated / "hf")
    started = prepare(tiny_cfg(f"init={isolated / 'hf'}"))
    assert main(["import", f"ckpt={isolated / 'hf'}", f"out={isolated / 'hf.safetensors'}"]) == 0
    model = clipkit.load(isolated / "hf.safetensors")
    assert same_weights(started.module, build(*load_checkpoint(isolated / "hf.safetensors")))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    original = run.module.objective.eval()
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), original.encode_image(images), atol=1e-5)
        ours = model.encode_text(TEXTS)
        enc = run.tokenizer(TEXTS, padding="max_length", max_length=cfg.data.context_length, return_tensors="pt")
        assert torch.allclose(ours, original.encode_text(enc["input_ids"], enc["attention_mask"]), atol=1e-5)


def test_one_tower_starts_from_a_timm_file_or_a_transformers_folder(source, tiny_cfg, isolated):
    module, path = source
    image = module.objective.image_tower.model
    torch.save({**image.state_dict(), "head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)},
               isolated / "image.pth")  # a classifier head in the file is timm's to drop
    text_dir = isolated / "text"
    module.objective.text_tower.model.save_pretrained(str(text_dir))
    run = prepare(tiny_cfg(f"model.image.init={isolated / 'image.pth'}", f"model.text.init={text_dir}", "seed=5"))
    objective = run.module.objective
    assert all(torch.equal(v, image.state_dict()[k]) for k, v in objective.image_tower.model.state_dict().items())
    text = module.objective.text_tower.model.state_dict()
    assert all(torch.equal(v, text[k]) for k, v in objective.text_tower.model.state_dict().items())
    assert not torch.equal(objective.image_proj.weight, module.objective.image_proj.weight)  # only the towers
    from_file = prepare(tiny_cfg(f"model.text.init={path}", "seed=5")).module.objective.text_tower.model
    assert all(torch.equal(v, text[k]) for k, v in from_file.state_dict().items())


def test_a_tower_file_that_does_not_fit_is_one_line(source, tiny_cfg, isolated):
    module, _ = source
    state = module.objective.image_tower.model.state_dict()
    del state["blocks.0.norm1.weight"]
    torch.save(state, isolated / "short.pth")
    with pytest.raises(Exception, match=r"model.image.init=.*short.pth does not fit .*blocks.0.norm1.weight"):
        prepare(tiny_cfg(f"model.image.init={isolated / 'short.pth'}"))


def fit_cli(isolated, *args: str) -> int:
    from hydra.core.global_hydra import GlobalHydra

    overrides = [*TINY, "data.supersample=1", f"paths.output_dir={isolated}/out", "trainer.max_steps=1",
                 f"logger.tracking_uri=sqlite:///{isolated}/mlflow.db", *args]
    try:
        return main(["fit", *overrides])
    except SystemExit as done:
        return done.code
    finally:
        GlobalHydra.instance().clear()


def edited(path, isolated, name: str, edit) -> str:
    state = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    edit(state)
    save_file(state, str(isolated / name), metadata=metadata)
    return str(isolated / name)


@pytest.mark.parametrize("case", ["names", "shape"])
def test_weights_that_do_not_fit_are_one_line_before_any_run(case, source, isolated):
    """Missing, unexpected and differently shaped tensors are named with the key to change; no MLflow run exists."""
    _, path = source
    key = "objective.text_tower.model.final_layer_norm.bias"
    args, want = (), [f"missing {key} (check model.text)", "unexpected objective.extra (check objective)"]
    if case == "names":
        path = edited(path, isolated, "odd.safetensors", lambda s: s.update({"objective.extra": s.pop(key)}))
    else:
        args, want = ("model.image.embed_dim=48",), ["pos_embed is [1, 16, 32] there but [1, 16, 48] here (+",
                                                     "you set model.image.embed_dim: drop it"]
    code = fit_cli(isolated, f"init={path}", *args)
    message = str(code)
    assert message.startswith("clipkit: error: init=") and message.count("\n") == 0, message
    assert "does not fit this model" in message and all(w in message for w in want), message
    assert message.endswith("or init_strict=false to load what fits")
    client = mlflow.MlflowClient(f"sqlite:///{isolated}/mlflow.db")
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_init_strict_false_loads_what_fits_and_lists_the_rest(source, tiny_cfg, isolated, caplog):
    module, path = source
    key = "objective.text_proj.weight"
    path = edited(path, isolated, "m.safetensors", lambda s: s.pop(key))
    with caplog.at_level(logging.WARNING, logger="clipkit.init"):
        run = prepare(tiny_cfg(f"init={path}", "init_strict=false", "seed=2"))
    assert f"skipped 1: missing {key}" in caplog.text
    ours, theirs = objective_state(run.module), objective_state(module)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k != key)
    assert not torch.equal(ours[key], theirs[key])


def test_the_command_line_wins_over_the_source_and_the_tokenizer_must_match(source, tiny_cfg):
    _, path = source
    cfg = tiny_cfg(f"init={path}", "model.image.locked=true", "objective.embed_dim=24")
    with pytest.raises(InitError, match=r"objective.image_proj.weight is \[16, 32\] there but \[24, 32\] here "
                                        r"\(\+1 more\): you set objective.embed_dim: drop it"):
        prepare(cfg, overrides=["model.image.locked=true", "objective.embed_dim=24"])
    cfg = tiny_cfg(f"init={path}", "model.image.locked=true", "objective.embed_dim=24")
    run = prepare(cfg, overrides=["model.image.locked=true"])  # embed_dim not set here: the source's
    assert cfg.objective.embed_dim == 16 and cfg.model.image.locked
    assert not any(p.requires_grad for p in run.module.objective.image_tower.parameters())
    with pytest.raises(InitError, match=r"init=.*: the tokenizer \(\d+ ids\) is not the one its text embedding "
                                        r"\(\d+ rows\) was trained with: drop the data.tokenizer override"):
        prepare(tiny_cfg(f"init={path}", "data.tokenizer.vocab_size=300"), overrides=["data.tokenizer.vocab_size=300"])


def test_lora_wrapped_layers_match_their_plain_source_keys():
    """peft keeps a wrapped layer's weight under ``.base_layer.``; its adapters are new."""
    target = {"q.base_layer.weight": torch.zeros(2, 2), "q.lora_A.default.weight": torch.zeros(1, 2),
              "q.lora_B.default.weight": torch.zeros(2, 1), "norm.weight": torch.zeros(2)}
    match = match_state(target, {"q.weight": torch.ones(2, 2), "norm.weight": torch.ones(2)})
    assert match.fits and match.pairs == {"q.base_layer.weight": "q.weight", "norm.weight": "norm.weight"}
    match = match_state(target, {"q.weight": torch.ones(3, 2), "norm.weight": torch.ones(2), "x": torch.ones(1)})
    assert match.mismatched == [("q.base_layer.weight", (3, 2), (2, 2))] and match.unexpected == ["x"]


def test_parts_an_objective_adds_are_new_unless_the_source_has_them():
    """A fine-tuning objective's new head (``Objective.new_heads``) is not expected in a pretrained source."""
    target = {"tower.weight": torch.zeros(2), "head.weight": torch.zeros(3)}
    assert match_state(target, {"tower.weight": torch.ones(2)}, fresh=("head.",)).fits
    assert match_state(target, {"tower.weight": torch.ones(2)}).missing == ["head.weight"]
    both = match_state(target, {"tower.weight": torch.ones(2), "head.weight": torch.ones(3)}, fresh=("head.",))
    assert both.pairs == {"tower.weight": "tower.weight", "head.weight": "head.weight"}


def test_a_source_that_is_not_a_model_is_one_line(isolated, capsys):
    torch.save({"w": torch.zeros(2)}, isolated / "plain.pt")
    assert fit_cli(isolated, f"init={isolated / 'plain.pt'}").startswith("clipkit: error: init=")
    assert fit_cli(isolated, f"init={isolated / 'nothing.safetensors'}") == 2
    assert "init" in capsys.readouterr().err
