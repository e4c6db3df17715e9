"""Lower-cased BPE trained with `tokenizers` on the training captions, cached, served as a HF tokenizer.

The paper's text tower reads lower-cased BPE with start/end tokens and a fixed context; we train a small
BPE on the run's own captions (no download) and wrap it in ``PreTrainedTokenizerFast`` so that a
tokenizer loaded from a local Hugging Face directory later has the same interface.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<start_of_text>", "<end_of_text>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]  # ids 0, 1, 2, 3: the text tower's config names them
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)


# Word boundaries are marked with a leading "▁" on every word, not CLIP's "</w>" suffix: tokenizers'
# BpeTrainer creates suffixed tokens in hash-map order, so the same corpus gave a different vocabulary in
# every process (huggingface/tokenizers#1794), and runs were not reproducible from their config and seed.
SCHEME = "metaspace-v1"  # part of the cache key: a change here never reuses an old vocabulary


def _train(captions: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase(), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(captions, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, BOS_ID), (EOS, EOS_ID)])
    return tok


def _wrap(tok: Tokenizer, context_length: int, specials: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    specials = specials or {"pad_token": PAD, "bos_token": BOS, "eos_token": EOS, "unk_token": UNK}
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=context_length, padding_side="right",
                                   truncation_side="right", **specials)


def train_or_load_bpe(captions: Iterable[str], vocab_size: int, context_length: int,
                      cache_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train a BPE on ``captions`` or load the cached one trained on the same captions and settings.

    The cache key hashes the corpus itself, so a change to the caption generator never reuses a stale
    vocabulary. ``context_length`` counts the start and end tokens (the paper uses 77).
    """
    captions = list(captions)
    if not captions:
        raise ValueError("cannot train a tokenizer on an empty caption corpus")
    digest = hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"bpe-{SCHEME}-{vocab_size}-{digest}.json"
    if path.exists():
        tok = Tokenizer.from_file(str(path))
    else:
        tok = _train(captions, vocab_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # one per process: two may train the same one at once
        tok.save(str(tmp))
        tmp.replace(path)  # atomic: parallel runs of a multirun never read a half-written file
        log.info("trained a %d-token BPE on %d captions -> %s", tok.get_vocab_size(), len(captions), path)
    wrapped = _wrap(tok, context_length)
    wrapped.cache_path = str(path)
    return wrapped


def fixed_context(tokenizer: PreTrainedTokenizerFast, context_length: int) -> PreTrainedTokenizerFast:
    """Pad and truncate on the right to ``context_length`` tokens, as clipkit's own BPE does."""
    tokenizer.model_max_length, tokenizer.padding_side, tokenizer.truncation_side = context_length, "right", "right"
    return tokenizer


def pretrained_tokenizer(path: str | Path, captions: Iterable[str] = (),
                         context_length: int = 77) -> PreTrainedTokenizerFast:
    """The tokenizer saved with a pretrained text tower (a local Hugging Face directory: ``tokenizer.json`` or a
    vocabulary): a pretrained tower only understands its own token ids. ``captions`` is accepted and ignored, so
    this is a drop-in ``data.tokenizer`` factory."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"no pretrained tokenizer directory at {path}")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not tokenizer.is_fast:
        raise ValueError(f"the tokenizer in {path} has no fast (tokenizers) version: clipkit needs its tokenizer.json")
    return fixed_context(tokenizer, context_length)


def openai_clip_tokenizer(context_length: int = 77) -> PreTrainedTokenizerFast:
    """OpenAI CLIP's BPE (49,408 ids, ``<|startoftext|>``/``<|endoftext|>``), built from the merges file that
    open_clip ships (``bpe_simple_vocab_16e6.txt.gz``; no download): the tokenizer of an imported OpenAI or open_clip
    checkpoint. The vocabulary is assembled in OpenAI's order (bytes, bytes + ``</w>``, merges, specials), so ids
    equal ``open_clip.tokenize``'s; unlike open_clip it does not unescape HTML entities (``&amp;``)."""
    import gzip

    try:
        from open_clip.tokenizer import bytes_to_unicode, default_bpe
    except ImportError:
        raise ValueError("OpenAI's CLIP vocabulary ships in open_clip_torch (make install adds it), or pass "
                         "tokenizer=DIR, a local Hugging Face tokenizer directory") from None
    from transformers import CLIPTokenizer

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)
    return fixed_context(tokenizer, context_length)


def tokenizer_json(tokenizer: PreTrainedTokenizerFast | str) -> str:
    """The tokenizer itself as JSON (vocabulary, merges, normaliser, special tokens) from a tokenizer or its JSON,
    without ``truncation``/``padding``: a call with ``padding=``/``truncation=`` leaves those set on the backend, so
    they are the last call's state, not part of what the token ids mean. Checkpoints store this; resume compares it."""
    text = tokenizer if isinstance(tokenizer, str) else tokenizer.backend_tokenizer.to_str()
    data = json.loads(text)
    data["truncation"] = data["padding"] = None
    return json.dumps(data, ensure_ascii=False)


def special_tokens(tokenizer: PreTrainedTokenizerFast) -> dict[str, str]:
    """What a checkpoint stores beside the tokenizer JSON to rebuild it (``StoredTokenizer``)."""
    return dict(tokenizer.special_tokens_map)


def tokenize(tokenizer: PreTrainedTokenizerFast, texts: list[str], context_length: int) -> dict:
    """``texts`` -> ``input_ids`` and ``attention_mask`` [N, context_length] (int64), end token kept on truncation."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=context_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class StoredTokenizer:
    """A tokenizer factory (the datamodule's ``tokenizer`` argument) that returns the tokenizer a checkpoint
    was trained with, whatever captions the new data has: evaluation must read prompts with the same vocabulary.
    ``specials`` names its special tokens (clipkit's BPE's when not given: checkpoints from before they were stored)."""

    def __init__(self, tokenizer_json: str, specials: str | dict | None = None) -> None:
        self.tokenizer_json = tokenizer_json
        self.specials = json.loads(specials) if isinstance(specials, str) else specials

    def __call__(self, captions: Iterable[str] = (), context_length: int = 77) -> PreTrainedTokenizerFast:
        return _wrap(Tokenizer.from_str(self.tokenizer_json), context_length, self.specials)
