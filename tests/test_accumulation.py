"""accumulate=k: the contrastive batch stays data.batch_size, computed in k micro-batches with the same gradients."""

import lightning as L
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

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
