"""The throughput callback: exact FLOP counts, a measured peak, metrics against images seen, no side effects."""

import mlflow
import pytest
import torch
from hydra.utils import instantiate

from callbacks.throughput import compute_dtype, matmul_peak, training_flops_per_sample
from clipkit.train import fit
from tests.conftest import random_batch


def test_one_more_text_layer_costs_its_matmuls_forward_and_backward(tiny_cfg):
    """Per token a CLIP text layer multiplies by 4 h×h (q, k, v, out) and h×i, i×h (MLP): 2 FLOPs per
    multiply-add, ×3 for forward + backward; attention adds 4·L²·h forward, ×3.5 in all (the fused
    backward recomputes QKᵀ)."""
    length, h, i = 12, 32, 64
    flops = []
    for layers in (1, 2):
        objective = instantiate(tiny_cfg(f"model.text.config.num_hidden_layers={layers}").objective)
        flops.append(training_flops_per_sample(objective, random_batch(4, length)))
    assert flops[1] - flops[0] == 3 * 2 * length * (4 * h * h + 2 * h * i) + 3.5 * 4 * length**2 * h


def test_flop_count_leaves_the_run_untouched(tiny_cfg):
    objective = instantiate(tiny_cfg().objective)  # batch-normed stem: running statistics must not move
    buffers = {k: v.clone() for k, v in objective.state_dict().items()}
    batch = random_batch(8)
    rng = torch.get_rng_state()
    assert training_flops_per_sample(objective, batch) > 0
    assert all(p.grad is None for p in objective.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, buffers[k]) for k, v in objective.state_dict().items())


def test_matmul_peak_is_measured_in_the_runs_dtype():
    assert compute_dtype("bf16-mixed") == torch.bfloat16 and compute_dtype("32-true") == torch.float32
    assert compute_dtype("16-mixed") == torch.float16 and compute_dtype(64) == torch.float64
    assert 1e8 < matmul_peak(torch.device("cpu"), torch.float32, size=256) < 1e13


def test_throughput_is_logged_against_images_seen_without_changing_training(tiny_cfg, isolated):
    steps = ["trainer.max_steps=6", "callbacks.throughput.log_every_n_steps=3", "callbacks.throughput.window=2"]
    with_monitor = fit(tiny_cfg(*steps))
    without = fit(tiny_cfg(*steps, "~callbacks.throughput"))
    assert with_monitor.metrics["train/loss"] == pytest.approx(without.metrics["train/loss"], abs=1e-6)

    client = mlflow.MlflowClient(tracking_uri=with_monitor.tracking_uri)
    history = client.get_metric_history(with_monitor.run_id, "throughput/samples_per_second")
    assert [m.step for m in history] == [3 * 16, 6 * 16]  # images seen at steps 3 and 6
    metrics = client.get_run(with_monitor.run_id).data.metrics
    assert metrics["throughput/flops_per_sample"] > 0 and 0 < metrics["throughput/mfu"] < 1
    assert metrics["throughput/flops_per_second"] == pytest.approx(
        metrics["throughput/flops_per_sample"] * metrics["throughput/samples_per_second"], rel=1e-6)


def test_flops_are_not_counted_through_sharded_parameters():
    """Under FSDP or DeepSpeed the objective cannot run outside the wrapper: samples/s only, no crash."""
    from types import SimpleNamespace

    from callbacks.throughput import ThroughputMonitor

    monitor = ThroughputMonitor()
    monitor.start = None
    trainer = SimpleNamespace(strategy=SimpleNamespace(strategy_name="fsdp"))
    monitor.on_train_batch_start(trainer, SimpleNamespace(objective=None), random_batch(4), 0)
    assert monitor.flops_per_sample == 0.0 and monitor.start is not None
