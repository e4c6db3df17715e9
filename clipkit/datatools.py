"""``python -m clipkit data synth|inspect``: write the embedded dataset in the formats real data comes in,
and look at any dataset before training on it."""

from __future__ import annotations

import csv
import io
import json
import statistics
import textwrap
from collections import Counter
from itertools import islice
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from clipkit.errors import DataError
from clipkit.zeroshot import DEFAULT_TEMPLATES
from datamodules.base import in_order
from datamodules.decode import BadSample
from datamodules.stream import decode_record


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":  # img2dataset's quality; no chroma subsampling, which smears colour at 48 px
        image.save(buf, format="JPEG", quality=95, subsampling=0)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def _write_wds(directory: Path, samples, fmt: str, shard_size: int, total: int) -> list[Path]:
    from webdataset import ShardWriter

    directory.mkdir(parents=True, exist_ok=True)
    with ShardWriter(str(directory / "%05d.tar"), maxcount=shard_size, verbose=0) as sink:
        for key, image, text, meta in tqdm(samples, total=total, desc=f"writing {directory.name}", unit="img"):
            sink.write({"__key__": key, fmt: _encode(image, fmt), "txt": text, "json": json.dumps(meta)})
    return sorted(directory.glob("*.tar"))


def _write_csv(table: Path, samples, fmt: str, total: int) -> None:
    images = table.parent / f"{table.stem}_images"
    table.parent.mkdir(parents=True, exist_ok=True)
    with table.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["filepath", "title"])
        for key, image, text, _ in tqdm(samples, total=total, desc=f"writing {table.name}", unit="img"):
            path = images / key[:-3] / f"{key}.{fmt}"  # 1,000 files per folder
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_encode(image, fmt))
            writer.writerow([str(path.relative_to(table.parent)), text])


def _write_folder(root: Path, dm, set_name: str, split: str, shown_pairs, class_pairs) -> None:
    """A zero-shot set as an image folder (PNG: the pixels the in-memory set scores)."""
    for colour, shape in class_pairs:
        (root / f"{colour}_{shape}").mkdir(parents=True, exist_ok=True)
    for i, (image, (colour, shape)) in enumerate(dm.single_objects(split, shown_pairs)):
        image.save(root / f"{colour}_{shape}" / f"{i:05d}.png")
    # classnames.txt follows the sorted order of the class folders (how image folders are indexed)
    (root / "classnames.txt").write_text("".join(f"{c} {s}\n" for c, s in sorted(class_pairs, key="_".join)))
    (root / "templates.txt").write_text("".join(f"{t}\n" for t in DEFAULT_TEMPLATES))


def synth(out: Path, fmt: str, samples: int, seed: int, image_size: int, shard_size: int, image_format: str,
          retrieval_size: int, eval_per_class: int) -> str:
    """Write train + retrieval data in ``fmt`` and the zero-shot sets as image folders; return a fit command."""
    from clipkit.config import compose_config
    from datamodules.synthetic import SyntheticScenesDataModule

    defaults = compose_config([]).data  # the streamed default's held-out pairs and caption mix
    dm = SyntheticScenesDataModule(None, seed=seed, image_size=image_size, eval_per_class=eval_per_class,
                                   retrieval_size=retrieval_size, holdout_pairs=defaults.holdout_pairs,
                                   objects_p=defaults.objects_p, supersample=defaults.supersample, probe=0)
    meta = {"source": "clipkit synthetic scenes", "seed": seed}
    train = ((f"{int(r.key):09d}", r.image(), r.caption, {**meta, "index": int(r.key)})
             for r in islice(dm.source().records(dm.source().shards()[0]), samples))
    held = ((f"{i:09d}", image, text, {**meta, "split": "retrieval", "index": i})
            for i, (image, (text, *_)) in enumerate(dm.retrieval_pairs()))
    if fmt == "wds":
        _write_wds(out / "train", train, image_format, shard_size, samples)
        _write_wds(out / "retrieval", held, image_format, shard_size, retrieval_size)
        data = f"data=webdataset data.shards={out}/train data.retrieval_shards={out}/retrieval"
    else:
        _write_csv(out / "train.csv", train, image_format, samples)
        _write_csv(out / "retrieval.csv", held, image_format, retrieval_size)
        data = f"data=csv data.path={out}/train.csv data.retrieval_path={out}/retrieval.csv"
    folders = []
    for name, split, shown, classes in dm.zeroshot_splits():
        _write_folder(out / name, dm, name, split, shown, classes)
        folders.append(str(out / name))
    return (f"python -m clipkit fit {data} data.eval_folders=[{','.join(folders)}] "
            f"data.image_size={image_size} seed={seed}")


