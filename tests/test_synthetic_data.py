"""The embedded dataset: deterministic, alt-text-like, held-out pairs really held out, streams split cleanly."""

import numpy as np
import pytest
import torch

from datamodules import scenes
from datamodules.stream import BatchStream


def _sample(seed, split, index, pairs=None):
    rng = scenes.sample_rng(seed, split, index)
    scene = scenes.sample_scene(rng, pairs or scenes.all_pairs())
    return scene, np.asarray(scenes.render(scene, 32)), scenes.caption(scene, rng)


def test_the_training_stream_draws_and_names_every_shape_colour_and_size():
    """At least 6 shapes, 8 colours and 2 sizes reach the data (and its captions), not just the constants."""
    samples = [_sample(0, "train", i) for i in range(400)]
    objects = [o for scene, _, _ in samples for o in scene.objects]
    shapes, colours, sizes = {o.shape for o in objects}, {o.colour for o in objects}, {o.size for o in objects}
    assert len(shapes) >= 6 and len(colours) >= 8 and len(sizes) == 2
    assert shapes == set(scenes.SHAPES) and colours == set(scenes.COLOURS) and sizes == set(scenes.SIZES)
    text = " ".join(caption.lower() for _, _, caption in samples)
    for vocabulary in (scenes.SHAPE_SYNONYMS, scenes.COLOUR_SYNONYMS):
        assert all(any(word in text for word in words) for words in vocabulary.values())


def test_samples_are_a_pure_function_of_seed_split_and_index():
    a, b = _sample(3, "train", 17), _sample(3, "train", 17)
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert _sample(3, "train", 18)[2] != a[2] or not np.array_equal(_sample(3, "train", 18)[1], a[1])
    assert not np.array_equal(_sample(4, "train", 17)[1], a[1])


def test_scenes_have_one_to_three_objects_of_both_sizes_and_captions_vary():
    samples = [_sample(0, "train", i) for i in range(300)]
    counts = {len(s.objects) for s, _, _ in samples}
    assert counts == {1, 2, 3}
    assert {o.size for s, _, _ in samples for o in s.objects} == {"small", "large"}
    captions = [c for _, _, c in samples]
    assert len(set(captions)) > 280  # alt-text, not a template
    assert any(w in " ".join(captions) for w in ("scarlet", "emerald", "hoop", "rhombus"))  # synonyms
    assert any(c.startswith(("a photo of", "image of", "clipart")) for c in captions)  # prefixes
    assert any(" in " in c and "in the" not in c for c in captions)  # varied word order ("circle in red")


def test_caption_names_objects_that_are_drawn():
    scene, image, text = _sample(1, "train", 5)
    drawn = {o.colour for o in scene.objects}
    named = [c for c, syns in scenes.COLOUR_SYNONYMS.items() if any(s in text.lower() for s in syns)]
    assert named and set(named) <= drawn


def test_held_out_pairs_never_appear_in_training(tiny_cfg):
    from hydra.utils import instantiate

    dm = instantiate(tiny_cfg().data)
    held_out = set(dm.novel_pairs)
    assert len(held_out) == 8
    rngs = [scenes.sample_rng(0, "train", i) for i in range(2000)]
    drawn = {(o.colour, o.shape) for rng in rngs for o in scenes.sample_scene(rng, dm.train_pairs).objects}
    assert drawn and not drawn & held_out
    assert dm.source().pairs == dm.train_pairs


def _stream_captions(dm, n, reader=0, readers=1):
    """Captions of the training stream as reader ``reader`` of ``readers`` sees them."""
    stream = BatchStream(dm.source(), 1, lambda im: im, lambda ims, caps: {"captions": caps},
                         shuffle=False, rank=reader, world=readers)
    batches = iter(stream)
    return [next(batches)["captions"][0] for _ in range(n)]


def test_tokenizer_corpus_is_the_training_streams_captions(tiny_cfg):
    from hydra.utils import instantiate

    # a non-default objects_p: a sampling path that forgot it would produce other captions
    dm = instantiate(tiny_cfg("data.objects_p=[0.2,0.3,0.5]").data)
    assert list(dm.train_captions(20)) == _stream_captions(dm, 20)


def test_held_out_sets(tiny_cfg):
    from hydra.utils import instantiate

    dm = instantiate(tiny_cfg().data)
    seen, novel = dm.zeroshot_sets()
    assert len(seen.classnames) >= 48 and seen.prompts["input_ids"].shape[:2] == (len(seen.classnames), len(dm.templates))
    assert seen.images.shape == (2 * len(seen.classnames), 3, 32, 32)
    assert novel.classnames == [f"{c} {s}" for c, s in scenes.all_pairs()]  # scored among all pairs
    assert {novel.classnames[i] for i in novel.labels.tolist()} == {f"{c} {s}" for c, s in dm.novel_pairs}
    (retrieval,) = dm.retrieval_sets()
    assert retrieval.positives.shape == (16, 16) and retrieval.prompts["input_ids"].shape[:2] == (16, 1)


def test_stream_readers_never_repeat_each_other(tiny_cfg):
    """Reader r of n yields samples r, r+n, ...: two readers together equal one."""
    from hydra.utils import instantiate

    dm = instantiate(tiny_cfg().data)
    single = _stream_captions(dm, 8)
    assert _stream_captions(dm, 4, 0, 2) == single[0::2] and _stream_captions(dm, 4, 1, 2) == single[1::2]


def test_stream_images_are_the_rendered_scenes(tiny_cfg):
    """The shared pipeline (decode, resize, crop) leaves a generated image exactly as drawn."""
    from hydra.utils import instantiate
    from torchvision.transforms.v2.functional import pil_to_tensor

    dm = instantiate(tiny_cfg().data)
    batch = next(iter(dm.train_dataloader()))
    scene, _ = scenes.captioned_scene(dm.seed, "train", 3, dm.train_pairs, dm.objects_p)
    drawn = dm.normalize(pil_to_tensor(scenes.render(scene, dm.image_size, dm.supersample)))
    assert torch.equal(batch["images"][3], drawn) and batch["keys"][3] == "synthetic 3"


def test_unknown_holdout_colour_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown colour 'reed'"):
        scenes.check_pairs([("reed", "circle")])


def test_training_batch_has_the_documented_keys(tiny_cfg):
    from hydra.utils import instantiate

    dm = instantiate(tiny_cfg().data)
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (16, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (16, 32)
