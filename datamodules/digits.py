"""scikit-learn's bundled handwritten digits (1,797 real 8×8 scans, UCI), captioned: a second embedded
dataset, tiny and real, with a stratified zero-shot split that training never sees."""

from __future__ import annotations

import random
from collections.abc import Iterator
from functools import cached_property, partial

import numpy as np
import torch
from PIL import Image

from clipkit.zeroshot import ProbeSet, ZeroShotSet, class_prompts, per_class_mask, split_off
from datamodules.base import CaptionDataModule
from datamodules.stream import Record

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# How a scan might be described; {w} is the digit's word, {n} its numeral.
CAPTIONS = ["a handwritten {w}", "the digit {n}", "handwritten digit {w}", "a scanned {w} written by hand",
            "the number {w}", "number {n}, handwritten", "a {w} written with a pen", "scan of a handwritten {n}"]
TEMPLATES = ("a handwritten {}.", "the number {}.", "the digit {}.", "a scan of a handwritten {}.")


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images ``[N, 8, 8]``, dark ink on white, labels ``[N]``) from the copy shipped in scikit-learn."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = digits.images / 16.0  # 0..16 ink density
    return np.round(255 * (1 - ink)).astype(np.uint8), digits.target.astype(np.int64)


def _rgb(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels, mode="L").convert("RGB")


class DigitsSource:
    """The training digits as one shard; each caption is drawn from :data:`CAPTIONS` by the sample's index."""

    SHARD = "digits"

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
        self.images, self.labels, self.indices = images, labels, indices

    def shards(self) -> list[str]:
        return [self.SHARD]

    def records(self, shard: str, seed: str | None = None) -> Iterator[Record]:
        order = [int(i) for i in self.indices]
        if seed is not None:
            random.Random(seed).shuffle(order)
        for i in order:
            label = int(self.labels[i])
            text = CAPTIONS[i % len(CAPTIONS)].format(w=WORDS[label], n=label)
            yield Record(shard, str(i), partial(_rgb, self.images[i]), text)


class DigitsDataModule(CaptionDataModule):
    """Captioned handwritten digits: ``1 - zeroshot_fraction`` of them for training (one epoch is one pass
    over those, reshuffled), the rest held out over the ten digit words: ``val_fraction`` of those scans (per class)
    as the validation set that model selection uses, the others as the reported ``digits`` zero-shot set."""

    def __init__(self, tokenizer, seed: int = 0, zeroshot_fraction: float = 0.2, labels: bool = False,
                 **common) -> None:
        self.images, self.labels = load_digits_images()
        self.with_labels = labels
        self.held_out = per_class_mask(self.labels, zeroshot_fraction, seed)
        self._source = DigitsSource(self.images, self.labels, np.flatnonzero(~self.held_out))
        common["templates"] = common.get("templates") or list(TEMPLATES)
        super().__init__(tokenizer, seed=seed, **common)

    def source(self) -> DigitsSource:
        return self._source

    def classnames(self) -> list[str]:
        """The ten digit words, in the order of the labels."""
        return list(WORDS)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """With ``labels``, each training batch gets ``labels [B]``: each scan's digit, found from its key (its index
        among the scans), for a classifier (``objective=finetune_classifier``)."""
        batch = super().on_before_batch_transfer(batch, dataloader_idx)
        if self.with_labels and isinstance(batch, dict) and "keys" in batch:
            batch["labels"] = torch.as_tensor([int(self.labels[int(k.rsplit(" ", 1)[-1])]) for k in batch["keys"]])
        return batch

    def probe_sets(self) -> list[ProbeSet]:
        """Probe training images: the training scans; test: the held-out scans of the zero-shot set."""
        train = np.flatnonzero(~self.held_out)
        zs = self.zeroshot_sets()[0]
        return [ProbeSet("digits", self._tensors(train), torch.as_tensor(self.labels[train]), zs.images, zs.labels,
                         zs.classnames)]

    def _tensors(self, indices: np.ndarray) -> torch.Tensor:
        """Scans ``indices`` through the evaluation transform, normalised: ``[N, 3, H, W]``."""
        transform = self.eval_transform()
        return self.normalize(torch.stack([transform(_rgb(self.images[i])) for i in indices]))

    @cached_property
    def _held_out_sets(self) -> tuple[ZeroShotSet, ZeroShotSet | None]:
        """(test, validation): the held-out scans split per class by ``val_fraction``, disjoint."""
        held = np.flatnonzero(self.held_out)
        prompts = class_prompts(self.tokenizer, WORDS, self.templates, self.context_length)
        whole = ZeroShotSet("digits", self._tensors(held), torch.as_tensor(self.labels[held]), WORDS, prompts)
        return split_off(whole, self.val_fraction, self.seed)

    def own_zeroshot_sets(self) -> list[ZeroShotSet]:
        return [self._held_out_sets[0]]

    def own_validation_sets(self) -> list[ZeroShotSet]:
        val = self._held_out_sets[1]
        return [] if val is None else [val]
