"""``python -m clipkit predict ckpt=PATH images=[...] labels=[...]``: ranked labels with probabilities per image."""

from __future__ import annotations

import json
from pathlib import Path

from clipkit.commands import KeyValueCommand, one_line

COMMAND = KeyValueCommand(
    "predict", "python -m clipkit predict ckpt=PATH images=[a.png,b.jpg] labels=[cat,dog] [key=value ...]",
    "Rank labels for images with a model trained by clipkit fit or imported by clipkit import: the probability\n"
    "of each label per image, from prompts built with the kit's zero-shot templates.",
    "python -m clipkit predict ckpt=outputs/.../model.safetensors images=[a.png,photos/] labels=[cat,dog]",
    required=("ckpt", "images", "labels"))


def _as_list(value) -> list[str]:
    return [str(value)] if isinstance(value, (str, int, float)) else [str(v) for v in value]


def main(args: list[str]) -> int:
    cfg = COMMAND.compose(args)
    if cfg is None:
        return 0
    from clipkit.api import load, resolve_device
    from clipkit.predict import image_paths

    with one_line():
        paths = image_paths(_as_list(cfg.images))
        labels = _as_list(cfg.labels)
        model = load(cfg.ckpt, resolve_device(cfg.device), cfg.batch_size)
        templates = _as_list(cfg.templates) if cfg.templates is not None else None
        probs = model.classify(paths, labels, templates)
    top = min(cfg.top_k, len(labels))
    source = model.config.get("imported_from")
    trained = f"imported from {source}" if source else f"{model.images_seen:,} images seen"
    lines = [f"clipkit predict: {cfg.ckpt} ({trained}), {len(labels)} labels"]
    for path, row in zip(paths, probs, strict=True):
        lines.append(str(path))
        values, order = row.topk(top)
        lines += [f"  {100 * float(p):6.2f} %  {labels[i]}" for p, i in zip(values, order.tolist(), strict=True)]
    if cfg.out:
        per_image = {str(p): dict(zip(labels, map(float, row), strict=True))
                     for p, row in zip(paths, probs, strict=True)}
        report = {"checkpoint": str(cfg.ckpt), "labels": labels, "images": per_image}
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(report, indent=2))
        lines.append(f"probabilities: {cfg.out}")
    print("\n".join(lines), flush=True)
    return 0
