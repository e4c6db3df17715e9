"""Import and export at full size: OpenAI's ViT-B/32 and RN50 layouts, built by open_clip with random weights (nothing
is downloaded), imported into clipkit, exported back to open_clip and (ViT) to transformers. Prints, for each hop, the
largest difference of L2-normalised embeddings (and of the zero-shot pipeline's probabilities), and the time taken.

    .venv/bin/python benchmarks/interop.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

import clipkit
from clipkit.evaluate import build, load_checkpoint
from clipkit.interop.hf_clip import export_hf
from clipkit.interop.openai_clip import export_open_clip, import_checkpoint

TEXTS = ["a photo of a cat.", "a diagram of two red circles", "an orange triangle beside a blue star"]
LABELS = ["cat", "dog", "red circle"]


def largest(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@torch.no_grad()
def measure(name: str, folder: Path) -> dict:
    torch.manual_seed(0)
    reference = open_clip.create_model(name, pretrained=None).eval()
    torch.save(reference.state_dict(), folder / "openai.pt")
    start = time.perf_counter()
    imported = import_checkpoint(folder / "openai.pt", folder / "imported.safetensors")
    row = {"model": name, "import s": time.perf_counter() - start}
    model = clipkit.load(imported)
    images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    row["import vs open_clip"] = max(
        largest(model.encode_image(images), reference.encode_image(images, normalize=True)),
        largest(model.encode_text(TEXTS), reference.encode_text(open_clip.tokenize(TEXTS), normalize=True)))
    ckpt, stored = load_checkpoint(imported)
    module = build(ckpt, stored)
    start = time.perf_counter()
    row["open_clip export"] = export_open_clip(module, stored, model.tokenizer, folder / "open_clip")[1]
    row["export s"] = time.perf_counter() - start
    if "class_embedding" in "".join(reference.state_dict()):
        from transformers import pipeline

        row["hf export"] = export_hf(module, stored, model.tokenizer, folder / "hf")[1]
        image = folder / "photo.png"  # not 224 px: resized and cropped on both sides
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 260, 3), dtype=np.uint8)).save(image)
        result = pipeline("zero-shot-image-classification", model=str(folder / "hf"))(
            str(image), candidate_labels=LABELS, hypothesis_template="a photo of a {}.")
        theirs = torch.tensor([{r["label"]: r["score"] for r in result}[label] for label in LABELS])
        row["hf pipeline probabilities"] = largest(theirs, model.classify([image], LABELS, ["a photo of a {}."])[0])
    return row


def cell(column: str, value) -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if column.endswith(" s") else f"{value:.1e}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ViT-B-32-quickgelu,RN50-quickgelu")
    args = parser.parse_args()
    torch.set_num_threads(2)
    columns = ["model", "import vs open_clip", "open_clip export", "hf export", "hf pipeline probabilities",
               "import s", "export s"]
    print("| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns))
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            row = measure(name, Path(tmp))
        print("| " + " | ".join(cell(c, row.get(c, "refused: no ResNet in CLIPModel")) for c in columns) + " |",
              flush=True)

if __name__ == "__main__":
    main()
