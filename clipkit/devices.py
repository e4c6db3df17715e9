"""The device a command runs on. Its own module because both the inference API (:mod:`clipkit.api`) and the
evaluation that API's loader builds on (:mod:`clipkit.evaluate`) need it: in either, it made an import cycle."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> str:
    """``auto``: cuda when available, else cpu; any other name as given."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
