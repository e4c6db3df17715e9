"""Towers: any timm image model and any transformers text model, each returning pooled features [B, width]."""

from clipkit.models.image import ImageTower
from clipkit.models.text import TextTower

__all__ = ["ImageTower", "TextTower"]
