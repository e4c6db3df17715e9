"""LoRA on either tower (``model.image.lora.r``, ``model.text.lora.r``): peft's adapters on each family's default
layers, only adapters and heads train, checkpoints keep the adapters, and everything that leaves a run (the final
model.safetensors, ``clipkit.load``, ``export``) has them merged and needs no peft."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors import safe_open

import clipkit
from clipkit.cli import main
from clipkit.config import compose_config
from clipkit.errors import UsageError
from clipkit.evaluate import build, load_checkpoint
from clipkit.models import BagOfWordsTower, ImageTower, TextTower
from clipkit.models.lora import base_key, is_adapter_key, merge_adapters, merged_weights, without_lora
from clipkit.module import decay_groups
from clipkit.train import fit
from tests.conftest import random_batch

TINY_VIT = {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32,
            "num_heads": 2}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None}
BOTH = ["model.image.lora.r=4", "model.text.lora.r=4"]
QUICK_GELU_VIT = ["model/image=vit_tiny", "+model.image.act_layer=quick_gelu"]  # exportable to HF and open_clip


def adapted_layers(tower: torch.nn.Module) -> set[str]:
    """Names (inside the tower's model) of the layers that carry an adapter."""
    return {n.split(".lora_A")[0].removeprefix("model.") for n, _ in tower.named_parameters() if ".lora_A." in n}


def bert_tower(**kwargs) -> TextTower:
    from transformers import BertConfig

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)
    return TextTower(config=config, pooling="mean", **kwargs)


def with_random_adapters(module: torch.nn.Module) -> torch.nn.Module:
    """peft starts lora_B at zero (the adapted model is the base model); give them values so merging shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if is_adapter_key(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module


# -- which layers --------------------------------------------------------------------------------------------------
def test_each_tower_family_gets_its_default_layers(tiny_cfg):
    vit = ImageTower(**TINY_VIT, lora=LORA)
    assert adapted_layers(vit) == {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"}
    hybrid = instantiate(tiny_cfg("model.image.lora.r=4").model.image)  # the default image tower: a CNN stem
    assert adapted_layers(hybrid) == adapted_layers(vit)  # not the stem, not the patch projection (also "proj")
    clip_text = instantiate(tiny_cfg("model.text.lora.r=4").model.text)
    layer = "encoder.layers.0."
    assert adapted_layers(clip_text) == {layer + n for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                             "self_attn.out_proj", "mlp.fc1", "mlp.fc2")}
    layer = "encoder.layer.0."
    assert adapted_layers(bert_tower(lora=LORA)) == {layer + n for n in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")}


def test_target_modules_overrides_the_default():
    assert adapted_layers(ImageTower(**TINY_VIT, lora={**LORA, "target_modules": ["qkv"]})) == {"blocks.0.attn.qkv"}


@pytest.mark.parametrize("make,inputs", [
    (lambda lora: ImageTower(**TINY_VIT, lora=lora), lambda: (torch.randn(2, 3, 32, 32),)),
    (lambda lora: bert_tower(lora=lora), lambda: (torch.randint(3, 100, (2, 7)), torch.ones(2, 7, dtype=torch.long))),
], ids=["vit", "bert"])
def test_an_adapted_tower_keeps_its_forward_and_starts_as_the_base_model(make, inputs):
    """peft's lora_B starts at zero: before any step the adapted tower computes exactly what the base one does."""
    torch.manual_seed(0)
    base = make(None).eval()
    torch.manual_seed(0)  # the same base weights; the adapters are drawn after them
    adapted = make(LORA).eval()
    x = inputs()
    assert torch.equal(base(*x), adapted(*x))


def test_towers_without_default_layers_are_refused_in_one_line(tiny_cfg):
    resnet = tiny_cfg("model/image=resnet_clip_tiny", "model.image.lora.r=4").model.image
    with pytest.raises(InstantiationException) as err:  # the CLI prints the cause, in one line
        instantiate(resnet)
    assert str(err.value.__cause__) == (
        "model.image.lora: no default LoRA layers for a ByobNet tower (clipkit knows timm ViT, CLIP text transformer, "
        "BERT-like text transformer); name the layers to adapt with model.image.lora.target_modules=[...]")
    with pytest.raises(ValueError, match="no default LoRA layers for a BagOfWordsTower tower"):
        BagOfWordsTower(100, 16, lora=LORA)
    bow = BagOfWordsTower(100, 16, lora={**LORA, "target_modules": ["embedding"]})  # named: adapted
    assert {n for n, p in bow.named_parameters() if p.requires_grad} == {
        "embedding.lora_embedding_A.default", "embedding.lora_embedding_B.default"}


def test_target_modules_that_name_no_layer_are_one_line():
    with pytest.raises(ValueError, match=r"^model.image.lora.target_modules=\['q_proj'\]: .*not found") as err:
        ImageTower(**TINY_VIT, lora={**LORA, "target_modules": ["q_proj"]})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("tower", ["image", "text"])
