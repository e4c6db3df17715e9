"""The throughput callback: exact FLOP counts, a measured peak, metrics against images seen, no side effects."""

from contextlib import contextmanager
from types import SimpleNamespace

import mlflow
import pytest
import torch
from hydra.utils import instantiate

from callbacks import throughput
from callbacks.throughput import ThroughputMonitor, compute_dtype, matmul_peak, training_flops_per_sample
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


def test_flop_count_forks_the_cuda_generator_of_the_runs_device(tiny_cfg, monkeypatch):
    """No GPU here: the fork's arguments are checked. With only the CPU generator forked, a dropout mask the count
    draws on the GPU would move the CUDA generator, and runs with and without the monitor would diverge."""
    forked = []

    @contextmanager
    def fork_rng(devices=None, enabled=True, device_type="cuda"):
        forked.append((list(devices), device_type))
        yield

    monkeypatch.setattr(torch.random, "fork_rng", fork_rng)
    objective = instantiate(tiny_cfg().objective)
    for device in (torch.device("cuda", 1), torch.device("cpu")):
        training_flops_per_sample(objective, random_batch(4), device=device)
    assert forked == [([1], "cuda"), ([], "cuda")]


def test_flop_count_leaves_the_run_untouched(tiny_cfg):
    objective = instantiate(tiny_cfg().objective)  # batch-normed stem: running statistics must not move
    buffers = {k: v.clone() for k, v in objective.state_dict().items()}
    batch = random_batch(8)
    rng = torch.get_rng_state()
    assert training_flops_per_sample(objective, batch) > 0
    assert all(p.grad is None for p in objective.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, buffers[k]) for k, v in objective.state_dict().items())


class Clock:
    """``time.perf_counter`` that moves only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_matmul_peak_is_the_best_timed_matmul_after_a_warm_up(monkeypatch):
    clock = Clock()
    durations = iter([0.001, 0.5, 0.25, 0.4])  # the warm-up (first) is fastest but does not count
    seen = []

    class Timed(torch.Tensor):
        def __matmul__(self, other):
            seen.append(self.dtype)
            clock.now += next(durations)
            return torch.Tensor.__matmul__(self, other)

    monkeypatch.setattr(throughput.time, "perf_counter", clock)
    monkeypatch.setattr(throughput.torch, "randn", lambda *size, device: torch.zeros(*size).as_subclass(Timed))
    assert matmul_peak(torch.device("cpu"), torch.bfloat16, size=64, repeats=3) == 2 * 64**3 / 0.25
    assert seen == [torch.bfloat16] * 4  # timed in the run's dtype
    assert compute_dtype("bf16-mixed") == torch.bfloat16 and compute_dtype("32-true") == torch.float32
    assert compute_dtype("16-mixed") == torch.float16 and compute_dtype(64) == torch.float64


class Recorder:
    def __init__(self) -> None:
        self.logged: list[tuple[dict, int]] = []

    def log_metrics(self, metrics, step) -> None:
        self.logged.append((metrics, step))


class SlowEvaluation:
    """Stands for ZeroShotEvaluation: ``seconds`` is the time it has spent evaluating."""

    seconds = 0.0


@pytest.mark.parametrize("evaluate_first", [True, False])  # before or after the monitor, at the same batch end
def test_throughput_windows_count_training_time_only(monkeypatch, evaluate_first):
    """Two processes of 16 samples each, one second per step; a 100 s evaluation at step 3: every window reads
    32 samples/s. FLOP/s and MFU follow from the counted FLOPs and the measured peak."""
    clock, logger, evaluation = Clock(), Recorder(), SlowEvaluation()
    monkeypatch.setattr(throughput.time, "perf_counter", clock)
    monkeypatch.setattr(throughput, "matmul_peak", lambda device, dtype: 1e6)
    monitor = ThroughputMonitor(log_every_n_steps=1, window=2)
    monitor.flops_per_sample = 1000.0  # as counted
    trainer = SimpleNamespace(precision="32-true", world_size=2, strategy=SimpleNamespace(strategy_name="ddp"),
                              callbacks=[evaluation, monitor], loggers=[logger], is_global_zero=True, global_step=0)
    module = SimpleNamespace(device=torch.device("cpu"), images_seen=torch.tensor(0))
    monitor.on_fit_start(trainer, module)
    batch = random_batch(16)

    def evaluate(step: int) -> None:
        if step == 3:
            clock.now += 100.0
            evaluation.seconds += 100.0

    for step in range(1, 7):
        monitor.on_train_batch_start(trainer, module, batch, step - 1)
        clock.now += 1.0
        trainer.global_step, module.images_seen = step, module.images_seen + 32
        if evaluate_first:
            evaluate(step)
        monitor.on_train_batch_end(trainer, module, None, batch, step - 1)
        if not evaluate_first:
            evaluate(step)

    assert [step for _, step in logger.logged] == [2, 3, 4, 5, 6]  # the window holds two updates from step 2
    for metrics, _ in logger.logged:
        assert metrics["throughput/samples_per_second"] == pytest.approx(32.0)
        assert metrics["throughput/flops_per_second"] == pytest.approx(32 * 1000.0)
        assert metrics["throughput/mfu"] == pytest.approx(16 * 1000.0 / 1e6)
        assert metrics["throughput/peak_flops_per_second"] == 1e6
    assert [m["images_seen"] for m, _ in logger.logged] == [64, 96, 128, 160, 192]


def test_throughput_is_logged_against_images_seen_without_changing_training(tiny_cfg, isolated):
    steps = ["trainer.max_steps=6", "callbacks.throughput.log_every_n_steps=3", "callbacks.throughput.window=2"]
    with_monitor = fit(tiny_cfg(*steps))
    without = fit(tiny_cfg(*steps, "~callbacks.throughput"))
    assert with_monitor.metrics["train/loss"] == pytest.approx(without.metrics["train/loss"], abs=1e-6)

    client = mlflow.MlflowClient(tracking_uri=with_monitor.tracking_uri)
    for name in ("samples_per_second", "flops_per_sample", "flops_per_second", "mfu", "peak_flops_per_second"):
        history = client.get_metric_history(with_monitor.run_id, f"throughput/{name}")
        assert [m.step for m in history] == [3 * 16, 6 * 16], name  # images seen at steps 3 and 6
    # the rates themselves: test_throughput_windows_count_training_time_only, on a clock of known times


def test_flops_are_not_counted_through_sharded_parameters():
    """Under FSDP or DeepSpeed the objective cannot run outside the wrapper: samples/s only, no crash."""
    monitor = ThroughputMonitor()
    monitor.start = None
    trainer = SimpleNamespace(strategy=SimpleNamespace(strategy_name="fsdp"), callbacks=[])
    monitor.on_train_batch_start(trainer, SimpleNamespace(objective=None), random_batch(4), 0)
    assert monitor.flops_per_sample == 0.0 and monitor.start is not None
