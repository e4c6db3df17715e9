"""The images ``python -m clipkit predict`` ranks labels for (:mod:`clipkit.commands.predict`): files as given,
folders as their image files."""

from __future__ import annotations

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
