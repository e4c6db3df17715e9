"""The fine-tuning recipe's optimiser knobs: layer-wise learning-rate decay over both towers, a head learning rate,
constant-with-cool-down, gradient clipping with and without accumulation; their defaults leave training as it was."""

import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader

from clipkit.config import compose_config
from clipkit.errors import UsageError
from clipkit.module import decay_groups, no_decay_names
from clipkit.models.locking import LockableTower
from clipkit.optim import layer_ids, warmup_constant_cooldown
from clipkit.train import fit
from tests.conftest import random_batch

TWO_BLOCKS = ["model/image=vit_tiny", "model.image.depth=2", "model.text.config.num_hidden_layers=2"]
LR = 1e-3


def optimiser(module) -> torch.optim.Optimizer:
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)  # all configure_optimizers reads of it
    return module.configure_optimizers()["optimizer"]


def lr_and_decay(module) -> dict[str, tuple[float, float]]:
    """Parameter name (relative to the objective) -> (initial learning rate, weight decay) of its group."""
    names = {id(p): n for n, p in module.objective.named_parameters()}
    return {names[id(p)]: (g["initial_lr"], g["weight_decay"]) for g in optimiser(module).param_groups
            for p in g["params"]}


def expected_layer(name: str, depth: int) -> int | None:
    """The BEiT/timm layer id, written out for the tiny ViT and the CLIP text model: None outside the towers."""
    if not name.startswith(("image_tower.", "text_tower.")):
        return None
    block = re.search(r"\.(blocks|layers)\.(\d+)\.", name)
    if block:
        return int(block.group(2)) + 1
    if re.search(r"(cls_token|pos_embed|patch_embed|norm_pre|embeddings)", name):
        return 0
    return depth + 1  # final norms


def test_layer_decay_gives_every_parameter_of_both_towers_the_rate_of_its_layer(tiny_cfg):
    d = 0.5
    module = instantiate(tiny_cfg(*TWO_BLOCKS, f"module.optimizer.lr={LR}", f"module.layer_decay={d}").module)
    got = lr_and_decay(module)
    exempt = no_decay_names(module.objective)
    assert set(got) == {n for n, _ in module.objective.named_parameters()}
    for name, (lr, wd) in got.items():
        layer = expected_layer(name, depth=2)
        scale = 1.0 if layer is None else d ** (2 + 1 - layer)
        assert lr == pytest.approx(LR * scale), name
        assert wd == (0.0 if name in exempt else 0.2), name  # the decay / no-decay split is kept
    # spot checks of the rule's three regions in each tower
    assert got["image_tower.model.patch_embed.proj.weight"] == (pytest.approx(LR * d ** 3), 0.2)
    assert got["image_tower.model.pos_embed"] == (pytest.approx(LR * d ** 3), 0.0)
    assert got["text_tower.model.embeddings.token_embedding.weight"][0] == pytest.approx(LR * d ** 3)
    assert got["image_tower.model.blocks.0.attn.qkv.weight"][0] == pytest.approx(LR * d ** 2)
    assert got["text_tower.model.encoder.layers.1.mlp.fc1.weight"][0] == pytest.approx(LR * d)
    assert got["text_tower.model.final_layer_norm.weight"][0] == pytest.approx(LR)
    assert got["logit_scale"] == (pytest.approx(LR), 0.0) and got["image_proj.weight"] == (pytest.approx(LR), 0.2)


def test_each_tower_is_decayed_by_its_own_depth(tiny_cfg):
    """A 1-block image tower beside a 2-block text tower: the first block is one step from the top in the one and
    two steps in the other."""
    module = instantiate(tiny_cfg("model/image=vit_tiny", "model.text.config.num_hidden_layers=2",
                                  f"module.optimizer.lr={LR}", "module.layer_decay=0.5").module)
    got = lr_and_decay(module)
    assert got["image_tower.model.blocks.0.attn.qkv.weight"][0] == pytest.approx(LR * 0.5)
    assert got["text_tower.model.encoder.layers.0.mlp.fc1.weight"][0] == pytest.approx(LR * 0.25)
    assert got["image_tower.model.patch_embed.proj.weight"][0] == pytest.approx(LR * 0.25)