def test_lora_on_a_locked_tower_is_refused_before_anything_runs(tower, isolated, capsys):
    with pytest.raises(UsageError, match=rf"^model.{tower}.locked=True: must be false while model.{tower}.lora.r > 0 "
                                         rf".*drop model.{tower}.locked=true, or set model.{tower}.lora.r=0"):
        compose_config([f"model.{tower}.locked=true", f"model.{tower}.lora.r=8"])
    assert main(["fit", f"model.{tower}.locked=true", f"model.{tower}.lora.r=8"]) == 2
    assert "must be false while" in capsys.readouterr().err
    assert not (isolated / "mlflow.db").exists() and not (isolated / "mlruns").exists()  # no run was opened
    with pytest.raises(ValueError, match="on a locked tower"):  # built directly, without the schema
        ImageTower(**TINY_VIT, locked=True, lora=LORA)


def test_base_key_and_is_adapter_key_map_an_adapted_tower_onto_the_plain_one():
    """init= loads pretrained weights by these rules: every base weight has a source key, adapters are new."""
    plain, adapted = ImageTower(**TINY_VIT), ImageTower(**TINY_VIT, lora=LORA)
    names = [n for n, _ in adapted.state_dict().items()]
    assert {base_key(n) for n in names if not is_adapter_key(n)} == set(plain.state_dict())
    assert {n for n in names if is_adapter_key(n)} == {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert base_key("model.blocks.0.attn.qkv.base_layer.weight") == "model.blocks.0.attn.qkv.weight"


# -- what trains ---------------------------------------------------------------------------------------------------
def test_only_adapters_and_heads_train_and_hold_optimizer_state(tiny_cfg):
    module = instantiate(tiny_cfg(*BOTH).module)
    objective = module.objective
    trainable = {n for n, p in objective.named_parameters() if p.requires_grad}
    towers = ("image_tower.", "text_tower.")
    heads = {n for n, _ in objective.named_parameters() if not n.startswith(towers)}
    assert heads and trainable == heads | {n for n, _ in objective.named_parameters() if is_adapter_key(n)}
    assert any(n.startswith("image_tower.") for n in trainable) and any(n.startswith("text_tower.") for n in trainable)

    before = {n: p.detach().clone() for n, p in objective.named_parameters()}
    optimizer = module.optimizer_factory(decay_groups(objective, module.weight_decay, module.no_decay))
    for step in range(3):
        loss, _ = objective.loss(random_batch(8, seed=step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    params = dict(objective.named_parameters())
    assert {id(p) for p in optimizer.state} == {id(params[n]) for n in trainable}
    frozen = [n for n in params if n not in trainable]
    assert frozen and all(torch.equal(params[n], before[n]) for n in frozen)  # base weights bitwise unchanged
    assert all(not torch.equal(params[n], before[n]) for n in trainable if ".lora_B." in n)  # adapters moved


def test_merging_folds_the_adapters_into_plain_layers_with_the_same_embeddings(tiny_cfg):
    cfg = tiny_cfg(*BOTH)
    module = with_random_adapters(instantiate(cfg.module)).eval()
    images, batch = torch.randn(3, 3, 32, 32), random_batch(3)
    with torch.no_grad():
        before = (module.objective.encode_image(images),
                  module.objective.encode_text(batch["input_ids"], batch["attention_mask"]))
        assert merge_adapters(module) == 10  # 4 in the ViT block, 6 in the text layer
        after = (module.objective.encode_image(images),
                 module.objective.encode_text(batch["input_ids"], batch["attention_mask"]))
    for a, b in zip(before, after, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    state = module.state_dict()
    assert not any("lora" in k or "base_layer" in k for k in state)
    plain = instantiate(without_lora(cfg).module)  # the merged model is one built without adapters
    plain.load_state_dict(state)  # strict: same names, same shapes


def test_the_final_weights_are_merged_in_the_runs_precision_under_a_config_without_adapters(tiny_cfg):
    """What callbacks/export.py writes as model.safetensors for a LoRA run (here a float64 one)."""
    cfg = tiny_cfg(*BOTH)
    module = with_random_adapters(instantiate(cfg.module)).double()
    info = {"config": OmegaConf.to_yaml(cfg, resolve=True), "tokenizer": "{}"}
    state, merged_info = merged_weights(module.state_dict(), info)
    assert not any(is_adapter_key(k) or ".base_layer." in k for k in state)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float64}
    config = OmegaConf.create(merged_info["config"])
    assert config.model.image.lora.r == config.model.text.lora.r == 0 and merged_info["tokenizer"] == "{}"
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    plain = instantiate(config.module).double().eval()
    plain.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(plain.objective.encode_image(images), module.eval().objective.encode_image(images),
                              atol=1e-10)


# -- whole runs ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_lora_fit_checkpoints_adapters_and_exports_them_merged(tiny_cfg, isolated):
    """A short run with adapters on both towers: the checkpoint holds them; model.safetensors, clipkit.load and
    both export formats hold merged weights (no lora keys) giving the unmerged model's embeddings within 1e-5."""
    from transformers import CLIPModel

    result = fit(tiny_cfg(*QUICK_GELU_VIT, *BOTH, "trainer.max_steps=2", "module.optimizer.lr=1e-2"))
    ckpt, stored = load_checkpoint(result.checkpoint)
    assert any(is_adapter_key(k) for k in ckpt["state_dict"])
    unmerged = build(ckpt, stored, merge=False)
    assert any(p.abs().sum() > 0 for n, p in unmerged.named_parameters() if ".lora_B." in n)  # they trained
    trainable = sum(p.requires_grad for p in unmerged.parameters())  # adapters and heads: AdamW's state, no more
    assert len(ckpt["optimizer_states"][0]["state"]) == trainable < len(list(unmerged.parameters())) / 2

    with safe_open(result.weights, framework="pt") as f:
        assert not any("lora" in k or "base_layer" in k for k in f.keys())
        final = OmegaConf.create(f.metadata()["clipkit.config"])
    assert final.model.image.lora.r == final.model.text.lora.r == 0 and stored.model.image.lora.r == 4

    images, texts = torch.randn(2, 3, 32, 32), ["a red circle", "two blue squares"]
    from clipkit.tokenization import tokenize
    with torch.no_grad():
        model = clipkit.load(result.checkpoint)
        enc = tokenize(model.tokenizer, texts, model.context_length)
        expected = (unmerged.objective.encode_image(images), unmerged.objective.encode_text(**enc))
        for path in (result.checkpoint, result.weights):
            model = clipkit.load(path)
            assert model.config.model.text.lora.r == 0
            assert torch.allclose(model.encode_image(images), expected[0], atol=1e-5)
            assert torch.allclose(model.encode_text(texts), expected[1], atol=1e-5)

    assert main(["export", f"ckpt={result.checkpoint}", "format=hf", f"out={isolated / 'hf'}"]) == 0
    with safe_open(str(isolated / "hf" / "model.safetensors"), framework="pt") as f:
        assert not any("lora" in k or "base_layer" in k for k in f.keys())
    hf = CLIPModel.from_pretrained(str(isolated / "hf")).eval()
    with torch.no_grad():
        features = hf.get_image_features(pixel_values=images)
    exported = torch.nn.functional.normalize(getattr(features, "pooler_output", features), dim=-1)  # transformers 5
    assert torch.allclose(exported, expected[0], atol=1e-5)
    assert main(["export", f"ckpt={result.checkpoint}", "format=open_clip", f"out={isolated / 'oc'}"]) == 0
    with safe_open(str(isolated / "oc" / "open_clip_model.safetensors"), framework="pt") as f:
        assert f.keys() and not any("lora" in k or "base_layer" in k for k in f.keys())


@pytest.mark.slow
def test_resuming_a_lora_run_continues_its_adapters_exactly(tiny_cfg):
    run = [*BOTH, "trainer.max_steps=4", "callbacks.checkpoint.every_n_train_steps=2",
           "callbacks.checkpoint.save_top_k=-1", "+model.text.config.attention_dropout=0.2", "model.text.lora.dropout=0.1"]
    full = fit(tiny_cfg(*run))
    expected = torch.load(full.checkpoint, weights_only=True)["state_dict"]
    middle = Path(full.checkpoint).parent / "step0000002.ckpt"
    resumed = fit(tiny_cfg(*run, f"resume={middle}"))
    got = torch.load(resumed.checkpoint, weights_only=True)["state_dict"]
    assert got.keys() == expected.keys() and any(is_adapter_key(k) for k in got)
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_lora_fine_tuning_from_init_changes_only_the_adapted_layers_and_what_lies_outside_the_towers(tiny_cfg, isolated):
    """The README's LoRA command: a contrastive model fine-tuned with ``init=`` and adapters on both towers. The
    source's weights load under the adapters (``.base_layer``), and the merged result has exactly the source's
    tensors; inside the towers only the weights an adapter was merged into moved (and batch-norm statistics, which
    training mode updates), outside them the projections and temperature train as usual."""
    source = fit(tiny_cfg("trainer.max_steps=2"))
    tuned = fit(tiny_cfg("experiments=finetune_contrastive", f"init={source.weights}", "trainer.max_steps=2",
                         "module.warmup_steps=1", "module.optimizer.lr=1e-2", *BOTH,
                         f"paths.output_dir={isolated}/ft"), overrides=BOTH)
    before, after = (load_checkpoint(path)[0]["state_dict"] for path in (source.weights, tuned.weights))
    assert set(after) == set(before)
    module = build(*load_checkpoint(tuned.checkpoint), merge=False)
    adapted = {f"objective.{name.split('.lora_A')[0].replace('.base_layer', '')}."
               for name, _ in module.objective.named_parameters() if ".lora_A." in name}
    assert any(".image_tower." in a for a in adapted) and any(".text_tower." in a for a in adapted)
    statistics = ("running_mean", "running_var", "num_batches_tracked")  # the hybrid stem's batch norm still counts
    for key in (k for k in before if k.startswith(("objective.image_tower.", "objective.text_tower."))
                and not k.endswith(statistics)):
        assert torch.equal(before[key], after[key]) != (key in {f"{a}weight" for a in adapted}), key
