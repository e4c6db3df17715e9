"""Training speed against open_clip, and what activation checkpointing and accumulate=k do to peak memory.

    python benchmarks/throughput.py [--steps 12] [--threads 2] [--quick]

One table, three parts, every number from this run:
1. samples/s of clipkit (Lightning Trainer, ClipKitModule) and open_clip (its own ``train_one_epoch`` from
   ``open_clip_train``, its ``CLIP`` model and ``ClipLoss``) on the same architecture (a ViT image tower and a
   causal text transformer of the same widths, depths, heads and patch size), batch, precision and thread count,
   both fed one pre-made batch so only the training step is timed (after warm-up steps).
2. peak memory of a training step of a 12-layer ViT-B/32 at batch 64, with and without
   ``model.image/text.grad_checkpointing``.
3. peak memory of a contrastive batch of 256 computed whole, with ``accumulate=4`` and ``accumulate=8``, and of
   a plain batch of 64 (the micro-batch).
Memory is measured in a fresh process per row. On a GPU it is ``torch.cuda.max_memory_allocated``; on a CPU it
is the process's resident peak (VmHWM) during the second training step above its resident size at that step's
start, with glibc told to return every block over 64 KiB to the OS at once (``MALLOC_MMAP_THRESHOLD_``) so that
freed tensors leave the resident size.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clipkit.config import compose_config  # noqa: E402

VOCAB, CONTEXT = 4096, 32
PARAMS: dict[str, int] = {}  # parameter counts of the last speed row's two models: the same architecture?
# name: (image size, patch, width, layers | text width, layers), heads = width / 64 as in CLIP
ARCHS = {"ViT-S/8 64px + text 256x4": dict(image=64, patch=8, width=384, layers=6, text_width=256, text_layers=4),
         "ViT-B/32 224px + text 512x12": dict(image=224, patch=32, width=768, layers=12, text_width=512,
                                              text_layers=12)}


def clipkit_overrides(arch: dict, batch: int, precision: str, extra=()) -> list[str]:
    a = arch
    return ["model/image=vit_tiny", f"data.image_size={a['image']}", f"model.image.patch_size={a['patch']}",
            f"model.image.depth={a['layers']}", f"+model.image.embed_dim={a['width']}",
            f"+model.image.num_heads={a['width'] // 64}", "+model.image.global_pool=token",
            f"model.text.config.hidden_size={a['text_width']}",
            f"model.text.config.intermediate_size={4 * a['text_width']}",
            f"model.text.config.num_hidden_layers={a['text_layers']}",
            f"model.text.config.num_attention_heads={a['text_width'] // 64}", f"model.text.config.vocab_size={VOCAB}",
            f"data.context_length={CONTEXT}", "objective.embed_dim=512", f"data.batch_size={batch}",
            f"precision={precision}", "~logger", "~callbacks", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "+trainer.enable_checkpointing=false", "trainer.accelerator=auto",
            "paths.output_dir=/tmp/clipkit_bench", "module.warmup_steps=10", *extra]


def make_batch(arch: dict, batch: int) -> dict:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, CONTEXT + 1, (batch, 1), generator=g)
    mask = (torch.arange(CONTEXT) < lengths).long()
    return {"images": torch.randn(batch, 3, arch["image"], arch["image"], generator=g),
            "input_ids": torch.randint(3, VOCAB, (batch, CONTEXT), generator=g) * mask, "attention_mask": mask}


class Repeat(torch.utils.data.IterableDataset):
    def __init__(self, batch: dict, times: int) -> None:
        self.batch, self.times = batch, times

    def __iter__(self):
        return iter([self.batch] * self.times)


class StepClock(L.Callback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def clipkit_rate(arch: dict, batch: int, precision: str, steps: int, warmup: int, extra=()) -> float:
    cfg = compose_config(clipkit_overrides(arch, batch, precision, extra))
    torch.manual_seed(0)
    module, clock = instantiate(cfg.module), StepClock()
    trainer = instantiate(cfg.trainer, max_steps=warmup + steps, callbacks=[clock], logger=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(Repeat(make_batch(arch, batch), warmup + steps),
                                                                      batch_size=None))
    PARAMS["clipkit"] = sum(p.numel() for p in module.parameters())
    return steps * batch / (clock.ends[-1] - clock.ends[warmup - 1])


def open_clip_rate(arch: dict, batch: int, precision: str, steps: int, warmup: int) -> float:
    """open_clip's own training loop (``open_clip_train.train.train_one_epoch``), one epoch to warm up, one timed."""
    import open_clip
    from open_clip_train.train import train_one_epoch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    a = arch
    model = open_clip.CLIP(512, vision_cfg=dict(image_size=a["image"], patch_size=a["patch"], width=a["width"],
                                                 layers=a["layers"], head_width=64),
                           text_cfg=dict(context_length=CONTEXT, vocab_size=VOCAB, width=a["text_width"],
                                         heads=a["text_width"] // 64, layers=a["text_layers"]),
                           quick_gelu=True, output_dict=True).to(device)
    PARAMS["open_clip"] = sum(p.numel() for p in model.parameters())
    exclude = [p for n, p in model.named_parameters() if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n]
    include = [p for p in model.parameters() if all(p is not q for q in exclude)]
    optimizer = torch.optim.AdamW([{"params": exclude, "weight_decay": 0.0}, {"params": include, "weight_decay": 0.2}],
                                  lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    b = make_batch(arch, batch)
    pairs = (b["images"], b["input_ids"])
    args = SimpleNamespace(device=device, precision={"32-true": "fp32", "bf16-mixed": "amp_bf16"}[precision],
                           accum_freq=1, batch_size=batch, distill=False, grad_clip_norm=None, horovod=False,
                           log_every_n_steps=10**9, skip_scheduler=True, wandb=False, world_size=1, rank=0,
                           local_rank=0, val_frequency=0, save_logs=False)
    loss = open_clip.ClipLoss()
    times = []
    for epoch, n in enumerate((warmup, steps)):
        data = {"train": SimpleNamespace(set_epoch=lambda e: None, dataloader=_Loader([pairs] * n, batch))}
        start = time.perf_counter()
        train_one_epoch(model, data, loss, epoch, optimizer, None, None, None, args)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return steps * batch / times[-1]


class _Loader(list):
    """What open_clip's loop reads from its DataInfo.dataloader: an iterable with num_batches and num_samples."""

    def __init__(self, batches, batch: int) -> None:
        super().__init__(batches)
        self.num_batches, self.num_samples = len(batches), len(batches) * batch


# --- memory: one fresh process per row -------------------------------------------------------------------------

def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class StepPeak(L.Callback):
    """Peak memory of the second training step (the first allocates the optimiser state) above its start."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self.base = torch.cuda.memory_allocated()
            else:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
                self.base = _status("VmRSS:")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 1:
            peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _status("VmHWM:")
            self.result = {"peak": peak, "base": self.base, "seconds": time.perf_counter() - self.start}
        self.start = time.perf_counter()


def memory_row(spec: dict) -> dict:
    arch, batch = ARCHS[spec["arch"]], spec["batch"]
    cfg = compose_config(clipkit_overrides(arch, batch, spec["precision"], spec["extra"]))
    torch.manual_seed(0)
    module, probe = instantiate(cfg.module), StepPeak()
    trainer = instantiate(cfg.trainer, max_steps=2, callbacks=[probe], logger=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(Repeat(make_batch(arch, batch), 2),
                                                                      batch_size=None))
    return probe.result


def measure_memory(spec: dict, threads: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
           "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, __file__, "--memory-row", json.dumps(spec), "--threads", str(threads)],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(x: float) -> str:
    return f"{x / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="timed training steps per speed row")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, the same for both kits")
    parser.add_argument("--quick", action="store_true", help="speed rows only, fp32 only (a smoke run)")
    parser.add_argument("--memory-row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.memory_row:
        print(json.dumps(memory_row(json.loads(args.memory_row))))
        return

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {args.threads} threads"
    print(f"device: {device}; torch {torch.__version__}\n")
    print("| measurement | configuration | clipkit | open_clip | ratio |")
    print("|---|---|---:|---:|---:|")
    small = ARCHS["ViT-S/8 64px + text 256x4"]
    runs = [("32-true", 64, ())] if args.quick else [("32-true", 64, ()), ("bf16-mixed", 64, ()),
                                                     ("32-true", 64, ("compile=true",))]
    for precision, batch, extra in runs:
        ours = clipkit_rate(small, batch, precision, args.steps, args.warmup + 2 * bool(extra), extra)
        theirs = open_clip_rate(small, batch, precision, args.steps, args.warmup)
        label = f"ViT-S/8 64px + text 256x4, batch {batch}, {precision}" + "".join(f", clipkit {e}" for e in extra)
        print(f"| samples/s | {label} | {ours:,.1f} | {theirs:,.1f} | {ours / theirs:.2f}x |", flush=True)
    print(f"| parameters | ViT-S/8 64px + text 256x4 | {PARAMS['clipkit']:,} | {PARAMS['open_clip']:,} | "
          f"{PARAMS['clipkit'] / PARAMS['open_clip']:.3f}x |")
    if args.quick:
        return

    rows = [("ViT-B/32 224px + text 512x12", 64, ()),
            ("ViT-B/32 224px + text 512x12", 64, ("model.image.grad_checkpointing=true",
                                                  "model.text.grad_checkpointing=true"))]
    results = [measure_memory({"arch": a, "batch": b, "precision": "32-true", "extra": list(e)}, args.threads)
               for a, b, e in rows]
    plain, ckpt = (r["peak"] - r["base"] for r in results)
    print(f"| step peak above its start | ViT-B/32 (12 layers), batch 64, fp32, no checkpointing | {mib(plain)} | | |")
    print(f"| step peak above its start | same, activation checkpointing (both towers) | {mib(ckpt)} | | "
          f"{1 - ckpt / plain:.0%} less |")
    print(f"| step time | no checkpointing / checkpointing | {results[0]['seconds']:.1f} s / "
          f"{results[1]['seconds']:.1f} s | | {results[1]['seconds'] / results[0]['seconds']:.2f}x |", flush=True)

    acc = [(256, ()), (256, ("accumulate=4",)), (256, ("accumulate=8",)), (64, ())]
    results = [measure_memory({"arch": "ViT-S/8 64px + text 256x4", "batch": b, "precision": "32-true",
                               "extra": list(e)}, args.threads) for b, e in acc]
    whole = results[0]["peak"] - results[0]["base"]
    for (b, e), r in zip(acc, results, strict=True):
        label = f"contrastive batch {b}" + (f", {e[0]}" if e else ", whole")
        used = r["peak"] - r["base"]
        print(f"| step peak above its start | ViT-S/8, {label} | {mib(used)} | | {used / whole:.2f}x of whole |")


if __name__ == "__main__":
    main()
