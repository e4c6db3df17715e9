"""accumulate=k: the contrastive batch stays data.batch_size, computed in k micro-batches with the same gradients."""

import copy

import lightning as L
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.plugins.precision import MixedPrecision

from clipkit.objectives.base import split_batch
from tests.conftest import random_batch


def gradients(objective) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunks", [2, 3, 16])
def test_accumulated_gradients_equal_the_full_batch_ones(tiny_cfg, chunks):
    torch.manual_seed(0)
    objective = instantiate(tiny_cfg("model/image=vit_tiny").objective).double()
    batch = random_batch(16, dtype=torch.float64)
    full, _ = objective.loss(batch)
    full.backward()
    expected = gradients(objective)
    objective.zero_grad(set_to_none=True)

    passes = []
    loss, _ = objective.accumulated_backward(batch, chunks, lambda t: (passes.append(t), t.backward()))

    assert len(passes) == chunks  # one backward per micro-batch: only one micro-batch's activations at a time
    assert loss.item() == pytest.approx(full.item(), abs=1e-10)
    assert set(gradients(objective)) == set(expected)  # the temperature included
    for name, grad in gradients(objective).items():
        torch.testing.assert_close(grad, expected[name], atol=1e-5, rtol=0, msg=name)


# dropout in both towers (timm's drop path is 0 in a one-block ViT): the generators matter
DROPOUT = ["model/image=vit_tiny", "+model.image.proj_drop_rate=0.2", "+model.image.attn_drop_rate=0.2",
           "+model.text.config.attention_dropout=0.2", "+model.text.config.hidden_dropout=0.2"]


def cached_pass_loss(objective, batch: dict, chunks: int, seed: int) -> torch.Tensor:
    """The loss of the embeddings the cached (no-grad) pass computes, with grad: one pass, chunk after chunk,
    drawing its dropout masks from the generator in that order."""
    torch.manual_seed(seed)
    images, texts = zip(*(objective.embed(part) for part in split_batch(batch, chunks)), strict=True)
    return objective.loss_of_embeddings(torch.cat(images), torch.cat(texts))[0]


def test_with_dropout_each_micro_batch_is_recomputed_with_the_masks_of_the_cached_pass(tiny_cfg, chunks=3):
    """GradCache's replay: recomputed with other masks, each chunk would backpropagate through other activations
    than the ones its cached embeddings (and so the gradients it receives) came from."""
    objective = instantiate(tiny_cfg(*DROPOUT).objective)
    batch = random_batch(16)
    other_masks = cached_pass_loss(objective, batch, chunks, seed=2).item()
    full = cached_pass_loss(objective, batch, chunks, seed=1)
    full.backward()
    expected, after = gradients(objective), torch.get_rng_state()
    objective.zero_grad(set_to_none=True)
    assert abs(other_masks - full.item()) > 1e-3  # dropout is on: the masks change the loss

    torch.manual_seed(1)
    loss, _ = objective.accumulated_backward(batch, chunks, torch.Tensor.backward)

    assert loss.item() == pytest.approx(full.item(), abs=1e-6)
    for name, grad in gradients(objective).items():
        torch.testing.assert_close(grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)
    assert torch.equal(torch.get_rng_state(), after)  # the generators end where one pass leaves them


