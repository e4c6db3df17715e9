"""The embedded default dataset: an endless, seeded stream of captioned scenes plus held-out sets.

Held out from training, as validation (model selection, ``val/zeroshot/...``):
* ``scenes``: single objects of every trained pair like the test set below, drawn from a split of their own;

and as test sets (reported):
* ``scenes``: single-object images of every trained (colour, shape) pair, classified among those pairs;
* ``novel_pairs``: single objects whose (colour, shape) pair never appears in training, classified among
  *all* pairs, so the model must compose a colour and a shape it only saw apart (reported separately);
* ``retrieval``: multi-object scenes with their captions, for image↔text recall.

The training stream is one endless "shard" run through the same pipeline as WebDataset shards
(:mod:`datamodules.stream`): reader r of n keeps samples r, r+n, ..., so no two workers or ranks ever
produce the same sample, and sample i is the same image and caption in every run.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property, partial
from itertools import count

import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from clipkit.zeroshot import ProbeSet, RetrievalSet, ZeroShotSet, class_prompts
from datamodules import scenes, shifts
from datamodules.base import CaptionDataModule
from datamodules.stream import Record


class SceneSource:
    """One endless shard of generated scenes; images are drawn only by the reader that keeps them."""

    SHARD = "synthetic"

    def __init__(self, seed: int, image_size: int, pairs: list[tuple[str, str]], supersample: int = 2,
                 objects_p: tuple[float, ...] = scenes.OBJECTS_P, split: str = "train") -> None:
        self.seed, self.image_size, self.pairs, self.supersample = seed, image_size, pairs, supersample
        self.objects_p, self.split = tuple(objects_p), split

    def shards(self) -> list[str]:
        return [self.SHARD]

    def records(self, shard: str, seed: str | None = None) -> Iterator[Record]:
        for i in count():
            scene, text = scenes.captioned_scene(self.seed, self.split, i, self.pairs, self.objects_p)
            yield Record(shard, str(i), partial(scenes.render, scene, self.image_size, self.supersample), text)


class SyntheticScenesDataModule(CaptionDataModule):
    """Captioned synthetic scenes; deterministic from ``seed``; nothing is downloaded or stored.
    See :class:`~datamodules.base.CaptionDataModule` for the options shared with every datamodule."""

    def __init__(self, tokenizer, seed: int = 0, image_size: int = 48, holdout_pairs: list[list[str]] | None = None,
                 eval_per_class: int = 20, supersample: int = 2, objects_p: tuple[float, ...] = scenes.OBJECTS_P,
                 retrieval_captions: int = 1, probe_per_class: int = 32, shift_domains: list[str] = (),
                 labels: bool = False, **common) -> None:
        self.retrieval_captions, self.probe_per_class = retrieval_captions, probe_per_class
        for domain in shift_domains:
            if domain not in shifts.SHIFTS:
                raise ValueError(f"unknown shifted domain {domain!r}: choose from {', '.join(shifts.SHIFTS)}")
        self.shift_domains, self.labels = list(shift_domains), labels
        self.novel_pairs = [tuple(p) for p in (holdout_pairs or [])]
        scenes.check_pairs(self.novel_pairs)
        self.train_pairs = [p for p in scenes.all_pairs() if p not in self.novel_pairs]
        self.supersample, self.objects_p = supersample, tuple(objects_p)
        self._source = SceneSource(seed, image_size, self.train_pairs, supersample, self.objects_p)
        # a generated stream needs no shuffling, and is never exhausted
        common.update(shuffle=False, shuffle_buffer=0)
        super().__init__(tokenizer, seed=seed, image_size=image_size, eval_per_class=eval_per_class, **common)

    def source(self) -> SceneSource:
        return self._source

    def source_is_finite(self) -> bool:
        return False

    def _render(self, scene: scenes.Scene) -> Image.Image:
        return scenes.render(scene, self.image_size, self.supersample)

    def single_objects(self, split: str, pairs: list[tuple[str, str]], per_class: int | None = None
                       ) -> list[tuple[Image.Image, tuple[str, str]]]:
        """``per_class`` (default ``eval_per_class``) single-object images of each pair, as (image, pair)."""
        out = []
        for i in range((per_class or self.eval_per_class) * len(pairs)):
            pair = pairs[i % len(pairs)]
            scene = scenes.sample_scene(scenes.sample_rng(self.seed, split, i), [pair], n_objects=1)
            out.append((self._render(scene), pair))
        return out

    def _labelled(self, split: str, shown_pairs, class_pairs, per_class: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised images ``[N, 3, H, W]``, labels as indices into ``class_pairs``) of single objects."""
        images, shown = zip(*self.single_objects(split, shown_pairs, per_class), strict=True)
        labels = torch.tensor([class_pairs.index(p) for p in shown])
        return self.normalize(torch.stack([pil_to_tensor(im) for im in images])), labels

    def _classification(self, name: str, split: str, shown_pairs, class_pairs) -> ZeroShotSet:
        images, labels = self._labelled(split, shown_pairs, class_pairs)
        classnames = [f"{colour} {shape}" for colour, shape in class_pairs]  # scenes.scene_classes' naming
        prompts = class_prompts(self.tokenizer, classnames, self.templates, self.context_length)
        return ZeroShotSet(name, images, labels, classnames, prompts)

    def zeroshot_splits(self) -> list[tuple[str, str, list, list]]:
        """(set name, sample split, pairs shown, pairs scored among) of each zero-shot set."""
        splits = [("scenes", "zeroshot", self.train_pairs, self.train_pairs)]
        if self.novel_pairs:
            splits.append(("novel_pairs", "novel_pairs", self.novel_pairs, scenes.all_pairs()))
        return splits

    def own_zeroshot_sets(self) -> list[ZeroShotSet]:
        return [self._classification(*split) for split in self.zeroshot_splits()]

    def own_validation_sets(self) -> list[ZeroShotSet]:
        """``scenes`` drawn from the ``val`` split: the same task as the test set, none of its samples (every sample
        is a pure function of (seed, split, index), and the split enters the generator's seed)."""
        return [self._classification("scenes", "val", self.train_pairs, self.train_pairs)]

    def retrieval_pairs(self) -> Iterator[tuple[Image.Image, list[str]]]:
        """Held-out scenes with ``retrieval_captions`` captions each: the first as in training, the others
        drawn independently for the same scene (COCO-style: five people describe one image)."""
        for i in range(self.retrieval_size):
            scene, text = scenes.captioned_scene(self.seed, "retrieval", i, self.train_pairs, self.objects_p)
            more = [scenes.caption(scene, scenes.sample_rng(self.seed, "retrieval_caption", i, j))
                    for j in range(1, self.retrieval_captions)]
            yield self._render(scene), [text, *more]

    def probe_sets(self) -> list[ProbeSet]:
        """Probe training images: ``probe_per_class`` fresh single objects per trained pair; test: the
        ``scenes`` zero-shot set."""
        zs = next(z for z in self.zeroshot_sets() if z.name == "scenes")
        train, labels = self._labelled("probe", self.train_pairs, self.train_pairs, self.probe_per_class)
        return [ProbeSet("scenes", train, labels, zs.images, zs.labels, zs.classnames)]

    def classnames(self) -> list[str]:
        """The trained (colour, shape) pairs as class names, in the order of ``labels`` and the ``scenes`` set."""
        return scenes.scene_classes(self.novel_pairs)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """With ``labels``, each training batch gets ``labels [B, C]``: which trained pairs its scenes show (a scene is
        a pure function of its key, so it is sampled again, not drawn), for the supervised baseline."""
        batch = super().on_before_batch_transfer(batch, dataloader_idx)
        if self.labels and isinstance(batch, dict) and "keys" in batch:
            labels = torch.zeros(len(batch["keys"]), len(self.train_pairs))
            for row, key in enumerate(batch["keys"]):
                rng = scenes.sample_rng(self.seed, "train", int(key.rsplit(" ", 1)[-1]))
                for obj in scenes.sample_scene(rng, self.train_pairs, objects_p=self.objects_p).objects:
                    labels[row, self.train_pairs.index((obj.colour, obj.shape))] = 1.0
            batch["labels"] = labels
        return batch

    def shifted_sets(self) -> list[ZeroShotSet]:
        """The ``shift_domains`` (:mod:`datamodules.shifts`): ``eval_per_class`` single objects of every trained pair
        per domain, drawn in a way training never shows, classified among the trained pairs like ``scenes``."""
        n = len(self.train_pairs)
        pairs = [self.train_pairs[i % n] for i in range(self.eval_per_class * n)]
        labels = torch.tensor([self.train_pairs.index(p) for p in pairs])
        classnames = self.classnames()
        prompts = class_prompts(self.tokenizer, classnames, self.templates, self.context_length)
        out = []
        for domain in self.shift_domains:
            images = [pil_to_tensor(shifts.shifted_image(domain, self.seed, i, pair, self.image_size, self.supersample))
                      for i, pair in enumerate(pairs)]
            out.append(ZeroShotSet(domain, self.normalize(torch.stack(images)), labels, classnames, prompts))
        return out

    @cached_property
    def _retrieval_sets(self) -> list[RetrievalSet]:
        if not self.retrieval_size:
            return []
        images, captions = zip(*self.retrieval_pairs(), strict=True)
        return [self.retrieval_set("scenes", [pil_to_tensor(im) for im in images], list(captions))]
