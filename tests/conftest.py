"""Shared fixtures: every test runs in its own directory with its own tokenizer cache and MLflow store."""

from __future__ import annotations

import pytest
import torch

from clipkit.config import compose_config

torch.set_num_threads(2)

# A model and data small enough that a few optimiser steps take well under a second on 2 cores.
TINY = [
    "data.image_size=32", "data.batch_size=16", "data.num_workers=0", "data.corpus_size=500",
    "data.eval_per_class=2", "data.retrieval_size=16",
    "model.image.depth=1", "+model.image.embed_dim=32", "+model.image.num_heads=2",
    "model.text.config.hidden_size=32", "model.text.config.intermediate_size=64",
    "model.text.config.num_hidden_layers=1", "model.text.config.num_attention_heads=2",
    "objective.embed_dim=16", "module.warmup_steps=1", "trainer.enable_model_summary=false",
    "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "callbacks.zeroshot.every_n_steps=2",
]


def random_batch(size: int, length: int = 12, seed: int = 0, dtype=torch.float32, vocab: int = 100) -> dict:
    """A training batch of 32 px noise images and random captions of random lengths (padded with id 0), the same
    for the same arguments in every process."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(length) < torch.randint(3, length + 1, (size, 1), generator=g)).long()
    return {"images": torch.randn(size, 3, 32, 32, generator=g, dtype=dtype),
            "input_ids": torch.randint(3, vocab, (size, length), generator=g) * mask, "attention_mask": mask}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Run in ``tmp_path``: the sqlite store (relative path) and outputs land there, not in the repo."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLIPKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture
def tiny_cfg(tmp_path):
    """Compose the real config (the CLI's path) with the tiny overrides plus any given ones."""
    def make(*overrides: str):
        # absolute store path: MLflow caches one engine per URI string, so a relative one would follow
        # the first test's directory
        synthetic = not any(o.startswith("data=") for o in overrides)
        # only the contrastive objectives have a joint embedding to shrink
        joint = not any(o.startswith("objective=") and "contrastive" not in o for o in overrides)
        tiny = [o for o in TINY if joint or not o.startswith("objective.embed_dim")]
        if any(o.startswith("model/image=resnet") for o in overrides):  # the ViT's sizes
            tiny = [o for o in tiny if not o.lstrip("+").startswith("model.image.")]
        return compose_config([*tiny, *(["data.supersample=1"] if synthetic else []), f"paths.output_dir={tmp_path}/out",
                               f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db", *overrides])
    return make
