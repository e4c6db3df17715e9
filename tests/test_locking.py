"""Locked-tower tuning (LiT): a locked tower trains only its last ``unlocked_layers`` blocks and what follows them;
the rest keeps its weights, its batch-norm statistics and no optimiser state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig

from clipkit.models import ImageTower, TextTower
from tests.conftest import TINY, random_batch

VIT = {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 32, "num_heads": 2,
       "global_pool": "avg", "class_token": False}


def trainable(module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def text_tower(**kwargs) -> TextTower:
    config = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2)
    return TextTower(config, **kwargs)


def test_an_image_tower_unlocks_its_last_blocks_and_the_final_norm():
    tower = ImageTower(**VIT, locked=True, unlocked_layers=1)
    assert {n.split(".")[1] for n in trainable(tower)} == {"blocks", "fc_norm"}
    assert all(n.startswith(("model.blocks.2.", "model.fc_norm.")) for n in trainable(tower))
    assert trainable(ImageTower(**VIT, locked=True)) == set()
    assert len(trainable(ImageTower(**VIT))) == len(list(ImageTower(**VIT).parameters()))


def test_a_text_tower_unlocks_its_last_layers_and_the_final_norm():
    tower = text_tower(locked=True, unlocked_layers=2)
    layers = {n.split(".")[3] for n in trainable(tower) if ".layers." in n}
    assert layers == {"1", "2"}
    assert {n for n in trainable(tower) if ".layers." not in n} == {"model.final_layer_norm.weight",
                                                                     "model.final_layer_norm.bias"}


def test_more_unlocked_layers_than_blocks_is_refused():
    with pytest.raises(ValueError, match="unlocked_layers=4, but this tower has 3 blocks: choose 0 .all locked. to 3"):
        text_tower(locked=True, unlocked_layers=4)


def test_a_locked_part_stays_in_eval_mode_while_training():
    """Dropout off and batch-norm statistics frozen in the locked part, whatever Lightning's train() does."""
    tower = text_tower(locked=True, unlocked_layers=1).train()
    layers = tower.model.encoder.layers
    assert not layers[0].training and not tower.model.embeddings.training
    assert layers[2].training and tower.model.final_layer_norm.training


def test_locked_training_leaves_the_locked_weights_and_norm_statistics_alone(tmp_path):
    """A CLIP ResNet (batch norm) locked but for its last block, the text tower locked whole: between the first and
    the third step, the locked weights and running statistics stay as they were, the unlocked ones move, and the
    optimiser holds state for trainable parameters only."""
    from clipkit.config import compose_config
    from clipkit.train import fit

    tiny = [o for o in TINY if not o.lstrip("+").startswith("model.image.")]  # the ViT's sizes
    cfg = compose_config([*tiny, "data.supersample=1", f"paths.output_dir={tmp_path}/out",
                          f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "model/image=resnet_clip_tiny",
                          "model.image.locked=true", "model.image.unlocked_layers=1", "model.text.locked=true",
                          "trainer.max_steps=3", "callbacks.zeroshot.every_n_steps=0",
                          "callbacks.checkpoint.every_n_train_steps=1", "callbacks.checkpoint.save_top_k=-1"])
    result = fit(cfg)
    folder = Path(result.checkpoint).parent
    first, last = (torch.load(folder / f"step000000{s}.ckpt", weights_only=True) for s in (1, 3))
    before, after = first["state_dict"], last["state_dict"]

    def part(name: str) -> str:
        if name.startswith(("objective.image_tower.model.stages.3.", "objective.image_tower.model.head.")):
            return "unlocked"
        return "locked" if name.startswith(("objective.image_tower.", "objective.text_tower.")) else "other"

    locked = [n for n in before if part(n) == "locked"]
    assert any("running_var" in n for n in locked) and any("text_tower" in n for n in locked)
    for name in locked:
        assert torch.equal(after[name], before[name]), name
    unlocked_weights = [n for n in before if part(n) == "unlocked" and n.endswith("conv.weight")]
    assert unlocked_weights and all(not torch.equal(after[n], before[n]) for n in unlocked_weights)
    parameters = [n for n in before if part(n) != "locked" and n.startswith("objective.") and "running_" not in n
                  and "num_batches" not in n]
    assert len(last["optimizer_states"][0]["state"]) == len(parameters)  # none for frozen parameters


def test_a_locked_tower_gives_the_same_features_in_train_and_eval_mode():
    tower = ImageTower(**VIT, locked=True, drop_path_rate=0.5)
    images = random_batch(4)["images"]
    assert torch.equal(tower.train()(images), tower.eval()(images))
