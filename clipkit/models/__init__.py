"""Towers: any timm image model and a text tower (a transformers model, or a bag of words), each returning
pooled features [B, width]."""

from clipkit.models.bow import BagOfWordsTower, word_mask
from clipkit.models.image import ImageTower
from clipkit.models.text import TextTower

__all__ = ["BagOfWordsTower", "ImageTower", "TextTower", "word_mask"]
