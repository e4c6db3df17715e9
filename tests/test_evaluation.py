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


# -- the evaluation suite (issue 5): every metric against a case worked by hand ---------------------------

def test_per_class_accuracy_and_mean_per_class_recall():
    from clipkit.evaluation import classification_report, per_class_accuracy

    # class 0: 2 of 3 right; class 1: 1 of 1; class 2: no images (NaN, left out of the mean)
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.1, 0.9, 0.0], [0.0, 0.7, 0.3]])
    labels = torch.tensor([0, 0, 0, 1])
    per_class = per_class_accuracy(logits, labels)
    assert per_class[:2].tolist() == pytest.approx([2 / 3, 1.0]) and torch.isnan(per_class[2])
    report = classification_report(logits, labels, ["a", "b", "c"])
    assert report["top1"] == pytest.approx(3 / 4)  # the micro average differs from the class mean:
    assert report["mean_per_class_recall"] == pytest.approx((2 / 3 + 1) / 2)
    assert report["per_class"]["b"] == 1.0


def test_retrieval_recall_at_1_5_10_on_a_matrix_with_known_ranks():
    from clipkit.evaluation import retrieval_report

    n = 12
    scores = -torch.arange(n, dtype=torch.float).repeat(n, 1)  # every query ranks caption j at place j
    positives = torch.zeros(n, n, dtype=torch.bool)
    positives[torch.arange(n), torch.tensor([0, 0, 3, 4, 4, 9, 9, 9, 11, 11, 2, 1])] = True
    report = retrieval_report(scores, positives)
    # ranks (0-based) of each image's caption: 0,0,3,4,4,9,9,9,11,11,2,1 -> R@1 2/12, R@5 7/12, R@10 10/12
    assert report["image_to_text_r1"] == pytest.approx(2 / 12)
    assert report["image_to_text_r5"] == pytest.approx(7 / 12)
    assert report["image_to_text_r10"] == pytest.approx(10 / 12)


def test_text_to_image_recall_ranks_the_images_for_each_caption():
    """2 images x 3 captions (captions 0, 1 describe image 0; caption 2 image 1). Image to text: each image's best
    caption is its own (R@1 = 1). Text to image, down the columns: caption 0 prefers image 1, caption 1 image 0,
    caption 2 image 0, so only caption 1 hits at 1 (R@1 = 1/3), and every caption within 2 images."""
    from clipkit.evaluation import retrieval_report

    scores = torch.tensor([[0.2, 0.9, 0.5], [0.3, 0.1, 0.4]])
    positives = torch.tensor([[True, True, False], [False, False, True]])
    report = retrieval_report(scores, positives, ks=(1, 2))
    assert report == {"image_to_text_r1": 1.0, "image_to_text_r2": 1.0,
                      "text_to_image_r1": pytest.approx(1 / 3), "text_to_image_r2": 1.0}


def test_the_callback_logs_retrieval_both_ways_as_clipkit_eval_reports_it(tiny_cfg):
    """The training-time numbers and the eval command's come from one computation on the same scores."""
    import threading

    from hydra.utils import instantiate

    from callbacks.zeroshot import ZeroShotEvaluation
    from clipkit.evaluation import retrieval_report
    from clipkit.evaluation.suite import scores
    from tests.test_zeroshot_scale import fake_rank

    cfg = tiny_cfg()
    torch.manual_seed(0)
    datamodule, objective = instantiate(cfg.data), instantiate(cfg.objective).eval()
    metrics = ZeroShotEvaluation().evaluate(*fake_rank(0, 1, datamodule, objective, [None], threading.Barrier(1)))
    (rs,) = datamodule.retrieval_sets()
    expected = retrieval_report(scores(objective, rs.images, rs.prompts, "cpu"), rs.positives, ks=(1, 5))
    assert {k: metrics[f"retrieval/scenes/{k}"] for k in expected} == pytest.approx(expected)
    assert expected["text_to_image_r5"] != expected["image_to_text_r5"], expected  # the directions differ here


def test_any_caption_rule_counts_a_hit_where_one_to_one_misses():
    """CLIP_benchmark: an image hits when any of its captions is in the top k; one-to-one only counts caption i."""
    from clipkit.evaluation import recall_at_k

    # 2 images x 4 captions (captions 0,1 describe image 0; 2,3 image 1). Image 0 ranks its 2nd caption first.
    scores = torch.tensor([[0.2, 0.9, 0.1, 0.0], [0.0, 0.1, 0.3, 0.8]])
    any_caption = torch.tensor([[True, True, False, False], [False, False, True, True]])
    one_to_one = torch.tensor([[True, False, False, False], [False, False, True, False]])
    assert recall_at_k(scores, any_caption, ks=(1,)) == {"r1": 1.0}
    assert recall_at_k(scores, one_to_one, ks=(1,)) == {"r1": 0.0}


