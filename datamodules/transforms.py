"""The paper's image pipeline: resize the shorter side, then a random square crop for training (its only
augmentation) or the centre crop for evaluation; normalisation is done once per batch."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_transform(image_size: int, train: bool) -> v2.Compose:
    """RGB PIL image of any size -> uint8 ``[3, image_size, image_size]``."""
    crop = v2.RandomCrop(image_size) if train else v2.CenterCrop(image_size)
    return v2.Compose([v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                       crop, v2.PILToTensor()])


def normalize(mean=CLIP_MEAN, std=CLIP_STD) -> v2.Compose:
    """uint8 ``[..., 3, H, W]`` -> normalised float. Applied once per batch: per image it cost more CPU
    than drawing the image."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
