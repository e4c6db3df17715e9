"""``python -m clipkit predict ckpt=PATH images=[...] labels=[...]``: ranked labels with probabilities per image."""

from __future__ import annotations

import json
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def images_in(folder: Path) -> list[Path]:
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {folder}")
    return found


def image_paths(entries: list[str]) -> list[Path]:
    """Files as given, folders as their image files by name; a path that does not exist is an error."""
    from clipkit.config import expand_paths

    return expand_paths(entries, images_in, "no such image or folder: ")


def _as_list(value) -> list[str]:
    return [str(value)] if isinstance(value, (str, int, float)) else [str(v) for v in value]


def predict_main(args: list[str]) -> int:
    from clipkit.api import load, resolve_device
    from clipkit.config import compose_config, require
    from clipkit.errors import UsageError

    cfg = compose_config(args, config_name="predict")
    require(cfg, ("ckpt", "images", "labels"),
            "python -m clipkit predict ckpt=PATH images=[a.png,b.jpg] labels=[cat,dog]")
    try:
        paths = image_paths(_as_list(cfg.images))
        labels = _as_list(cfg.labels)
        model = load(cfg.ckpt, resolve_device(cfg.device), cfg.batch_size)
        templates = _as_list(cfg.templates) if cfg.templates is not None else None
        probs = model.classify(paths, labels, templates)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
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
