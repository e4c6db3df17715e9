"""Training throughput: samples/s, model FLOPs per sample, achieved FLOP/s and its share of a measured peak."""

from __future__ import annotations

import logging
import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput, measure_flops

from clipkit.objectives.base import running_stats_kept

log = logging.getLogger(__name__)

SHARDED = ("fsdp", "deepspeed")  # the objective cannot run outside the wrapper's forward
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "64": torch.float64}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls run in under a Lightning precision string (``bf16-mixed`` -> bfloat16, ``32-true`` -> float32)."""
    return COMPUTE_DTYPES.get(str(precision).split("-")[0], torch.float32)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` square matmuls on ``device``: a measured ceiling where no vendor table
    applies (CPUs), in the run's own dtype and thread count."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    best = float("inf")
    for i in range(repeats + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start) if i else best
    return 2 * size**3 / best


def training_flops_per_sample(objective: torch.nn.Module, batch: dict, samples: int = 4,
                              device: torch.device | None = None) -> float:
    """Forward + backward FLOPs of the training loss per sample (``torch.utils.flop_counter``), counted on the
    first ``samples`` of a real batch. The run is left as it was: no gradients, batch-norm statistics or random
    numbers are consumed, on the CPU or on ``device``'s CUDA generator (a dropout mask drawn on the GPU would
    otherwise make runs with and without this monitor diverge)."""
    part = {k: v[:samples] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    n = len(part["images"])
    cuda = [] if device is None or device.type != "cuda" else [
        device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda, device_type="cuda"), running_stats_kept(objective):
        flops = measure_flops(objective, lambda: objective.loss(part)[0], loss_fn=lambda loss: loss)
    objective.zero_grad(set_to_none=True)
    return flops / n


def evaluation_seconds(trainer: L.Trainer) -> float:
    """Seconds the callbacks have spent evaluating so far (their ``seconds``: :class:`ZeroShotEvaluation`'s)."""
    return sum(getattr(c, "seconds", 0.0) for c in trainer.callbacks)


class ThroughputMonitor(L.Callback):
    """Logs ``throughput/*`` against images seen every ``log_every_n_steps``, averaged over the last ``window``
    steps (Lightning's :class:`Throughput`): samples per second (all processes), FLOPs per sample, achieved
    FLOP/s and ``mfu``, its fraction of :func:`matmul_peak` measured on the same device at the start. The clock
    stops while the callbacks evaluate (:func:`evaluation_seconds`), so a window holding an evaluation is not low.

    Lightning's own ``ThroughputMonitor`` knows the peak of listed GPUs only and steps by batch; this one measures
    the peak (CPUs too), counts FLOPs itself and logs beside ``images_seen``.
    """

    def __init__(self, log_every_n_steps: int = 25, window: int = 10) -> None:
        self.log_every_n_steps, self.window = log_every_n_steps, max(2, window)
        self.peak: float | None = None
        self.flops_per_sample: float | None = None
        self.throughput: Throughput | None = None
        self.metrics: dict[str, float] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        self.peak = matmul_peak(device, compute_dtype(trainer.precision))
        self.throughput = Throughput(available_flops=self.peak, world_size=trainer.world_size, window_size=self.window)
        self.samples = self.batches = 0
        self.start = None
        self.evaluated = 0.0  # evaluation seconds before the clock started

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        strategy = getattr(trainer.strategy, "strategy_name", "")
        if self.flops_per_sample is None and strategy in SHARDED:
            log.info("FLOPs are not counted under %s (parameters are sharded): logging samples/s only", strategy)
            self.flops_per_sample = 0.0
        if self.flops_per_sample is None:
            try:
                with trainer.precision_plugin.forward_context():
                    self.flops_per_sample = training_flops_per_sample(pl_module.objective, batch,
                                                                      device=pl_module.device)
            except Exception as err:  # counting must never stop training (an op the counter cannot trace)
                log.warning("FLOPs per sample could not be counted (%s): logging samples/s only", err)
                self.flops_per_sample = 0.0
        if self.start is None:
            self.start = time.perf_counter()  # after the FLOP count: time only training
            self.evaluated = evaluation_seconds(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        size = len(batch["images"])
        self.samples, self.batches = self.samples + size, self.batches + 1
        training = time.perf_counter() - self.start - (evaluation_seconds(trainer) - self.evaluated)
        self.throughput.update(time=training, batches=self.batches, samples=self.samples,
                               flops=int(self.flops_per_sample * size) or None)
        if trainer.global_step % self.log_every_n_steps:
            return
        rates = self.throughput.compute()
        per_device = rates.get("device/samples_per_sec")
        if per_device is None:  # the window is not full yet
            return
        self.metrics = {"throughput/samples_per_second": per_device * trainer.world_size,
                        "throughput/peak_flops_per_second": self.peak}
        if self.flops_per_sample:
            self.metrics.update({"throughput/flops_per_sample": self.flops_per_sample,
                                 "throughput/flops_per_second": rates["device/flops_per_sec"] * trainer.world_size,
                                 "throughput/mfu": rates["device/mfu"]})
        if trainer.is_global_zero:  # straight to the loggers: once per logging step, beside its images seen
            for logger in trainer.loggers:
                logger.log_metrics({**self.metrics, "images_seen": int(pl_module.images_seen)}, trainer.global_step)
