"""Inference in three calls: ``model = clipkit.load(PATH)``, then ``model.classify(images, labels)``, or
``encode_image`` / ``encode_text`` for the joint embedding space.

``PATH`` is anything ``clipkit fit`` or ``clipkit import`` wrote: a checkpoint or a ``.safetensors`` export (LoRA
adapters merged into the towers, so no peft is needed to use it). Images
are prepared exactly as the run's evaluation saw them (resize the shorter side, centre crop, normalise).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from clipkit.devices import resolve_device  # noqa: F401  (clipkit.api.resolve_device, as before)
from clipkit.zeroshot import DEFAULT_TEMPLATES, class_prompts, on_device

ImageInput = str | Path | Image.Image


class ClipModel:
    """A trained model with its tokenizer and image pipeline. ``objective`` is the model itself: every objective
    classifies (``zero_shot_logits``), a contrastive one also embeds."""

    def __init__(self, module, stored, tokenizer, device: str = "cpu", batch_size: int = 64) -> None:
        from datamodules.transforms import image_transform, normalize

        self.objective = module.objective.eval().to(device)
        self.images_seen = int(module.images_seen)
        self.config, self.tokenizer, self.device, self.batch_size = stored, tokenizer, device, batch_size
        self.context_length = int(stored.data.context_length)
        self.transform = image_transform(int(stored.data.image_size), train=False)
        self.normalize = normalize(tuple(stored.data.mean), tuple(stored.data.std))

    def preprocess(self, images: Sequence[ImageInput] | torch.Tensor) -> torch.Tensor:
        """Paths or PIL images -> the model's input ``[N, 3, S, S]``; a float tensor is taken as that input already.
        A missing or unreadable file is a one-line ``ValueError`` naming it."""
        from datamodules.decode import BadSample, decode_image

        if isinstance(images, torch.Tensor):
            return images.to(self.device)
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        tensors = []
        for image in images:
            try:
                rgb, _ = decode_image(image if isinstance(image, Image.Image) else Path(image))
            except BadSample as err:
                raise ValueError(f"cannot read image {image}: {err}") from None
            tensors.append(self.transform(rgb))
        if not tensors:
            raise ValueError("no images given")
        return self.normalize(torch.stack(tensors)).to(self.device)

    def _joint(self, name: str):
        method = getattr(self.objective, name, None)
        if method is None:
            raise ValueError(f"{type(self.objective).__name__} has no joint embedding space ({name} is the contrastive "
                             f"objectives'); classify works with every objective")
        return method

    @torch.no_grad()
    def encode_image(self, images: Sequence[ImageInput] | torch.Tensor) -> torch.Tensor:
        """``[N, D]`` L2-normalised image embeddings."""
        encode, pixels = self._joint("encode_image"), self.preprocess(images)
        return torch.cat([encode(pixels[i:i + self.batch_size]) for i in range(0, len(pixels), self.batch_size)])

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, D]`` L2-normalised text embeddings."""
        from clipkit.tokenization import tokenize

        encode = self._joint("encode_text")
        enc = {k: v.to(self.device) for k, v in tokenize(self.tokenizer, list(texts), self.context_length).items()}
        return encode(enc["input_ids"], enc["attention_mask"])

    @torch.no_grad()
    def classify(self, images: Sequence[ImageInput] | torch.Tensor, labels: Sequence[str],
                 templates: Sequence[str] | None = None) -> torch.Tensor:
        """``[N, C]`` probabilities over ``labels`` (softmax of the objective's zero-shot scores), the label prompts
        ensembled over ``templates`` (default: the kit's zero-shot set, ``clipkit.zeroshot.DEFAULT_TEMPLATES``)."""
        labels, templates = list(labels), list(templates or DEFAULT_TEMPLATES)
        if not labels or any(not str(label).strip() for label in labels):
            raise ValueError(f"labels must be non-empty names, got {labels}")
        if any("{}" not in t for t in templates):
            raise ValueError(f"every template needs a {{}} where the label goes, got {templates}")
        prompts = on_device(class_prompts(self.tokenizer, labels, templates, self.context_length), self.device)
        pixels, classifier = self.preprocess(images), self.objective.zero_shot_classifier(prompts, 1024)
        logits = torch.cat([self.objective.zero_shot_logits(pixels[i:i + self.batch_size], classifier)
                            for i in range(0, len(pixels), self.batch_size)])
        if torch.isneginf(logits).all(dim=-1).any():  # a classifier asked only for classes it was not trained on
            known = getattr(self.objective, "classnames", None)
            hint = f": it knows only {', '.join(known[:8])}{' ...' if len(known) > 8 else ''}" if known else ""
            raise ValueError(f"the model scores none of the labels {labels}{hint}")
        return logits.float().softmax(dim=-1)


def checkpoint_tokenizer(ckpt: dict, stored):
    """The tokenizer a checkpoint was trained with (stored in it), at its run's context length."""
    from clipkit.tokenization import StoredTokenizer

    info = ckpt["clipkit"]
    return StoredTokenizer(info["tokenizer"], info.get("tokenizer_specials"))(
        context_length=int(stored.data.context_length))


def load(path: str | Path, device: str = "cpu", batch_size: int = 64) -> ClipModel:
    """The model in a checkpoint or ``.safetensors`` written by ``clipkit fit`` or ``clipkit import``."""
    from clipkit.evaluate import build, load_checkpoint
    from clipkit.models.lora import without_lora

    ckpt, stored = load_checkpoint(path)  # LoRA adapters come merged: the model is one without them
    return ClipModel(build(ckpt, stored), without_lora(stored), checkpoint_tokenizer(ckpt, stored), device, batch_size)
