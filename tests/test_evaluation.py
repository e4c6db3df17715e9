"""Zero-shot and retrieval metrics, by hand on small cases; prompt ensembling averages normalised embeddings."""

import pytest
import torch
import torch.nn.functional as F

from clipkit.evaluation import recall_at_k, topk_accuracy


def test_topk_accuracy():
    logits = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1], [0.1, 0.8, 0.7]])
    assert topk_accuracy(logits, torch.tensor([0, 0, 2]), ks=(1, 2)) == {"top1": pytest.approx(1 / 3), "top2": 1.0}


def test_recall_counts_a_hit_when_any_positive_is_in_top_k():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.1, 0.2, 0.3, 0.9]])
    # query 0's positives are items 1 and 2: item 1 is 2nd, so R@1 misses and R@2 hits
    # query 1's positives are items 0 and 3: item 3 is first
    positives = torch.tensor([[False, True, True, False], [True, False, False, True]])
    assert recall_at_k(scores, positives, ks=(1, 2)) == {"r1": 0.5, "r2": 1.0}


def test_prompt_ensemble_is_the_renormalised_mean(tiny_cfg):
    from hydra.utils import instantiate

    objective = instantiate(tiny_cfg().objective).eval()
    ids = torch.randint(4, 100, (3, 2, 6))
    ids[..., 0], ids[..., -1] = 1, 2
    prompts = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        classes = objective.class_embeddings(prompts)
        each = objective.encode_text(ids.reshape(6, 6), torch.ones(6, 6, dtype=torch.long)).reshape(3, 2, -1)
        images = torch.randn(4, 3, 32, 32)
        logits = objective.zero_shot_logits(images, prompts)
    assert torch.allclose(classes, F.normalize(each.mean(1), dim=-1), atol=1e-6)
    assert logits.shape == (4, 3)
    assert torch.allclose(logits, objective.logit_scale.exp() * objective.encode_image(images) @ classes.T, atol=1e-5)
