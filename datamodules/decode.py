"""Turn one stored sample (image bytes or file, caption bytes) into an RGB image and a caption, or say
exactly why not.

A bad sample raises :class:`BadSample` with a *kind* (the name it is counted under, ``data/skipped/<kind>``
in MLflow); an image in a mode the towers cannot take is converted and its mode is reported as a *repair*
(``data/repaired/<kind>``). Nothing here logs: callers count, so a million bad files give one warning.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Every kind a sample can be skipped for, so counts and docs cannot drift from the code.
SKIP_KINDS = {
    "missing_image": "no image in the sample (no jpg/png/webp member)",
    "missing_file": "the image file a CSV row names does not exist",
    "empty_image": "zero-byte image",
    "not_an_image": "bytes that no image decoder recognises",
    "truncated_image": "image data ends early or is corrupt",
    "huge_image": "more pixels than data.max_image_pixels (checked before decoding)",
    "missing_caption": "no caption in the sample",
    "empty_caption": "caption empty or only whitespace",
    "undecodable_caption": "caption bytes are not UTF-8",
    "unreadable_shard": "a shard that could not be opened or read to its end (the rest of it is lost)",
}
REPAIR_KINDS = {
    "grayscale": "L/LA/1 mode, replicated to RGB",
    "rgba": "alpha channel, composited over white",
    "palette": "P mode, expanded through its palette",
    "cmyk": "CMYK, converted to RGB",
    "16bit": "16-bit grayscale, scaled to 8 bits (a plain convert would clip it to white)",
    "other_mode": "any other mode, converted by PIL",
}


class BadSample(Exception):
    """A sample that cannot be used; ``kind`` is one of :data:`SKIP_KINDS`."""

    def __init__(self, kind: str, detail: str = "") -> None:
        assert kind in SKIP_KINDS, kind
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind, self.detail = kind, detail


def _open(payload: bytes | str | Path) -> Image.Image:
    if isinstance(payload, (str, Path)):
        path = Path(payload)
        if not path.is_file():
            raise BadSample("missing_file", str(path))
        payload = path.read_bytes()
    if len(payload) == 0:
        raise BadSample("empty_image")
    try:
        return Image.open(io.BytesIO(payload))
    except Image.DecompressionBombError as err:
        raise BadSample("huge_image", str(err)) from None
    except UnidentifiedImageError:
        raise BadSample("not_an_image") from None
    except (OSError, SyntaxError, ValueError) as err:  # a header cut short
        raise BadSample("truncated_image", str(err)) from None


def _to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode.startswith("I;16") or mode == "I":
        wide = np.asarray(image, dtype=np.float32)
        top = 65535.0 if mode.startswith("I;16") or wide.max() > 255 else 255.0
        gray = Image.fromarray(np.clip(wide * (255.0 / top) + 0.5, 0, 255).astype(np.uint8))
        return gray.convert("RGB"), "16bit"
    if mode == "P":
        image = image.convert("RGBA")
        kind = "palette"
    elif mode in ("RGBA", "LA", "PA") or (mode in ("RGB", "L") and "transparency" in image.info):
        image = image.convert("RGBA")
        kind = "rgba"
    elif mode in ("L", "1"):
        return image.convert("RGB"), "grayscale"
    elif mode == "CMYK":
        return image.convert("RGB"), "cmyk"
    else:
        return image.convert("RGB"), "other_mode"
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image).convert("RGB"), kind


def decode_image(payload: bytes | str | Path | Image.Image, max_pixels: int = 50_000_000,
                 min_size: int | None = None) -> tuple[Image.Image, str | None]:
    """Bytes, a file path or a PIL image -> (RGB image, repair kind or None). Raises :class:`BadSample`.

    ``min_size``: the side the image will be resized to; JPEGs are then decoded at the smallest DCT scale
    that still covers it (``Image.draft``), several times faster for web-sized images.
    """
    image = payload if isinstance(payload, Image.Image) else _open(payload)
    width, height = image.size
    if width * height > max_pixels:
        raise BadSample("huge_image", f"{width}x{height}")
    if width == 0 or height == 0:
        raise BadSample("truncated_image", f"{width}x{height}")
    try:
        if min_size and image.format == "JPEG":
            scale = min(width, height) / min_size
            image.draft("RGB", (int(width / scale) + 1, int(height / scale) + 1))
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except Image.DecompressionBombWarning as err:
        raise BadSample("huge_image", str(err)) from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL's truncated/corrupt-data errors
        raise BadSample("truncated_image", str(err)) from None
    return _to_rgb(image)


def decode_caption(payload: bytes | str | None) -> str:
    """Bytes or text -> stripped caption. Raises :class:`BadSample` for missing, empty or non-UTF-8 text."""
    if payload is None:
        raise BadSample("missing_caption")
    try:  # str may carry undecodable bytes as surrogates (files read with errors="surrogateescape")
        payload = payload.decode("utf-8") if isinstance(payload, bytes) else payload.encode("utf-8").decode()
    except UnicodeError:
        raise BadSample("undecodable_caption") from None
    text = payload.strip()
    if not text:
        raise BadSample("empty_caption")
    return text