def test_new_heads_take_head_lr_and_no_layer_decay(tiny_cfg):
    cfg = tiny_cfg(*TWO_BLOCKS, f"module.optimizer.lr={LR}", "module.layer_decay=0.5", "module.head_lr=0.05")
    objective = instantiate(cfg.objective)
    objective.new_heads = lambda: ["image_proj", "text_tower.model.final_layer_norm"]  # what a new head declares
    got = lr_and_decay(instantiate(cfg.module, objective=objective))
    assert got["image_proj.weight"] == (pytest.approx(0.05), 0.2)
    assert got["text_tower.model.final_layer_norm.bias"] == (pytest.approx(0.05), 0.0)
    assert got["text_proj.weight"][0] == got["logit_scale"][0] == pytest.approx(LR)  # not heads: the base lr
    assert got["image_tower.model.blocks.0.attn.qkv.weight"][0] == pytest.approx(LR * 0.25)


def test_without_head_lr_new_heads_train_at_the_base_rate(tiny_cfg):
    cfg = tiny_cfg(f"module.optimizer.lr={LR}")
    objective = instantiate(cfg.objective)
    objective.new_heads = lambda: ["image_proj"]
    assert lr_and_decay(instantiate(cfg.module, objective=objective))["image_proj.weight"][0] == pytest.approx(LR)


def test_defaults_leave_the_two_groups_and_the_learning_rate_as_they_were(tiny_cfg):
    """The regression guard of every preset's numbers: the paper's two groups (weights with decay; gains, biases
    and temperature without), in that order, each at the optimiser's own learning rate, nothing else."""
    module = instantiate(tiny_cfg(*TWO_BLOCKS).module)
    groups = optimiser(module).param_groups
    exempt = no_decay_names(module.objective)
    names = {id(p): n for n, p in module.objective.named_parameters()}
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0]
    assert {names[id(p)] for p in groups[1]["params"]} == exempt
    assert {names[id(p)] for p in groups[0]["params"]} == set(names.values()) - exempt
    assert [g["initial_lr"] for g in groups] == [5e-4, 5e-4]  # module.optimizer.lr's default, for both
    assert all("lr_scale" not in g for g in groups)
    assert decay_groups(module.objective, 0.2) == [{"params": groups[0]["params"], "weight_decay": 0.2},
                                                   {"params": groups[1]["params"], "weight_decay": 0.0}]


