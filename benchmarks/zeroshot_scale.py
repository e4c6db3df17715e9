"""Zero-shot evaluation at ImageNet scale: 1,000 classes x 80 templates on the default towers (the hybrid ViT and
the clip_tiny text transformer), random weights, random prompt tokens of prompt-like lengths.

    python benchmarks/zeroshot_scale.py [--classes 1000] [--templates 80] [--images 1024] [--batch-size 512]

"before" reproduces the old path: every chunk of ``--batch-size`` images encoded all C x T prompts at once
(``zero_shot_classifier`` called per chunk, all prompts in one text pass). "after" is ``clipkit.evaluation.suite.
scores``: the classifier once per set, ``--text-batch-size`` prompts per text pass. Each row runs in a fresh
process; peak memory is that process's peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``),
which includes the model, the images and the prompts ("baseline": the peak before scoring starts). Prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipkit.config import compose_config  # noqa: E402
from clipkit.evaluation.suite import scores  # noqa: E402


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def inputs(classes: int, templates: int, images: int, context: int, vocab: int, size: int):
    """Prompts ``[C, T, L]`` of 6-16 tokens (start, words, end; right-padded) and images ``[N, 3, size, size]``."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(6, 17, (classes, templates, 1), generator=g)
    mask = (torch.arange(context) < lengths).long()
    ids = torch.randint(3, vocab, (classes, templates, context), generator=g) * mask
    ids[..., 0] = 1
    ids.scatter_(2, lengths - 1, 2)  # the end token at each prompt's last position
    return {"input_ids": ids, "attention_mask": mask}, torch.randn(images, 3, size, size, generator=g)


def run(variant: str, args) -> dict:
    torch.manual_seed(0)
    cfg = compose_config([])
    objective = instantiate(cfg.objective).eval()
    prompts, images = inputs(args.classes, args.templates, args.images, int(cfg.data.context_length),
                             int(cfg.model.text.config.vocab_size), int(cfg.data.image_size))
    calls = [0]
    objective.text_tower.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + len(a[0])))
    baseline, start = peak_mib(), time.perf_counter()
    with torch.no_grad():
        if variant == "before":
            out = torch.cat([objective.zero_shot_logits(chunk, objective.zero_shot_classifier(prompts, None))
                             for chunk in images.split(args.batch_size)])
        else:
            out = scores(objective, images, prompts, "cpu", args.batch_size, args.text_batch_size)
    return {"seconds": time.perf_counter() - start, "peak_mib": peak_mib(), "baseline_mib": baseline,
            "prompts_encoded": calls[0], "shape": list(out.shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--templates", type=int, default=80)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=512, help="images per chunk (the callback's default)")
    parser.add_argument("--text-batch-size", type=int, default=1024)
    parser.add_argument("--variants", default="before,after")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run(args.child, args)))
        return
    rows = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--child", variant, *sys.argv[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append((variant, json.loads(done.stdout.strip().splitlines()[-1])))
        print(f"{variant}: {rows[-1][1]}", file=sys.stderr, flush=True)
    chunks = -(-args.images // args.batch_size)
    print(f"\n{args.classes} classes x {args.templates} templates, {args.images} images in {chunks} chunks of "
          f"{args.batch_size}, text batch {args.text_batch_size}\n")
    print("| path | seconds | prompts through the text tower | peak RSS MiB | before scoring MiB |")
    print("|---|---|---|---|---|")
    for variant, r in rows:
        print(f"| {variant} | {r['seconds']:.1f} | {r['prompts_encoded']:,} | {r['peak_mib']:,.0f} | "
              f"{r['baseline_mib']:,.0f} |")


if __name__ == "__main__":
    main()
