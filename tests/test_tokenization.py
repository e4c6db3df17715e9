"""The BPE tokenizer: lower-cased, round-trips captions, fixed context with the end token kept, cached."""

import os

from clipkit.tokenization import BOS_ID, EOS_ID, PAD_ID, tokenize, train_or_load_bpe

CAPTIONS = ["a photo of a red circle", "Two shapes: a blue square and a small green star.",
            "clipart of a turquoise ring #shapes", "stock image - a pink crescent | hd wallpaper"] * 50


def test_round_trip_is_lower_cased_text(isolated):
    tok = train_or_load_bpe(CAPTIONS, vocab_size=300, context_length=32, cache_dir=isolated)
    for text in ["A Photo of a RED circle", "a small green star"]:
        ids = tokenize(tok, [text], 32)["input_ids"][0]
        assert tok.decode(ids, skip_special_tokens=True) == text.lower()


def test_context_is_fixed_and_end_token_survives_truncation(isolated):
    tok = train_or_load_bpe(CAPTIONS, vocab_size=300, context_length=8, cache_dir=isolated)
    enc = tokenize(tok, ["a red circle", "a photo of a red circle and a blue square and a star"], 8)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == (2, 8) and mask.shape == (2, 8)
    assert ids[0, 0] == BOS_ID and ids[0, mask[0].sum() - 1] == EOS_ID and ids[0, -1] == PAD_ID
    assert ids[1, 0] == BOS_ID and ids[1, -1] == EOS_ID and mask[1].all()  # truncated, still ends
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)


def test_trained_once_then_loaded_from_cache(isolated):
    first = train_or_load_bpe(CAPTIONS, vocab_size=300, context_length=16, cache_dir=isolated)
    stamp = os.stat(first.cache_path).st_mtime_ns
    second = train_or_load_bpe(iter(CAPTIONS), vocab_size=300, context_length=16, cache_dir=isolated)
    assert second.cache_path == first.cache_path and os.stat(second.cache_path).st_mtime_ns == stamp
    assert second.get_vocab() == first.get_vocab()
    other = train_or_load_bpe(CAPTIONS + ["a new word: zebra"], vocab_size=300, context_length=16, cache_dir=isolated)
    assert other.cache_path != first.cache_path  # a different corpus never reuses a stale vocabulary


def test_empty_corpus_is_refused(isolated):
    import pytest

    with pytest.raises(ValueError, match="empty caption corpus"):
        train_or_load_bpe([], vocab_size=300, context_length=16, cache_dir=isolated)


def test_same_corpus_gives_the_same_vocabulary_in_every_process(tmp_path):
    """A run must be reproducible from its config and seed alone, on a machine without the cache."""
    import subprocess
    import sys

    from datamodules import scenes

    corpus = [scenes.captioned_scene(0, "train", i, scenes.all_pairs(), scenes.OBJECTS_P)[1] for i in range(2000)]
    (tmp_path / "corpus.txt").write_text("\n".join(corpus))
    script = ("import json, sys; from clipkit.tokenization import train_or_load_bpe; "
              "tok = train_or_load_bpe(open(sys.argv[1]).read().split('\\n'), 512, 32, sys.argv[2]); "
              "print(json.dumps(sorted(tok.get_vocab().items())))")
    vocabs = {subprocess.run([sys.executable, "-c", script, str(tmp_path / "corpus.txt"), str(tmp_path / f"c{i}")],
                             capture_output=True, text=True, check=True).stdout for i in range(3)}
    assert len(vocabs) == 1
