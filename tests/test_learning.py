"""A short real training run learns: zero-shot accuracy far above chance on the held-out classes."""

import pytest

from clipkit.train import fit


@pytest.mark.slow
def test_short_run_beats_chance_by_far(tiny_cfg):
    cfg = tiny_cfg("trainer.max_steps=150", "data.batch_size=64", "data.eval_per_class=4", "model.image.embed_dim=64",
                   "model.image.depth=2", "model.text.config.hidden_size=64",
                   "module.optimizer.lr=2e-3", "module.warmup_steps=20", "callbacks.zeroshot.every_n_steps=0")
    result = fit(cfg)
    chance = 1 / 56
    assert result.images_seen == 150 * 64
    assert result.metrics["zeroshot/scenes/top1"] > 5 * chance
    assert result.metrics["zeroshot/scenes/top5"] > 5 * 5 * chance
    assert result.metrics["retrieval/scenes/image_to_text_r5"] > 2 * 5 / 16  # chance is 5 / 16 on 16 pairs