def test_under_float16_autocast_the_cached_batch_loss_runs_in_float32(tiny_cfg):
    """16-mixed: the towers run in float16, the loss over the cached embeddings (and the temperature's gradient
    from it) in float32 with autocast off; under autocast its logits would be float16, off by ~1e-3."""
    objective = instantiate(tiny_cfg("model/image=vit_tiny").objective)
    batch = random_batch(16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        images, texts = zip(*(objective.embed(part) for part in split_batch(batch, 2)), strict=True)
    image, text = (torch.cat(x).float() for x in (images, texts))
    expected, _ = objective.loss_of_embeddings(image, text)
    (temperature_grad,) = torch.autograd.grad(expected, [objective.logit_scale])

    with torch.autocast("cpu", dtype=torch.float16):
        loss, _ = objective.accumulated_backward(batch, 2, torch.Tensor.backward)

    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert objective.logit_scale.grad.item() == pytest.approx(temperature_grad.item(), rel=1e-5)


class Scaler(torch.amp.GradScaler):
    """A real grad scaler, on the CPU (Lightning's own 16-mixed needs CUDA for one); counts what it scales."""

    def __init__(self) -> None:
        super().__init__("cpu", init_scale=2.0**12)
        self.scaled = 0

    def scale(self, outputs):
        self.scaled += 1
        return super().scale(outputs)


class FirstBatch(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not hasattr(self, "batch"):
            self.batch = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def test_under_16_mixed_every_gradient_of_the_step_goes_through_the_grad_scaler(tiny_cfg):
    """Lightning scales each micro-batch's backward by the scaler's factor and unscales before the step: the
    temperature's gradient from the cached loss must be scaled alike, or it would arrive 4096 times too small."""
    cfg = tiny_cfg("model/image=vit_tiny", "accumulate=2")
    torch.manual_seed(0)
    module = instantiate(cfg.module)
    reference = copy.deepcopy(module.objective)
    scaler, capture, first = Scaler(), FirstGradients(), FirstBatch()
    trainer = instantiate(cfg.trainer, precision=None, plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
                          max_steps=1, callbacks=[capture, first], logger=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=instantiate(cfg.data))
    assert scaler.scaled == 2  # one scaled backward per micro-batch

    with torch.autocast("cpu", dtype=torch.float16):  # the same step, unscaled
        reference.accumulated_backward(first.batch, 2, torch.Tensor.backward)
    expected = gradients(reference)
    assert "logit_scale" in expected
    got = {name: capture.grads[f"objective.{name}"] for name in expected}  # after unscaling, before the step
    assert got["logit_scale"].item() == pytest.approx(expected["logit_scale"].item(), rel=1e-6)
    # the towers' gradients: equal up to float16 rounding (scaled by 2**12, a tiny gradient underflows less)
    flat = {k: torch.cat([g.flatten() for g in d.values()]) for k, d in (("got", got), ("expected", expected))}
    assert (flat["got"] - flat["expected"]).norm() < 1e-3 * flat["expected"].norm()


def test_batch_norm_running_statistics_are_updated_once_per_micro_batch(tiny_cfg):
    objective = instantiate(tiny_cfg().objective)  # the default hybrid ViT has a batch-normed ResNet stem
    norms = [m for m in objective.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    objective.accumulated_backward(random_batch(8), 4, torch.Tensor.backward)
    assert all(m.num_batches_tracked.item() == 4 for m in norms)


def test_split_batch_keeps_per_batch_entries_whole():
    batch = {**random_batch(10), "keys": [str(i) for i in range(10)], "data_stats": {"read": 10}}
    parts = split_batch(batch, 3)
    assert [len(p["images"]) for p in parts] == [3, 4, 3]
    assert sum((p["keys"] for p in parts), []) == batch["keys"]
    assert all(p["data_stats"] is batch["data_stats"] for p in parts)
    with pytest.raises(ValueError, match="accumulate=11 cannot split a batch of 10"):
        split_batch(batch, 11)


class FirstGradients(L.Callback):
    def __init__(self) -> None:
        self.grads: dict = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.grads:
            self.grads = gradients(pl_module)


def train(cfg, steps: int):
    torch.manual_seed(0)
    module = instantiate(cfg.module)
    capture = FirstGradients()
    trainer = instantiate(cfg.trainer, max_steps=steps, callbacks=[capture], logger=False,
                          enable_checkpointing=False)
    trainer.fit(module, datamodule=instantiate(cfg.data))
    return module, capture.grads, trainer.optimizers[0].param_groups[0]["lr"]


def test_training_with_accumulate_follows_the_same_path_as_the_full_batch(tiny_cfg):
    """Through Lightning's manual optimisation: same gradients, same schedule, same weights after 3 steps."""
    common = ["model/image=vit_tiny", "precision=64-true"]
    plain, plain_grads, plain_lr = train(tiny_cfg(*common), steps=3)
    split, split_grads, split_lr = train(tiny_cfg(*common, "accumulate=4"), steps=3)

    assert not split.automatic_optimization and split.accumulate == 4
    assert int(split.images_seen) == int(plain.images_seen) == 3 * 16
    assert split_lr == pytest.approx(plain_lr)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(split_grads[name], grad, atol=1e-5, rtol=0, msg=name)
    for (name, a), b in zip(plain.state_dict().items(), split.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=name)


def test_plain_gradient_accumulation_of_a_contrastive_batch_is_refused(tiny_cfg):
    cfg = tiny_cfg("+trainer.accumulate_grad_batches=2")
    with pytest.raises(ValueError, match="use accumulate=k instead"):
        train(cfg, steps=1)


def test_accumulate_on_a_per_sample_objective_points_to_lightning(tiny_cfg):
    with pytest.raises(InstantiationException, match="NotImplementedError.*use trainer.accumulate_grad_batches"):
        instantiate(tiny_cfg("objective=bow_prediction", "accumulate=2").module)  # before any data is read
