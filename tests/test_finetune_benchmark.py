"""benchmarks/finetune.py's reading of the WiSE-FT curves: which row is which α, and the claim's verdict rule (paired
differences over seeds against their standard deviation). The training and evaluation it drives are covered by
tests/test_wiseft.py; the whole script's smoke run is ``benchmarks/finetune.py --quick``."""

from __future__ import annotations

import math

import pytest

from benchmarks.finetune import best_alpha, claim_row, models, table, verdict
from clipkit.evaluation.robustness import IN_DISTRIBUTION


def curve(points: dict[float, tuple[float, float]]) -> list[dict]:
    """A wiseft curve from {alpha: (in-distribution, mean shifted)}: two shifted domains around the mean."""
    return [{"alpha": a, "accuracy": {IN_DISTRIBUTION: i, "sketch": s - 0.05, "clutter": s + 0.05}}
            for a, (i, s) in sorted(points.items())]


def seeds(shifted_wise: list[float], id_wise: list[float]) -> dict[int, dict]:
    """Per seed: zero-shot (0.60 ID, 0.40 shifted), fine-tuned (0.80, 0.35), WiSE-FT at 0.5 as given."""
    return {s: {"full": curve({0.0: (0.6, 0.4), 0.5: (i, w), 1.0: (0.8, 0.35)}),
                "lora": curve({0.0: (0.6, 0.4), 0.5: (0.7, 0.4), 1.0: (0.75, 0.38)})}
            for s, (w, i) in enumerate(zip(shifted_wise, id_wise, strict=True))}


def test_rows_read_the_curves_at_zero_half_and_one():
    rows = models(seeds([0.45, 0.47], [0.81, 0.80]))
    assert rows["zero-shot"][0] == pytest.approx({"in_distribution": 0.6, "shifted": 0.4})
    assert rows["fine-tuned"][1] == pytest.approx({"in_distribution": 0.8, "shifted": 0.35})
    assert rows["LoRA (image tower, r=8)"][0] == pytest.approx({"in_distribution": 0.75, "shifted": 0.38})
    assert [p["shifted"] for p in rows["WiSE-FT α=0.5 (fine-tuned)"]] == pytest.approx([0.45, 0.47])
    lines = table(rows).splitlines()
    assert lines[2] == "| zero-shot | 2 | 60.0 ± 0.0 | 40.0 ± 0.0 |"
    assert lines[5] == "| WiSE-FT α=0.5 (fine-tuned) | 2 | 80.5 ± 0.7 | 46.0 ± 1.4 |"


def test_best_alpha_is_the_highest_mean_shifted():
    assert best_alpha(seeds([0.45, 0.47], [0.81, 0.80])) == 0.5
    assert best_alpha(seeds([0.30, 0.32], [0.81, 0.80])) == 0.0


def test_reproduced_when_both_shifted_gains_exceed_their_spread_and_no_in_distribution_loss_does():
    claim = verdict(models(seeds([0.45, 0.47, 0.46], [0.79, 0.81, 0.80])))
    assert claim["verdict"] == "reproduced"
    assert claim["shifted_vs_zeroshot"]["mean"] == pytest.approx(6.0)
    assert claim["shifted_vs_zeroshot"]["sd"] == pytest.approx(1.0)
    assert "| reproduced |" in claim_row(claim)


def test_not_reproduced_when_a_loss_exceeds_its_spread():
    # shifted gains clear, but in distribution 10 points below fine-tuned on every seed
    assert verdict(models(seeds([0.45, 0.47, 0.46], [0.70, 0.71, 0.69])))["verdict"] == "not reproduced"
    # shifted below the fine-tuned end
    assert verdict(models(seeds([0.30, 0.31, 0.32], [0.80, 0.80, 0.80])))["verdict"] == "not reproduced"


def test_within_noise_when_a_gain_is_smaller_than_its_spread_or_there_is_one_seed():
    # shifted +5 ± 4 points over fine-tuned counts, but +0 ± 4 over zero-shot cannot be told apart
    claim = verdict(models(seeds([0.36, 0.44, 0.40], [0.80, 0.80, 0.80])))
    assert claim["shifted_vs_finetuned"]["counts"] and not claim["shifted_vs_zeroshot"]["counts"]
    assert claim["verdict"] == "within noise"
    one = verdict(models(seeds([0.45], [0.80])))
    assert one["verdict"] == "within noise" and math.isnan(one["shifted_vs_zeroshot"]["sd"])
    assert "one seed: no spread measured" in claim_row(one)
