"""Speed and memory switches are config: strategies, precision, activation checkpointing, compile."""

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy
from timm.models.vision_transformer import Block
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from clipkit.config import compose_config
from clipkit.strategies import BlockFSDP, block_types
from clipkit.train import fit

CHECKPOINTING = ["model.image.grad_checkpointing=true", "model.text.grad_checkpointing=true"]


def saved_bytes(fn) -> int:
    """Bytes autograd keeps for the backward pass while ``fn`` runs: what activation checkpointing cuts."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_activation_checkpointing_switches_are_the_towers_own(tiny_cfg):
    objective = instantiate(tiny_cfg("model/image=vit_tiny", *CHECKPOINTING).objective)
    assert objective.image_tower.model.grad_checkpointing  # timm's set_grad_checkpointing
    assert objective.text_tower.model.is_activation_checkpointing  # transformers' activation_checkpointing_enable


@pytest.mark.parametrize("tower", ["image", "text"])
def test_activation_checkpointing_cuts_what_each_tower_keeps_for_backward(tiny_cfg, tower):
    deeper = ["model.image.depth=4", "model.text.config.num_hidden_layers=4", "data.image_size=64"]
    images = torch.randn(8, 3, 64, 64)
    ids, mask = torch.randint(3, 50, (8, 32)), torch.ones(8, 32, dtype=torch.long)
    kept = []
    for extra in ([], CHECKPOINTING):
        objective = instantiate(tiny_cfg("model/image=vit_tiny", *deeper, *extra).objective).train()
        encode = (lambda o=objective: o.encode_image(images)) if tower == "image" else (
            lambda o=objective: o.encode_text(ids, mask))
        kept.append(saved_bytes(encode))
    assert kept[1] < 0.5 * kept[0], kept


def test_activation_checkpointing_leaves_gradients_unchanged(tiny_cfg):
    grads = []
    for extra in ([], CHECKPOINTING):
        torch.manual_seed(0)
        objective = instantiate(tiny_cfg("model/image=vit_tiny", *extra).objective)
        batch = {"images": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
                 "input_ids": torch.arange(32).reshape(4, 8) + 3, "attention_mask": torch.ones(4, 8, dtype=torch.long)}
        objective.loss(batch)[0].backward()
        grads.append({n: p.grad for n, p in objective.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("overrides,expected", [
    ([], {Block, CLIPEncoderLayer}),  # the default hybrid ViT: a ResNet stem, then timm's Block
    (["model/image=vit_tiny"], {Block, CLIPEncoderLayer}),
    (["objective=caption_lm", "model/image=vit_tiny"], {Block, GPT2Block}),
])
def test_fsdp_wraps_the_blocks_of_both_towers(tiny_cfg, overrides, expected):
    found = block_types(instantiate(tiny_cfg(*overrides).objective))
    names = {t.__name__ for t in found}
    for want in expected:
        assert (want in names) if isinstance(want, str) else (want in found), (want, names)
    assert "Block" in names or "Bottleneck" in names  # the image tower's blocks, never just the text tower's


def test_fsdp_wraps_the_residual_blocks_of_a_cnn_tower():
    tower = instantiate(compose_config(["model/image=resnet_clip_tiny", "data.image_size=32"]).model.image)
    assert {t.__name__ for t in block_types(tower)} == {"BottleneckBlock"}


def test_fsdp_unit_classes_hold_no_whole_tower(tiny_cfg):
    """Wrapping a class that contains the whole tower would put all parameters in one FSDP unit."""
    objective = instantiate(tiny_cfg().objective)
    found = block_types(objective)
    assert not any(isinstance(m, tuple(found)) for m in (objective, objective.image_tower, objective.text_tower))


def test_strategies_are_config(tiny_cfg):
    ddp = instantiate(tiny_cfg("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2").trainer, logger=False)
    assert isinstance(ddp.strategy, DDPStrategy) and ddp.world_size == 2
    fsdp = tiny_cfg("trainer=fsdp").trainer
    assert isinstance(instantiate(fsdp.strategy), BlockFSDP)
    with pytest.raises(Exception, match="(?i)deepspeed"):  # an optional extra: Lightning names what to install
        instantiate(tiny_cfg("trainer=deepspeed").trainer.strategy)


@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "64-true"])
def test_precision_is_one_key_for_the_whole_run(tiny_cfg, precision):
    cfg = tiny_cfg(f"precision={precision}", "trainer.max_steps=2", "accumulate=2", "~callbacks.zeroshot")
    assert str(cfg.trainer.precision) == precision
    result = fit(cfg)  # bf16 autocast on the CPU, through the accumulating (manual) step
    assert result.images_seen == 32 and torch.isfinite(torch.tensor(result.metrics["train/loss"]))


def test_compile_compiles_every_part_of_the_objective_in_place(tiny_cfg):
    module = instantiate(tiny_cfg("compile=true").module)
    names = list(module.state_dict())
    module.configure_model()
    assert all(part._compiled_call_impl is not None for part in module.objective.children())
    assert list(module.state_dict()) == names  # checkpoints keep their keys


@pytest.mark.slow
def test_training_compiled(tiny_cfg):
    result = fit(tiny_cfg("compile=true", "model/image=vit_tiny", "trainer.max_steps=3", "~callbacks.zeroshot"))
    assert result.images_seen == 48 and torch.isfinite(torch.tensor(result.metrics["train/loss"]))
