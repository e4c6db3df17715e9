"""Is the loader fast enough? Images/s of the data pipeline (read, decode, resize + crop, tokenise, batch)
with 0, 1 and 2 dataloader workers, against what a training step consumes.

    python benchmarks/data_throughput.py [--samples 4096] [--steps 30]

Rows: WebDataset shards written by ``clipkit data synth`` as 48 px JPEGs (the kit's scale) and as 256 px
JPEGs (img2dataset's usual size, decoded with JPEG draft mode then resized to 48), and the default
run's generated stream. Then the default training run (``experiments=contrastive_vit``, batch 128) for
``--steps`` steps fed by its real loader and by one pre-made batch repeated: if the loader were the
bottleneck, the first would be slower. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipkit.config import compose_config  # noqa: E402
from clipkit.datatools import synth  # noqa: E402


def jpeg_shards(tmp: Path, size: int, samples: int) -> list[str]:
    """Write ``samples`` training scenes as WebDataset shards of ``size`` px JPEGs under ``tmp``; the overrides that
    train on them at 48 px."""
    out = tmp / f"s{size}"
    synth(out, "wds", samples, seed=0, image_size=size, shard_size=512, image_format="jpg", retrieval_size=1,
          eval_per_class=1)
    return ["data=webdataset", f"data.shards={out}/train", "data.image_size=48", "data.corpus_size=2000",
            f"paths.cache_dir={tmp}/cache"]


def loader_rate(overrides: list[str], workers: int, batches: int) -> float:
    """Images/s over ``batches`` batches after the first (which pays for starting workers)."""
    dm = instantiate(compose_config([*overrides, f"data.num_workers={workers}"]).data)
    _ = dm.tokenizer  # trained (or loaded) before timing
    it = iter(dm.train_dataloader())
    next(it)
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            n += len(next(it)["keys"])
        except StopIteration:
            break
    return n / (time.perf_counter() - start)


class Repeat(torch.utils.data.IterableDataset):
    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


def training_rate(steps: int, premade: bool) -> float:
    """Images/s of ``experiments=contrastive_vit`` training steps, after 3 warm-up steps."""
    cfg = compose_config(["experiments=contrastive_vit", "~logger", "~callbacks",
                          f"trainer.max_steps={steps + 3}", "trainer.enable_progress_bar=false",
                          "trainer.enable_model_summary=false", "+trainer.enable_checkpointing=false",
                          "paths.output_dir=/tmp/clipkit_bench"])
    L.seed_everything(0)
    dm = instantiate(cfg.data)
    module = instantiate(cfg.module)
    loader = dm.train_dataloader()
    if premade:
        batch = next(iter(loader))
        loader = torch.utils.data.DataLoader(Repeat(batch), batch_size=None)

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 3:
                self.start = time.perf_counter()

    clock = Clock()
    trainer = instantiate(cfg.trainer, callbacks=[clock], logger=False)
    trainer.fit(module, train_dataloaders=loader)
    return steps * dm.batch_size / (time.perf_counter() - clock.start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4096, help="samples per written shard set")
    ap.add_argument("--steps", type=int, default=30, help="timed training steps")
    args = ap.parse_args()
    torch.set_num_threads(2)
    batches = args.samples // 128 - 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (48, 256):
            overrides = jpeg_shards(Path(tmp), size, args.samples)
            rows.append((f"WebDataset, {size} px JPEG -> 48 px", [loader_rate(overrides, w, batches) for w in (0, 1, 2)]))
        stream = ["data.corpus_size=2000", f"paths.cache_dir={tmp}/cache"]
        rows.append(("generated stream (default run)", [loader_rate(stream, w, batches) for w in (0, 1, 2)]))
        real, premade = training_rate(args.steps, premade=False), training_rate(args.steps, premade=True)
    print("| loader (batch 128, decode + resize/crop + tokenise) | 0 workers | 1 worker | 2 workers |")
    print("|---|---|---|---|")
    for name, rates in rows:
        print(f"| {name} | " + " | ".join(f"{r:,.0f} img/s" for r in rates) + " |")
    print()
    print("| default training run (contrastive_vit, batch 128, 1 loader worker) | images/s |")
    print("|---|---|")
    print(f"| fed by its loader | {real:,.0f} |")
    print(f"| fed one pre-made batch (no loading at all) | {premade:,.0f} |")
    print(f"| loader-fed / pre-made | {real / premade:.2f} |")


if __name__ == "__main__":
    main()
