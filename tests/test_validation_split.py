"""Model selection never sees a reported image: every datamodule's validation sets are disjoint from its test sets
(the scenes' own ``val`` split, digits' and eval folders' ``val_fraction``), and the split is checked up front."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from clipkit.config import compose_config
from clipkit.errors import UsageError
from tests.datafiles import image_bytes, write_shards
from tests.test_data_sources import wds


def rows(images: torch.Tensor) -> set[bytes]:
    """Each image as bytes, to compare sets of images exactly."""
    return {image.numpy().tobytes() for image in images}


def test_scene_validation_is_the_test_task_on_images_no_test_set_holds(tiny_cfg):
    dm = instantiate(tiny_cfg().data)
    (val,) = dm.validation_sets()
    test = next(s for s in dm.zeroshot_sets() if s.name == "scenes")
    assert val.classnames == test.classnames and len(val.images) == len(test.images)
    reported = set().union(*(rows(s.images) for s in dm.zeroshot_sets()))
    assert len(rows(val.images)) == len(val.images) and not rows(val.images) & reported


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_digits_validation_and_test_split_the_held_out_scans(tiny_cfg, fraction):
    dm = instantiate(tiny_cfg("data=digits", f"data.val_fraction={fraction}").data)
    (val,), (test,) = dm.validation_sets(), dm.zeroshot_sets()
    held = int(dm.held_out.sum())
    assert len(val.images) + len(test.images) == held  # nothing lost, nothing shared
    assert abs(len(val.images) - fraction * held) <= 10  # per class, rounded
    assert set(val.labels.tolist()) == set(test.labels.tolist()) == set(range(10))
    assert not rows(val.images) & rows(test.images)
    assert dm.probe_sets()[0].test_images.shape == test.images.shape  # the probe reports on the test part too


def test_an_eval_folder_keeps_val_fraction_of_each_class_for_validation(tmp_path):
    from functools import partial

    from clipkit.tokenization import train_or_load_bpe

    tokenizer = partial(train_or_load_bpe, vocab_size=128, cache_dir=str(tmp_path / "tok"))
    root = tmp_path / "folder"
    for name, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        (root / name).mkdir(parents=True)
        for i in range(8):  # distinct images: the shade varies with i
            (root / name / f"{i}.png").write_bytes(image_bytes(tuple(c + 3 * i for c in colour)))
    write_shards(tmp_path / "shards", 1, good_per_shard=4, bad={})
    whole, = wds(tokenizer, tmp_path / "shards", eval_folders=[str(root)]).zeroshot_sets()
    dm = wds(tokenizer, tmp_path / "shards", eval_folders=[str(root)], val_fraction=0.25)
    (val,), (test,) = dm.validation_sets(), dm.zeroshot_sets()
    assert val.labels.tolist().count(0) == val.labels.tolist().count(1) == 2  # a quarter of each class
    assert len(test.images) == 12 and not rows(val.images) & rows(test.images)
    assert rows(val.images) | rows(test.images) == rows(whole.images)
    assert wds(tokenizer, tmp_path / "shards", eval_folders=[str(root)]).validation_sets() == []  # default 0


@pytest.mark.parametrize("value", ["1.0", "-0.1", "word"])
def test_a_val_fraction_outside_0_to_1_is_refused_in_one_line(value):
    with pytest.raises(UsageError, match=r"data.val_fraction=") as err:
        compose_config([f"data.val_fraction={value}"])
    assert "\n" not in str(err.value)
