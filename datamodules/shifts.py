"""Shifted evaluation domains of the generated scenes, for the paper's robustness question: the same classes (one
object of a trained colour and shape) drawn in ways training never shows, the way ImageNet-Sketch, -R or ObjectNet
shift ImageNet. Every domain keeps what names the class (the object's colour and shape) and changes the rest.

Each image is a pure function of ``(seed, domain, index)`` drawn from its own split, so no shifted image is ever a
training, zero-shot or probe image.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from datamodules.scenes import COLOURS, SIZES, Scene, background, object_mask, sample_rng, sample_scene

SHIFTS = {
    "sketch": "outline only, in the object's colour, on a white page",
    "texture": "the object filled with stripes of its colour and a pale tint of it",
    "clutter": "grey strokes and dots all over the background",
    "corruption": "blur, pixel noise and heavy JPEG compression",
    "scale": "the object at 0.18 or 0.8 of the image side (training draws 0.3 and 0.5)",
}


def _stripes(colour: tuple[int, int, int], side: int, rng: np.random.Generator) -> Image.Image:
    pale = tuple(int(c + 0.6 * (255 - c)) for c in colour)
    period = max(4, side // int(rng.integers(5, 9)))
    angle = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:side, 0:side]
    band = ((xx * math.cos(angle) + yy * math.sin(angle)) // (period / 2)).astype(int) % 2 == 0
    return Image.fromarray(np.where(band[..., None], np.array(colour, np.uint8), np.array(pale, np.uint8)), "RGB")


def _clutter(image: Image.Image, rng: np.random.Generator) -> None:
    draw, side = ImageDraw.Draw(image), image.size[0]
    for _ in range(int(rng.integers(25, 40))):
        grey = int(rng.integers(30, 226))
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, side, size=4))
        draw.line((x0, y0, x1, y1), fill=(grey,) * 3, width=int(rng.integers(1, 1 + side // 24)))
    for _ in range(int(rng.integers(20, 40))):
        grey, r = int(rng.integers(30, 226)), float(rng.uniform(side / 80, side / 30))
        x, y = rng.uniform(0, side, size=2)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(grey,) * 3)


def _corrupt(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 0.9))))
    noisy = np.asarray(image, np.float32) + rng.normal(0, 12, size=(*image.size[::-1], 3))
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(rng.integers(20, 36)))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def shifted_image(domain: str, seed: int, index: int, pair: tuple[str, str], size: int,
                  supersample: int = 2) -> Image.Image:
    """Image ``index`` of ``domain``: one object of ``pair`` (colour, shape), ``size`` pixels square."""
    if domain not in SHIFTS:
        raise ValueError(f"unknown shifted domain {domain!r}: choose from {', '.join(SHIFTS)}")
    rng = sample_rng(seed, "shift", index, list(SHIFTS).index(domain))
    scene: Scene = sample_scene(rng, [pair], n_objects=1)
    obj, big = scene.objects[0], size * supersample
    colour, diameter, x, y = COLOURS[obj.colour], SIZES[obj.size], obj.x, obj.y
    if domain == "scale":
        diameter = float(rng.choice([0.18, 0.8]))
        x, y = (float(v) for v in rng.uniform(diameter / 2, 1 - diameter / 2, size=2))
    mask = object_mask(obj.shape, x, y, diameter, big)
    if domain == "sketch":
        image = Image.new("RGB", (big, big), (248, 248, 246))
        inside = mask.filter(ImageFilter.MinFilter(2 * max(1, big // 48) + 1))
        outline = Image.fromarray(((np.asarray(mask) > 127) & (np.asarray(inside) < 128)).astype(np.uint8) * 255)
        image.paste(colour, mask=outline)
    else:
        image = background(scene, big)
        if domain == "clutter":
            _clutter(image, rng)
        image.paste(_stripes(colour, big, rng) if domain == "texture" else colour, mask=mask)
    image = image.resize((size, size), Image.Resampling.BOX) if supersample > 1 else image
    return _corrupt(image, rng) if domain == "corruption" else image