# -- schedules ---------------------------------------------------------------------------------------------------
def lr_curve(scheduler_of, steps: int, resume_at: int | None = None) -> list[float]:
    """The learning rate of each of ``steps`` steps; with ``resume_at``, the optimiser and scheduler are rebuilt
    there from their state dicts, as a resumed run restores them."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = scheduler_of(opt)
    lrs = []
    for step in range(steps):
        if step == resume_at:
            saved = opt.state_dict(), sched.state_dict()
            opt = torch.optim.AdamW([param], lr=1.0)
            sched = scheduler_of(opt)
            opt.load_state_dict(saved[0])
            sched.load_state_dict(saved[1])
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])  # after the last step
    return lrs


def test_constant_with_cooldown_warms_up_holds_then_falls_linearly_to_zero():
    lrs = lr_curve(lambda opt: warmup_constant_cooldown(opt, warmup_steps=10, total_steps=100, cooldown_steps=20), 100)
    assert lrs[0] < 0.01 and lrs[5] == pytest.approx(0.5, abs=0.01)  # linear warm-up
    assert lrs[10:81] == pytest.approx([1.0] * 71)  # flat
    assert lrs[80:] == pytest.approx([1 - i / 20 for i in range(21)], abs=1e-9)  # linear to zero at the end
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("cooldown", [0, 95, 100])
def test_a_cooldown_that_leaves_no_flat_part_still_ends_at_zero_or_holds(cooldown):
    lrs = lr_curve(lambda opt: warmup_constant_cooldown(opt, 10, 100, cooldown), 100)
    assert max(lrs) == pytest.approx(1.0, abs=0.02) and all(lr >= 0 for lr in lrs)
    assert lrs[-1] == (pytest.approx(1.0) if cooldown == 0 else pytest.approx(0.0, abs=1e-12))


def test_constant_with_cooldown_resumes_exactly():
    def schedule(opt):
        return warmup_constant_cooldown(opt, warmup_steps=4, total_steps=30, cooldown_steps=10)
    straight = lr_curve(schedule, 30)
    for resume_at in (2, 10, 25):
        assert lr_curve(schedule, 30, resume_at=resume_at) == straight


class Record(L.Callback):
    """The base group's learning rate at each step, the gradients' total norm before the module's hook (callbacks
    run first) and when the optimiser steps (after clipping)."""

    def __init__(self):
        self.lrs, self.before, self.after, self.largest_after = [], [], [], []

    def on_train_start(self, trainer, pl_module):
        trainer.optimizers[0].register_step_post_hook(lambda *_: self.stepped(pl_module))

    def stepped(self, module):
        self.after.append(total_norm(module))
        self.largest_after.append(max((float(p.grad.abs().max()) for p in module.parameters() if p.grad is not None),
                                      default=0.0))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before.append(total_norm(pl_module))


def total_norm(module) -> float:
    return float(torch.nn.utils.get_total_norm([p.grad for p in module.parameters() if p.grad is not None]))


def run(tiny_cfg, steps: int, *overrides, data: list[dict] | None = None):
    """``steps`` optimiser steps on random batches, the trainer built as ``clipkit fit`` builds it."""
    cfg = tiny_cfg("model/image=vit_tiny", *overrides)
    torch.manual_seed(0)
    module = instantiate(cfg.module)
    record = Record()
    clip = module.clip_manually(cfg.trainer.gradient_clip_val, cfg.trainer.gradient_clip_algorithm)
    trainer = instantiate(cfg.trainer, max_steps=steps, callbacks=[record], logger=False, enable_checkpointing=False,
                          **clip)
    data = data or [random_batch(8, seed=i) for i in range(steps)]
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
    return module, record


def test_a_tiny_run_with_schedule_constant_follows_warm_up_flat_cool_down(tiny_cfg):
    _, record = run(tiny_cfg, 8, f"module.optimizer.lr={LR}", "module.schedule=constant", "module.warmup_steps=2",
                 "module.cooldown_steps=4")
    assert record.lrs == pytest.approx([LR * 1e-3, LR * (1e-3 + (1 - 1e-3) / 2), LR, LR, LR,
                                        LR * 0.75, LR * 0.5, LR * 0.25])


# -- gradient clipping -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("accumulate", [1, 2])
def test_clipping_bounds_the_total_gradient_norm_of_each_step(tiny_cfg, accumulate):
    _, record = run(tiny_cfg, 2, f"accumulate={accumulate}", "trainer.gradient_clip_val=0.01")
    assert len(record.after) == 2 and min(record.before) > 0.05  # the bound is really exercised
    assert record.after == pytest.approx([0.01] * 2, rel=1e-4)


def test_without_clipping_the_norm_is_left_alone(tiny_cfg):
    _, record = run(tiny_cfg, 2, "accumulate=2")
    assert record.after == pytest.approx(record.before) and min(record.after) > 0.05


@pytest.mark.parametrize("accumulate", [1, 2])
def test_clipping_by_value_bounds_every_gradient_entry(tiny_cfg, accumulate):
    _, record = run(tiny_cfg, 1, f"accumulate={accumulate}", "trainer.gradient_clip_val=0.001",
                 "trainer.gradient_clip_algorithm=value")
    assert record.largest_after == [pytest.approx(0.001)]


def test_a_non_finite_step_is_skipped_before_clipping_could_spread_it(tiny_cfg):
    """The guard runs first: a NaN gradient clipped would turn every gradient into NaN; skipped, the step leaves
    the weights and AdamW's state alone, and the next clean step is clipped."""
    poisoned = [random_batch(8, seed=i) for i in range(2)]
    poisoned[0]["images"][0, 0, 0, 0] = float("nan")
    module, record = run(tiny_cfg, 2, "accumulate=2", "trainer.gradient_clip_val=0.01", data=poisoned)
    assert module.nonfinite_steps == 1 and all(torch.isfinite(p).all() for p in module.parameters())
    assert record.after[0] == 0.0 and record.after[1] == pytest.approx(0.01, rel=1e-4)  # no gradient, then clipped


@pytest.mark.slow  # a whole fit with its MLflow record: ~15 s on 2 shared cores
def test_fit_clips_under_accumulation_where_lightning_would_refuse_the_setting(tiny_cfg):
    """``clipkit fit`` hands trainer.gradient_clip_val to the module under manual optimisation (Lightning raises
    "Automatic gradient clipping is not supported for manual optimization" otherwise)."""
    result = fit(tiny_cfg("model/image=vit_tiny", "accumulate=2", "trainer.gradient_clip_val=0.5",
                          "trainer.max_steps=2", "callbacks.zeroshot.every_n_steps=0", "data.batch_size=8"))
    assert result.images_seen == 16