def test_several_captions_per_scene_are_all_positives_of_their_image(tiny_cfg):
    from hydra.utils import instantiate

    one = instantiate(tiny_cfg("data.retrieval_size=4").data).retrieval_sets()[0]
    three = instantiate(tiny_cfg("data.retrieval_size=4", "data.retrieval_captions=3").data).retrieval_sets()[0]
    assert three.positives.shape == (4, 12) and three.positives.sum(1).tolist() == [3, 3, 3, 3]
    assert three.positives[1, 3:6].all() and not three.positives[1, :3].any()
    assert three.captions[::3] == one.captions  # the first caption is the one-caption set's: results stay comparable
    assert len(set(three.captions)) > 4


def test_linear_probe_solves_a_separable_problem_and_chooses_c_on_validation():
    import numpy as np

    from clipkit.evaluation.probe import few_shot, linear_probe, stratified_split

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 5
    y = np.repeat(np.arange(4), 30)
    x = centres[y] + rng.normal(size=(120, 16))
    test_y = np.repeat(np.arange(4), 10)
    test_x = centres[test_y] + rng.normal(size=(40, 16))
    result = linear_probe(x, y, test_x, test_y, c_grid=(0.01, 1.0, 100.0))
    assert result["top1"] == 1.0 and result["C"] in (1.0, 100.0)
    assert result["validation_top1"]["0.01"] <= result["validation_top1"][f"{result['C']:g}"]
    shots = few_shot(x, y, test_x, test_y, ks=(1, 4), seeds=(0, 1), c=1.0)
    assert set(shots) == {"1_shot", "4_shot"} and shots["4_shot"]["top1"] >= 0.9
    assert len(shots["1_shot"]["per_seed"]) == 2
    train, val = stratified_split(y, 0.2, seed=0)
    assert len(val) == 24 and set(y[train]) == set(y[val]) == {0, 1, 2, 3} and not set(train) & set(val)


def test_a_probe_cannot_do_better_than_chance_on_random_labels():
    import numpy as np

    from clipkit.evaluation.probe import linear_probe

    rng = np.random.default_rng(1)
    x, test_x = rng.normal(size=(200, 8)), rng.normal(size=(400, 8))
    result = linear_probe(x, rng.integers(0, 4, 200), test_x, rng.integers(0, 4, 400), c_grid=(0.1, 1.0))
    assert result["top1"] < 0.4  # chance is 0.25


def test_paper_claims_are_marked_from_the_means_over_seeds():
    from benchmarks.paper_claims import KS, claims

    def row(ensemble, single=0.3, probe=0.9, shots=(0.2, 0.3, 0.5, 0.6, 0.7), temperature=0.05):
        return {"ensemble": ensemble, "single": single, "linear_probe": probe, "temperature": temperature,
                **{f"{k}_shot": s for k, s in zip(KS, shots, strict=True)}}

    results = {"paper": [row(0.5), row(0.4)], "fixed_temperature": [{"ensemble": 0.5}, {"ensemble": 0.6}],
               "mlp_projection": [{"ensemble": 0.50}, {"ensemble": 0.48}]}
    marks = {claim: ok for claim, ok, _ in claims(results)}
    assert marks["prompt ensembling beats a single prompt"]                   # 0.45 > 0.30
    assert marks["zero-shot matches a k-shot linear probe for a small k (paper: ~4)"]  # 4-shot 0.5 >= 0.45
    assert marks["a linear probe beats zero-shot"]
    assert not marks["a learned temperature beats a fixed one (0.07)"]        # 0.45 < 0.55
    assert not marks["a linear projection is as good as a non-linear one (within 2 points)"]  # 0.45 < 0.49 - 0.02
    results["mlp_projection"] = [{"ensemble": 0.46}, {"ensemble": 0.46}]
    assert {c: ok for c, ok, _ in claims(results)}["a linear projection is as good as a non-linear one (within 2 points)"]


def test_scoring_keeps_no_autograd_graph(tiny_cfg):
    """Held-out sets are scored without gradients: a graph per chunk would hold every activation."""
    from hydra.utils import instantiate

    from clipkit.evaluation.suite import scores

    objective = instantiate(tiny_cfg().objective)
    prompts = {"input_ids": torch.randint(3, 50, (2, 1, 8)), "attention_mask": torch.ones(2, 1, 8, dtype=torch.long)}
    assert not scores(objective, torch.randn(3, 3, 32, 32), prompts, "cpu").requires_grad
