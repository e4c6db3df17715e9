"""The embedded default dataset: an endless, seeded stream of captioned scenes plus held-out sets.

Held out from training:
* ``scenes``: single-object images of every trained (colour, shape) pair, classified among those pairs;
* ``novel_pairs``: single objects whose (colour, shape) pair never appears in training, classified among
  *all* pairs, so the model must compose a colour and a shape it only saw apart (reported separately);
* ``retrieval``: multi-object scenes with their captions, for image↔text recall.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import cached_property

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from clipkit.tokenization import tokenize
from clipkit.zeroshot import DEFAULT_TEMPLATES, RetrievalSet, ZeroShotSet, class_prompts
from datamodules import scenes

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(mean=CLIP_MEAN, std=CLIP_STD) -> v2.Compose:
    """uint8 ``[..., 3, H, W]`` -> normalised float. Applied once per batch: per image it cost more CPU
    than drawing the image."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def shard_of_stream() -> tuple[int, int]:
    """(this reader's index, number of readers) over DDP ranks × dataloader workers."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
    return rank * workers + worker, world * workers


class SceneStream(IterableDataset):
    """Endless training stream: reader r of n yields samples r, r + n, r + 2n, ... so no two workers or
    ranks ever produce the same sample, and sample i is the same image and caption in every run."""

    def __init__(self, seed: int, image_size: int, pairs: list[tuple[str, str]], supersample: int = 2,
                 objects_p: tuple[float, ...] = scenes.OBJECTS_P) -> None:
        self.seed, self.image_size, self.pairs = seed, image_size, pairs
        self.supersample, self.objects_p = supersample, tuple(objects_p)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        index, step = shard_of_stream()
        while True:
            scene, text = scenes.captioned_scene(self.seed, "train", index, self.pairs, self.objects_p)
            yield pil_to_tensor(scenes.render(scene, self.image_size, self.supersample)), text
            index += step


class Collate:
    """Stacks and normalises images and tokenises captions, inside the dataloader workers."""

    def __init__(self, tokenizer, context_length: int, normalize: Callable) -> None:
        self.tokenizer, self.context_length, self.normalize = tokenizer, context_length, normalize

    def __call__(self, samples: list[tuple[torch.Tensor, str]]) -> dict[str, torch.Tensor]:
        images, captions = zip(*samples, strict=True)
        return {"images": self.normalize(torch.stack(images)),
                **tokenize(self.tokenizer, list(captions), self.context_length)}


class SyntheticScenesDataModule(L.LightningDataModule):
    """Captioned synthetic scenes; deterministic from ``seed``; nothing is downloaded or stored.

    ``tokenizer`` is a factory ``(captions, context_length) -> tokenizer`` (a Hydra partial of
    :func:`clipkit.tokenization.train_or_load_bpe`), trained on ``corpus_size`` training captions.
    ``batch_size`` is per process.
    """

    def __init__(self, tokenizer: Callable, seed: int = 0, image_size: int = 48, batch_size: int = 128,
                 num_workers: int = 1, context_length: int = 32, holdout_pairs: list[list[str]] | None = None,
                 eval_per_class: int = 20, retrieval_size: int = 500, corpus_size: int = 20000,
                 supersample: int = 2, objects_p: tuple[float, ...] = scenes.OBJECTS_P,
                 templates: list[str] | None = None,
                 mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD) -> None:
        super().__init__()
        self.tokenizer_factory = tokenizer
        self.seed, self.image_size, self.batch_size = seed, image_size, batch_size
        self.num_workers, self.context_length = num_workers, context_length
        self.eval_per_class, self.retrieval_size, self.corpus_size = eval_per_class, retrieval_size, corpus_size
        self.supersample, self.objects_p = supersample, tuple(objects_p)
        self.templates = tuple(templates or DEFAULT_TEMPLATES)
        self.normalize = normalize(mean, std)
        self.novel_pairs = [tuple(p) for p in (holdout_pairs or [])]
        scenes.check_pairs(self.novel_pairs)
        self.train_pairs = [p for p in scenes.all_pairs() if p not in self.novel_pairs]

    def train_captions(self, n: int) -> Iterator[str]:
        """The first ``n`` captions of the training stream (the tokenizer's corpus), without drawing images."""
        for i in range(n):
            yield scenes.captioned_scene(self.seed, "train", i, self.train_pairs, self.objects_p)[1]

    @cached_property
    def tokenizer(self):
        return self.tokenizer_factory(captions=self.train_captions(self.corpus_size),
                                      context_length=self.context_length)

    def train_dataloader(self) -> DataLoader:
        stream = SceneStream(self.seed, self.image_size, self.train_pairs, self.supersample, self.objects_p)
        return DataLoader(stream, batch_size=self.batch_size, num_workers=self.num_workers,
                          collate_fn=Collate(self.tokenizer, self.context_length, self.normalize),
                          persistent_workers=self.num_workers > 0, prefetch_factor=4 if self.num_workers else None)

    def _render(self, scene: scenes.Scene) -> torch.Tensor:
        return pil_to_tensor(scenes.render(scene, self.image_size, self.supersample))

    def _single_objects(self, split: str, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, list[tuple[str, str]]]:
        images, shown = [], []
        for i in range(self.eval_per_class * len(pairs)):
            pair = pairs[i % len(pairs)]
            scene = scenes.sample_scene(scenes.sample_rng(self.seed, split, i), [pair], n_objects=1)
            images.append(self._render(scene))
            shown.append(pair)
        return self.normalize(torch.stack(images)), shown

    def _classification(self, name: str, split: str, shown_pairs, class_pairs) -> ZeroShotSet:
        images, shown = self._single_objects(split, shown_pairs)
        labels = torch.tensor([class_pairs.index(p) for p in shown])
        classnames = [f"{colour} {shape}" for colour, shape in class_pairs]
        prompts = class_prompts(self.tokenizer, classnames, self.templates, self.context_length)
        return ZeroShotSet(name, images, labels, classnames, prompts)

    @cached_property
    def _zeroshot_sets(self) -> list[ZeroShotSet]:
        sets = [self._classification("scenes", "zeroshot", self.train_pairs, self.train_pairs)]
        if self.novel_pairs:
            sets.append(self._classification("novel_pairs", "novel_pairs", self.novel_pairs, scenes.all_pairs()))
        return sets

    def zeroshot_sets(self) -> list[ZeroShotSet]:
        return self._zeroshot_sets

    @cached_property
    def _retrieval_sets(self) -> list[RetrievalSet]:
        images, captions = [], []
        for i in range(self.retrieval_size):
            scene, text = scenes.captioned_scene(self.seed, "retrieval", i, self.train_pairs, self.objects_p)
            images.append(self._render(scene))
            captions.append(text)
        prompts = {k: v.unsqueeze(1) for k, v in tokenize(self.tokenizer, captions, self.context_length).items()}
        positives = torch.eye(len(captions), dtype=torch.bool)
        return [RetrievalSet("scenes", self.normalize(torch.stack(images)), captions, prompts, positives)]

    def retrieval_sets(self) -> list[RetrievalSet]:
        return self._retrieval_sets