# -- schema ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ("module.layer_decay=0", "module.layer_decay=0.0: must be a number in (0, 1]"),
    ("module.layer_decay=1.2", "module.layer_decay=1.2: must be a number in (0, 1]"),
    ("module.head_lr=0", "module.head_lr=0.0: must be a number > 0 or null"),
    ("module.schedule=linear", "module.schedule=linear: must be cosine or constant"),
    ("module.schedule=constant module.cooldown_steps=-1", "module.cooldown_steps=-1: must be an integer >= 0"),
    ("module.schedule=constant module.cooldown_steps=2001",
     "module.cooldown_steps=2001: must be at most trainer.max_steps"),
    ("module.cooldown_steps=10", "module.cooldown_steps=10: must be 0 under module.schedule=cosine (cosine cools "
                                 "down by itself; set module.schedule=constant)"),
    ("trainer.gradient_clip_val=0", "trainer.gradient_clip_val=0.0: must be a number > 0 or null"),
    ("trainer.gradient_clip_algorithm=l2", "trainer.gradient_clip_algorithm=l2: must be norm or value or null"),
])
def test_bad_knob_values_are_refused_in_one_line(override, message):
    with pytest.raises(UsageError) as err:
        compose_config(override.split())
    assert str(err.value) == message


def test_fine_tuning_values_are_accepted():
    cfg = compose_config(["module.layer_decay=0.75", "module.head_lr=1e-3", "module.schedule=constant",
                          "module.cooldown_steps=400", "trainer.gradient_clip_val=1.0"])
    assert cfg.module.layer_decay == 0.75 and cfg.module.cooldown_steps == 400


def test_module_finetune_turns_the_knobs_on_and_cools_down_over_the_last_fifth(tiny_cfg):
    cfg = tiny_cfg("module=finetune", "model/image=vit_tiny", "trainer.max_steps=50")
    assert cfg.module.cooldown_steps == 10 and cfg.module.layer_decay == 0.75 and cfg.module.schedule == "constant"
    module = instantiate(cfg.module)
    assert module.layer_scales and module.cooldown_steps == 10
    assert compose_config(["module=finetune", "module.cooldown_steps=7"]).module.cooldown_steps == 7


@pytest.mark.slow  # two short fits: ~30 s on 2 shared cores
def test_a_fine_tuning_run_resumes_bitwise_with_every_knob_on(tiny_cfg):
    """Layer-decayed groups, the constant-with-cool-down scheduler (restored from the checkpoint, mid cool-down)
    and clipping: the resumed run ends where the uninterrupted one does."""
    from tests.test_resume import CHECKPOINTS, RANDOM, assert_bitwise_equal, weights

    run = [*CHECKPOINTS, *RANDOM, "module.layer_decay=0.75", "module.schedule=constant", "module.cooldown_steps=5",
           "trainer.gradient_clip_val=0.5", "model/image=vit_tiny", "model.image.depth=2"]
    full = fit(tiny_cfg(*run))
    middle = Path(full.checkpoint).parent / "step0000004.ckpt"
    resumed = fit(tiny_cfg(*run, f"resume={middle}"))
    assert resumed.run_id == full.run_id
    assert_bitwise_equal(weights(resumed.checkpoint), weights(full.checkpoint))


# -- the layer rule on a CNN-like tower --------------------------------------------------------------------------
class Staged(LockableTower):
    """stem, stage 1 (two blocks), a down-sampling between stages, stage 2 (one block), a final norm."""

    def __init__(self):
        super().__init__()
        block = lambda: nn.Linear(2, 2)  # noqa: E731
        self.model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(block(), block()), nn.Linear(2, 2),
                                   nn.Sequential(block()), nn.LayerNorm(2))

    def blocks(self):
        return [*self.model[1], *self.model[3]]


def test_a_parameter_between_two_blocks_belongs_to_the_block_it_feeds():
    ids, depth = layer_ids(Staged())
    assert depth == 3
    assert {name.rsplit(".", 1)[0]: i for name, i in ids.items()} == {
        "model.0": 0, "model.1.0": 1, "model.1.1": 2, "model.2": 3, "model.3.0": 3, "model.4": 4}
