"""Time the default experiment and print one Markdown table: wall time, throughput, zero-shot results.

    .venv/bin/python benchmarks/demo.py [hydra overrides]      # e.g. seed=1

Runs exactly what `make demo` trains (experiments=contrastive_vit), logged to MLflow as usual.
"""

import platform
import sys
import time

import torch

from clipkit.config import compose_config
from clipkit.train import fit

COLUMNS = ["zeroshot/scenes/top1", "zeroshot/scenes/top5", "zeroshot/novel_pairs/top1",
           "zeroshot/novel_pairs/top5", "retrieval/scenes/image_to_text_r1", "retrieval/scenes/text_to_image_r1"]


def main(overrides: list[str]) -> None:
    cfg = compose_config(["experiments=contrastive_vit", "paths.output_dir=outputs/benchmark-demo", *overrides])
    start = time.perf_counter()
    result = fit(cfg, preset="contrastive_vit")
    wall = time.perf_counter() - start
    print(f"\nmachine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; overrides: {' '.join(overrides) or 'none'}\n")
    header = ["wall (fit)", "images", "train img/s", *[c.split("/", 1)[1] for c in COLUMNS]]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    cells = [f"{wall / 60:.1f} min", f"{result.images_seen:,}", f"{result.train_images_per_second:.0f}",
             *[f"{100 * result.metrics[c]:.1f}%" for c in COLUMNS]]
    print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
