"""What every training datamodule shares: tokenizer, training stream, held-out sets, start-up checks.

A subclass names its :class:`~datamodules.stream.Source` (and optionally a held-out retrieval source
and its own zero-shot sets); the pipeline from records to batches is the same for all of them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from functools import cached_property
from itertools import islice

import lightning as L
import torch

from clipkit.errors import DataError
from clipkit.resume import gather_objects
from clipkit.tokenization import tokenize
from clipkit.zeroshot import DEFAULT_TEMPLATES, ProbeSet, RetrievalSet, ZeroShotSet, split_off
from datamodules.decode import BadSample, decode_caption
from datamodules.imagefolder import image_folder_set
from datamodules.stream import BatchStream, Collate, EpochDataLoader, Source, StreamPosition, decode_record
from datamodules.transforms import CLIP_MEAN, CLIP_STD, image_transform, normalize

log = logging.getLogger(__name__)


def in_order(source: Source) -> Iterator:
    """Every record of a source, shard by shard, unshuffled."""
    for shard in source.shards():
        try:
            yield from source.records(shard, None)
        except BadSample:
            continue


class CaptionDataModule(L.LightningDataModule):
    """Image–caption training data.

    ``tokenizer`` is a factory ``(captions, context_length) -> tokenizer`` (a Hydra partial of
    :func:`clipkit.tokenization.train_or_load_bpe`), trained on the first ``corpus_size`` captions.
    ``batch_size`` is per process. ``eval_folders``: labelled image folders (``root/<class>/*.jpg``) to
    score zero-shot; ``val_fraction`` of each folder's images per class are held out of that (reported) set as
    its validation set, the one the best checkpoint is chosen on (a datamodule with held-out data of its own may
    split that too: digits). ``probe``: records decoded at start-up so an empty or all-bad source fails at once.
    """

    def __init__(self, tokenizer: Callable, seed: int = 0, image_size: int = 48, batch_size: int = 128,
                 num_workers: int = 1, context_length: int = 32, corpus_size: int = 20000,
                 shuffle: bool = True, shuffle_buffer: int = 1000, resampled: bool = False,
                 samples_per_epoch: int | None = None, max_image_pixels: int = 50_000_000,
                 eval_folders: list[str] | None = None, eval_per_class: int | None = None, val_fraction: float = 0.0,
                 retrieval_size: int = 500, templates: list[str] | None = None, probe: int = 64,
                 mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD) -> None:
        super().__init__()
        self.tokenizer_factory, self.seed = tokenizer, seed
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.context_length, self.corpus_size = context_length, corpus_size
        self.shuffle, self.shuffle_buffer, self.resampled = shuffle, shuffle_buffer, resampled
        self.samples_per_epoch, self.max_image_pixels = samples_per_epoch, max_image_pixels
        self.eval_folders, self.eval_per_class = list(eval_folders or []), eval_per_class
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"data.val_fraction={val_fraction}: use a fraction in [0, 1) of each eval folder")
        self.val_fraction = val_fraction
        self.retrieval_size = retrieval_size
        self.templates = tuple(templates or DEFAULT_TEMPLATES)
        self.normalize = normalize(mean, std)
        self.position: StreamPosition | None = None  # of the batches trained so far (checkpointed)
        self.resume_position: dict | None = None  # from a checkpoint: where the training stream starts again
        if resampled and samples_per_epoch is None:
            log.info("resampled shards and no samples_per_epoch: one endless epoch, ended by max_steps")
        self.check_source(probe)

    # -- what a subclass provides ---------------------------------------------------------------------
    def source(self) -> Source:
        raise NotImplementedError

    def retrieval_source(self) -> Source | None:
        """Held-out image–caption pairs for retrieval; its first ``retrieval_size`` good ones are used."""
        return None

    def own_zeroshot_sets(self) -> list[ZeroShotSet]:
        return []

    def own_validation_sets(self) -> list[ZeroShotSet]:
        """Validation sets drawn apart from training and from every reported set."""
        return []

    # -- shared ---------------------------------------------------------------------------------------
    def check_source(self, probe: int) -> None:
        """Fail at start-up, not hours in, on a source that is empty or whose first records are all bad."""
        if not probe:
            return
        kinds, good, seen = Counter(), 0, 0
        for record in islice(in_order(self.source()), probe):
            seen += 1
            try:
                decode_record(record, self.max_image_pixels, self.image_size)
                good += 1
            except BadSample as bad:
                kinds[bad.kind] += 1
        where = type(self).__name__
        if seen == 0:
            raise DataError(f"{where}: the data source holds no samples")
        if good == 0:
            detail = ", ".join(f"{k} {n}" for k, n in kinds.most_common())
            raise DataError(f"{where}: all of the first {seen} samples are bad ({detail}): is this the right data?")

    def train_captions(self, n: int) -> Iterator[str]:
        """The first ``n`` good captions in storage order: the tokenizer's corpus (images are not decoded)."""
        count = 0
        for record in in_order(self.source()):
            if count == n:
                return
            try:
                yield decode_caption(record.caption)
                count += 1
            except BadSample:
                continue

    @cached_property
    def tokenizer(self):
        return self.tokenizer_factory(captions=self.train_captions(self.corpus_size),
                                      context_length=self.context_length)

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def setup(self, stage: str) -> None:
        rank, world = self._rank_world()
        if stage == "fit" and world > 1 and self.samples_per_epoch is None and self.source_is_finite():
            raise DataError(f"{world} processes read this data: set data.samples_per_epoch (or data.resampled=true) "
                            "so every rank yields the same number of batches; a rank that runs out first hangs the rest")

    def source_is_finite(self) -> bool:
        return True

    def train_dataloader(self) -> EpochDataLoader:
        rank, world = self._rank_world()
        self.position = StreamPosition(self.num_workers or 1, world)
        stream = BatchStream(self.source(), self.batch_size, image_transform(self.image_size, train=True),
                             Collate(self.tokenizer, self.context_length, self.normalize), seed=self.seed,
                             shuffle=self.shuffle, shuffle_buffer=self.shuffle_buffer, resampled=self.resampled,
                             samples_per_epoch=self.samples_per_epoch, max_image_pixels=self.max_image_pixels,
                             decode_size=self.image_size, rank=rank, world=world)
        stream.resume(self.resume_position)
        return EpochDataLoader(stream, num_workers=self.num_workers)

    # -- exact resume: Lightning saves state_dict() in every checkpoint and calls load_state_dict() on resume ----
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Called once per batch that is about to be trained (not when Lightning fetches ahead)."""
        position = batch.pop("position", None) if isinstance(batch, dict) else None
        if position is not None and self.position is not None and self.trainer is not None and self.trainer.training:
            self.position.trained(position)
        return batch

    def state_dict(self) -> dict:
        if self.position is None:
            return {}
        return {"position": StreamPosition.merge(gather_objects(self.position.state()))}  # every rank's readers

    def load_state_dict(self, state: dict) -> None:
        self.resume_position = state.get("position")

    def eval_transform(self):
        return image_transform(self.image_size, train=False)

    @cached_property
    def _folder_sets(self) -> list[tuple[ZeroShotSet, ZeroShotSet | None]]:
        """(test, validation) part of each eval folder."""
        return [split_off(image_folder_set(root, self.tokenizer, self.context_length, self.eval_transform(),
                                           self.normalize, self.templates, self.eval_per_class, self.max_image_pixels),
                          self.val_fraction, self.seed)
                for root in self.eval_folders]

    @cached_property
    def _zeroshot_sets(self) -> list[ZeroShotSet]:
        return self.own_zeroshot_sets() + [test for test, _ in self._folder_sets]

    def zeroshot_sets(self) -> list[ZeroShotSet]:
        """The reported (test) zero-shot sets."""
        return self._zeroshot_sets

    @cached_property
    def _validation_sets(self) -> list[ZeroShotSet]:
        return self.own_validation_sets() + [val for _, val in self._folder_sets if val is not None]

    def validation_sets(self) -> list[ZeroShotSet]:
        """Zero-shot sets for model selection (``val/zeroshot/...``), disjoint from :meth:`zeroshot_sets`."""
        return self._validation_sets

    @cached_property
    def _retrieval_sets(self) -> list[RetrievalSet]:
        source = self.retrieval_source()
        if source is None or not self.retrieval_size:
            return []
        transform, images, captions, kinds = self.eval_transform(), [], [], Counter()
        for record in in_order(source):
            if len(images) == self.retrieval_size:
                break
            try:
                image, _, caption = decode_record(record, self.max_image_pixels, self.image_size)
                images.append(transform(image))
                captions.append(caption)
            except BadSample as bad:
                kinds[bad.kind] += 1
        if kinds:
            log.warning("retrieval set: skipped %s", ", ".join(f"{k} {n}" for k, n in kinds.items()))
        if not images:
            raise DataError("the retrieval source holds no good samples")
        return [self.retrieval_set("held_out", images, captions)]

    def retrieval_set(self, name: str, images: list[torch.Tensor], captions: list[str] | list[list[str]]) -> RetrievalSet:
        """Images with one caption each, or several (``captions[i]`` lists image i's): every caption of an
        image is a positive for it (CLIP_benchmark's any-caption rule)."""
        per_image = [[c] if isinstance(c, str) else list(c) for c in captions]
        flat = [c for group in per_image for c in group]
        owner = torch.tensor([i for i, group in enumerate(per_image) for _ in group])
        prompts = {k: v.unsqueeze(1) for k, v in tokenize(self.tokenizer, flat, self.context_length).items()}
        positives = owner.unsqueeze(0) == torch.arange(len(per_image)).unsqueeze(1)  # [images, captions]
        return RetrievalSet(name, self.normalize(torch.stack(images)), flat, prompts, positives)

    def probe_sets(self) -> list[ProbeSet]:
        """Training and test images for linear / few-shot probes; none unless the dataset has labels."""
        return []

    def shifted_sets(self) -> list[ZeroShotSet]:
        """The zero-shot classes under distribution shift, for the robustness evaluation; none unless the data
        draws them (the generated scenes do: ``data.shift_domains``)."""
        return []

    def retrieval_sets(self) -> list[RetrievalSet]:
        return self._retrieval_sets
