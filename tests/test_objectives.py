"""The Figure-2 objectives: each learns, all answer zero-shot with the same shape and meaning, bag-of-words
targets are right, the caption decoder is causal, and no objective builds a tower it does not use."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from transformers import CLIPTextConfig, GPT2Config

from clipkit.models import BagOfWordsTower, ImageTower, TextTower
from clipkit.objectives import BagOfWordsPrediction, CaptionLM, Contrastive, bag_of_words
from clipkit.tokenization import tokenize, train_or_load_bpe
from clipkit.train import check_vocabulary, drop_unused_models

CLASSES = ["red circle", "blue square", "green star", "yellow ring"]
CORPUS = [f"a {c} and a {d}" for c in CLASSES for d in CLASSES] * 5 + ["a red circle and a red square"] * 5
LENGTH = 12


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_or_load_bpe(CORPUS, vocab_size=64, context_length=LENGTH, cache_dir=tmp_path_factory.mktemp("bpe"))


def image_tower():
    return ImageTower("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1, embed_dim=32, num_heads=2)


def make(name: str, vocab: int):
    torch.manual_seed(0)
    if name == "contrastive":
        text = TextTower(CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=LENGTH, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2))
        return Contrastive(image_tower(), text, embed_dim=16)
    if name == "bow_contrastive":
        return Contrastive(image_tower(), BagOfWordsTower(vocab, width=32), embed_dim=16)
    if name == "bow_prediction":
        return BagOfWordsPrediction(image_tower(), vocab)
    return CaptionLM(image_tower(), GPT2Config(vocab_size=vocab, n_positions=LENGTH, n_embd=32, n_layer=1, n_head=2,
                                               n_inner=64, pad_token_id=0, bos_token_id=1, eos_token_id=2))


ARMS = ["contrastive", "bow_contrastive", "bow_prediction", "caption_lm"]


def class_batch(tokenizer):
    """One fixed image per class, captioned with the class name itself."""
    torch.manual_seed(1)
    enc = tokenize(tokenizer, CLASSES, LENGTH)
    return {"images": torch.randn(len(CLASSES), 3, 16, 16), **enc}


@pytest.mark.parametrize("arm", ARMS)
def test_loss_decreases_and_zero_shot_then_picks_each_images_own_caption(arm, tokenizer):
    """Same shape and meaning for every objective: ``[B, C]``, and the highest score is the matching class."""
    objective, batch = make(arm, len(tokenizer)), class_batch(tokenizer)
    prompts = {k: v.unsqueeze(1) for k, v in tokenize(tokenizer, CLASSES, LENGTH).items()}  # [C, T=1, L]
    optimiser = torch.optim.AdamW(objective.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, _ = objective.loss(batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        objective.after_optimizer_step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    objective.eval()
    with torch.no_grad():
        scores = objective.zero_shot_logits(batch["images"], prompts)
    assert scores.shape == (len(CLASSES), len(CLASSES)) and torch.isfinite(scores).all()
    assert scores.argmax(1).tolist() == list(range(len(CLASSES))), scores


def test_zero_shot_ensembles_templates_and_keeps_the_class_axis(tokenizer):
    """Row c of the prompts is class c whatever the objective: permuting the classes permutes the score columns
    alike. Templates are ensembled as each objective says: the contrastive family averages normalised prompt
    embeddings and renormalises (open_clip's classifier); bag-of-words and caption prediction average the scores
    of the single templates (the prediction scores are linear in the bag, the caption ones are averaged)."""
    images = torch.randn(3, 3, 16, 16)
    templates = ["a {}.", "a photo of a {}.", "{}"]
    texts = [t.format(c) for c in CLASSES for t in templates]
    prompts = {k: v.reshape(len(CLASSES), len(templates), LENGTH) for k, v in tokenize(tokenizer, texts, LENGTH).items()}
    order = torch.tensor([2, 0, 3, 1])
    for arm in ARMS:
        objective = make(arm, len(tokenizer)).eval()
        with torch.no_grad():
            logits = objective.zero_shot_logits(images, objective.zero_shot_classifier(prompts))
            permuted = objective.zero_shot_logits(images, {k: v[order] for k, v in prompts.items()})
            singles = torch.stack([objective.zero_shot_logits(images, {k: v[:, t:t + 1] for k, v in prompts.items()})
                                   for t in range(len(templates))])  # [T, B, C]
            if arm in ("contrastive", "bow_contrastive"):
                each = torch.nn.functional.normalize(objective.encode_text(
                    prompts["input_ids"].flatten(0, 1), prompts["attention_mask"].flatten(0, 1)), dim=-1)
                classes = torch.nn.functional.normalize(each.reshape(len(CLASSES), len(templates), -1).mean(1), dim=-1)
                expected = objective.logit_scale.exp() * objective.encode_image(images) @ classes.T
            else:
                expected = singles.mean(0)
        assert logits.shape == (3, len(CLASSES)), arm
        torch.testing.assert_close(permuted, logits[:, order], msg=arm)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5, msg=arm)
        assert not torch.allclose(singles[0], singles[1]), arm  # the templates really differ


def test_bag_of_words_target_of_a_known_caption(tokenizer):
    enc = tokenize(tokenizer, ["a red circle and a red square"], LENGTH)
    target = bag_of_words(enc["input_ids"], enc["attention_mask"], len(tokenizer))[0]
    words = "a red circle and a red square".split()  # each a whole token in this vocabulary
    ids = {w: tokenizer.convert_tokens_to_ids("▁" + w) for w in set(words)}
    assert all(i != tokenizer.unk_token_id for i in ids.values())
    expected = torch.zeros(len(tokenizer))
    for w in words:
        expected[ids[w]] += 1 / len(words)
    torch.testing.assert_close(target, expected)  # a and red 2/7; start, end and padding 0
    assert target[[tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id]].sum() == 0


def test_bag_of_words_prediction_scores_a_class_by_its_negative_loss(tokenizer):
    """Zero-shot asks the training question: the score of class c is minus the loss with c's prompt as caption."""
    objective = make("bow_prediction", len(tokenizer)).eval()
    batch = class_batch(tokenizer)
    prompts = {k: v.unsqueeze(1) for k, v in tokenize(tokenizer, CLASSES, LENGTH).items()}
    with torch.no_grad():
        scores = objective.zero_shot_logits(batch["images"][:1], prompts)[0]
        for c in range(len(CLASSES)):
            one = {"images": batch["images"][:1], "input_ids": batch["input_ids"][c:c + 1],
                   "attention_mask": batch["attention_mask"][c:c + 1]}
            torch.testing.assert_close(scores[c], -objective.loss(one)[0])


def test_bag_of_words_tower_ignores_order_start_end_and_padding(tokenizer):
    tower = BagOfWordsTower(len(tokenizer), width=8)
    a = tokenize(tokenizer, ["a red circle and a blue square"], LENGTH)
    b = tokenize(tokenizer, ["a blue square and a red circle"], LENGTH)
    torch.testing.assert_close(tower(a["input_ids"], a["attention_mask"]), tower(b["input_ids"], b["attention_mask"]))
    shorter = tokenize(tokenizer, ["red"], LENGTH)
    word = tokenizer.convert_tokens_to_ids("▁red")
    torch.testing.assert_close(tower(shorter["input_ids"], shorter["attention_mask"])[0], tower.embedding.weight[word])


def test_caption_decoder_cannot_see_future_tokens(tokenizer):
    """Changing token t+1 leaves the loss of every token up to t unchanged (and changes token t+1's)."""
    objective = make("caption_lm", len(tokenizer)).eval()
    enc = tokenize(tokenizer, ["a red circle and a blue square"], LENGTH)
    memory = objective.memory(torch.randn(1, 3, 16, 16))
    ids = enc["input_ids"].clone()
    t = 3
    other = ids.clone()
    other[0, t + 1] = tokenizer.convert_tokens_to_ids("▁star")
    assert other[0, t + 1] != ids[0, t + 1]
    with torch.no_grad():
        a = objective.token_nll(memory, ids, enc["attention_mask"])  # column j: -log p(token j+1 | tokens <= j)
        b = objective.token_nll(memory, other, enc["attention_mask"])
    torch.testing.assert_close(a[0, :t], b[0, :t])  # tokens 1..t
    assert not torch.allclose(a[0, t], b[0, t])      # token t+1 itself


def test_caption_scores_are_mean_token_log_likelihoods_in_any_block_size(tokenizer):
    objective = make("caption_lm", len(tokenizer)).eval()
    images = torch.randn(3, 3, 16, 16)
    enc = tokenize(tokenizer, CLASSES, LENGTH)
    prompts = {k: v.unsqueeze(1) for k, v in enc.items()}
    with torch.no_grad():
        memory = objective.memory(images)
        expected = torch.stack([
            -(objective.token_nll(memory[i:i + 1].repeat(len(CLASSES), 1, 1), enc["input_ids"], enc["attention_mask"])
              .sum(1) / enc["attention_mask"][:, 1:].sum(1)) for i in range(3)])
        for block in (1, 3, 5, 1000):
            objective.score_batch = block
            torch.testing.assert_close(objective.zero_shot_logits(images, prompts), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("objective,absent", [("bow_prediction", (TextTower, BagOfWordsTower)),
                                              ("caption_lm", (TextTower, BagOfWordsTower)),
                                              ("bow_contrastive", (TextTower,))])
def test_towers_an_objective_does_not_use_are_neither_built_nor_recorded(tiny_cfg, objective, absent):
    cfg = tiny_cfg(f"objective={objective}")
    assert drop_unused_models(cfg) == ["text"] and "text" not in cfg.model
    built = instantiate(cfg.objective)
    assert not [m for m in built.modules() if isinstance(m, absent)]
    assert any(isinstance(m, ImageTower) for m in built.modules())


def test_contrastive_keeps_its_text_tower(tiny_cfg):
    cfg = tiny_cfg()
    assert drop_unused_models(cfg) == [] and "text" in cfg.model


def test_a_decoder_whose_special_ids_disagree_with_the_tokenizer_is_refused(tokenizer):
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=LENGTH, n_embd=32, n_layer=1, n_head=2)  # eos 50256
    module = torch.nn.Module()
    module.objective = CaptionLM(image_tower(), config)
    with pytest.raises(ValueError, match="GPT2LMHeadModel has pad_token_id=None but the tokenizer's is 0"):
        check_vocabulary(tokenizer, module)
    module.objective = BagOfWordsPrediction(image_tower(), len(tokenizer) - 1)
    with pytest.raises(ValueError, match="BagOfWordsPrediction's vocab_size is"):
        check_vocabulary(tokenizer, module)


def test_arms_are_labelled_for_mlflow_and_compare(tokenizer):
    labels = {arm: make(arm, len(tokenizer)).arm for arm in ARMS}
    assert labels == {"contrastive": "contrastive (transformer text)", "bow_contrastive": "contrastive (bag of words text)",
                      "bow_prediction": "bag-of-words prediction", "caption_lm": "caption prediction (transformer LM)"}


def test_fixed_temperature_stays_put_and_mlp_projection_is_two_layers(tokenizer):
    from clipkit.module import decay_groups
    from clipkit.objectives.contrastive import make_projection

    torch.manual_seed(0)
    text = BagOfWordsTower(len(tokenizer), width=32)
    fixed = Contrastive(image_tower(), text, embed_dim=16, learn_temperature=False, projection="mlp")
    assert not fixed.logit_scale.requires_grad
    assert all(fixed.logit_scale is not p for g in decay_groups(fixed, 0.1) for p in g["params"])
    before = fixed.logit_scale.item()
    optimiser = torch.optim.AdamW([p for g in decay_groups(fixed, 0.1) for p in g["params"]], lr=0.1)
    loss, _ = fixed.loss(class_batch(tokenizer))
    loss.backward()
    optimiser.step()
    assert fixed.logit_scale.item() == before
    assert [type(m).__name__ for m in fixed.image_proj] == ["Linear", "GELU", "Linear"]
    with pytest.raises(ValueError, match="unknown projection 'deep': choose from linear, affine, mlp"):
        make_projection("deep", 8, 4)