def open_source(path: str):
    """A WebDataset shard pattern or directory of shards, or a CSV/TSV file, as a source."""
    from datamodules.csv_table import TableSource
    from datamodules.webdataset import ShardSource

    p = Path(path)
    if p.suffix in (".csv", ".tsv"):
        if not p.is_file():
            raise DataError(f"{path} does not exist")
        first = p.open(encoding="utf-8", errors="replace").readline()
        return "CSV", TableSource(p, separator="\t" if "\t" in first else ",")
    if p.is_dir() and not any(p.glob("*.tar")):
        return "image folder", None
    return "WebDataset", ShardSource(path)


def _quantiles(values: list[int]) -> str:
    if not values:
        return "-"
    values = sorted(values)
    return (f"min {values[0]} / median {statistics.median(values):g} / p95 {values[int(0.95 * (len(values) - 1))]}"
            f" / max {values[-1]}")


def contact_sheet(samples: list[tuple[Image.Image, str]], path: Path, tile: int = 160, columns: int = 4) -> None:
    """A grid of images with their (wrapped) captions underneath."""
    font = ImageFont.load_default(size=11)
    text_h = 48
    rows = (len(samples) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * tile, rows * (tile + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, caption) in enumerate(samples):
        x, y = (i % columns) * tile, (i // columns) * (tile + text_h)
        scale = (tile - 8) / max(image.size)
        thumb = image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
        sheet.paste(thumb, (x + (tile - thumb.width) // 2, y + 4))
        lines = textwrap.wrap(caption, width=26)[:3]
        draw.multiline_text((x + 4, y + tile), "\n".join(lines), fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def inspect(path: str, limit: int, sheet: Path, show: int = 16) -> list[str]:
    """Read up to ``limit`` samples (0: all) and report counts, caption lengths, image sizes; write a sheet."""
    kind, source = open_source(path)
    if source is None:
        return inspect_folder(Path(path), sheet, show)
    good, skipped, repaired, words, chars, sizes, shown = 0, Counter(), Counter(), [], [], Counter(), []
    records = in_order(source)
    for record in tqdm(islice(records, limit or None), total=limit or None, desc="reading", unit="sample"):
        try:
            image, fix, caption = decode_record(record, 50_000_000, None)
        except BadSample as bad:
            skipped[bad.kind] += 1
            continue
        good += 1
        repaired.update([fix] if fix else [])
        words.append(len(caption.split()))
        chars.append(len(caption))
        sizes[image.size] += 1
        if len(shown) < show:
            shown.append((image, caption))
    read = good + sum(skipped.values())
    if read == 0:
        raise DataError(f"{path}: no samples")
    lines = [f"{kind} {path}: {len(source.shards())} shard(s)",
             f"  samples read     {read:,}" + (f" (the first {limit:,}; --limit 0 reads all)" if read == limit else ""),
             f"  good             {good:,}",
             f"  skipped          {sum(skipped.values()):,}" + _kinds(skipped),
             f"  repaired         {sum(repaired.values()):,}" + _kinds(repaired),
             f"  caption words    {_quantiles(words)}",
             f"  caption chars    {_quantiles(chars)}",
             "  image sizes      " + ", ".join(f"{w}x{h} ({n:,})" for (w, h), n in sizes.most_common(3))]
    if shown:
        contact_sheet(shown, sheet)
        lines.append(f"  contact sheet    {sheet} ({len(shown)} samples)")
    return lines


def _kinds(counter: Counter) -> str:
    return (": " + ", ".join(f"{k} {n}" for k, n in counter.most_common())) if counter else ""


def inspect_folder(root: Path, sheet: Path, show: int) -> list[str]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    from datamodules.decode import decode_image
    from datamodules.imagefolder import folder_classes, folder_templates

    names, index = folder_classes(root)
    files = make_dataset(str(root), index, extensions=IMG_EXTENSIONS, allow_empty=True)
    per_class = Counter(label for _, label in files)
    shown = []
    for path, label in files[:: max(1, len(files) // show)][:show]:
        try:
            shown.append((decode_image(path)[0], names[label]))
        except BadSample:
            continue
    templates = folder_templates(root, DEFAULT_TEMPLATES)
    lines = [f"image folder {root}: {len(names)} classes, {len(files):,} images",
             f"  images per class {_quantiles([per_class[i] for i in range(len(names))])}",
             f"  classnames.txt   {'yes' if (root / 'classnames.txt').is_file() else 'no (folder names)'}",
             f"  templates        {len(templates)} ({'templates.txt' if (root / 'templates.txt').is_file() else 'default'})"]
    if shown:
        contact_sheet(shown, sheet)
        lines.append(f"  contact sheet    {sheet} ({len(shown)} images)")
    return lines
