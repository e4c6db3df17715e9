"""Stored data (WebDataset shards, CSV, image folders, digits) through the one training pipeline:
split exactly once across workers and ranks, bad samples counted by kind, bad sources refused at start."""

from __future__ import annotations

import csv
from collections import Counter
from functools import partial

import pytest
import torch
from PIL import Image

from callbacks.data_health import DataHealth
from clipkit.errors import DataError
from clipkit.tokenization import train_or_load_bpe
from datamodules.csv_table import CsvDataModule
from datamodules.decode import BadSample, decode_image
from datamodules.digits import DigitsDataModule
from datamodules.transforms import image_transform
from datamodules.webdataset import WebDatasetDataModule
from tests.datafiles import BAD, GOOD, MAX_PIXELS, REPAIRS, image_bytes, write_shard, write_shards


@pytest.fixture
def tokenizer(tmp_path):
    return partial(train_or_load_bpe, vocab_size=128, cache_dir=str(tmp_path / "tok"))


def wds(tokenizer, shards, **options):
    options = {"batch_size": 4, "num_workers": 0, "image_size": 16, "corpus_size": 50, "retrieval_size": 8,
               "max_image_pixels": MAX_PIXELS, "shuffle_buffer": 16, **options}
    return WebDatasetDataModule(shards=str(shards), tokenizer=tokenizer, **options)


def epoch(dm, rank: int, world: int, epoch_number: int = 0) -> list[dict]:
    """All batches one simulated DDP rank reads in one epoch (through real dataloader workers)."""
    dm._rank_world = lambda: (rank, world)
    loader = dm.train_dataloader()
    loader._epochs_started = epoch_number
    return list(loader)


def keys_and_skips(batches: list[dict]) -> tuple[list[str], Counter]:
    keys, skipped = [], Counter()
    for batch in batches:
        keys += batch["keys"]
        skipped.update(batch["data_stats"]["skipped"])
    return keys, skipped


@pytest.mark.parametrize("n_shards", [6, 3], ids=["more shards than readers", "fewer shards than readers"])
def test_every_good_sample_once_per_epoch_across_2_workers_x_2_ranks(tmp_path, tokenizer, n_shards):
    usable, expected_skips = write_shards(tmp_path / "shards", n_shards, good_per_shard=9, repairs=REPAIRS)
    dm = wds(tokenizer, tmp_path / "shards", num_workers=2)
    per_rank = [keys_and_skips(epoch(dm, rank, 2)) for rank in range(2)]
    keys = per_rank[0][0] + per_rank[1][0]
    assert all(per_rank[r][0] for r in range(2))  # no rank starved, even with 3 shards for 4 readers
    assert sorted(keys) == sorted(usable)  # each usable sample exactly once: none lost, none repeated
    assert per_rank[0][1] + per_rank[1][1] == Counter(expected_skips)
    assert set(expected_skips) == set(BAD)  # every bad kind was really exercised


def test_epochs_reshuffle_but_cover_the_same_samples(tmp_path, tokenizer):
    write_shards(tmp_path / "shards", 4, good_per_shard=10, bad={})
    dm = wds(tokenizer, tmp_path / "shards")
    first, second = (keys_and_skips(epoch(dm, 0, 1, e))[0] for e in (0, 1))
    assert sorted(first) == sorted(second) and first != second
    assert keys_and_skips(epoch(dm, 0, 1, 0))[0] == first  # same seed and epoch: same order


def test_samples_per_epoch_gives_every_rank_the_same_full_batches(tmp_path, tokenizer):
    """What DDP needs: equal batch counts even when shards split unevenly (3 shards over 2 ranks)."""
    write_shards(tmp_path / "shards", 3, good_per_shard=10, bad={})
    for resampled in (False, True):
        dm = wds(tokenizer, tmp_path / "shards", num_workers=2, samples_per_epoch=48, resampled=resampled)
        counts = [[len(b["keys"]) for b in epoch(dm, rank, 2)] for rank in range(2)]
        assert counts == [[4] * 6, [4] * 6], (resampled, counts)


def test_ddp_over_a_finite_pass_without_samples_per_epoch_is_refused(tmp_path, tokenizer):
    write_shards(tmp_path / "shards", 2, good_per_shard=4, bad={})
    dm = wds(tokenizer, tmp_path / "shards")
    dm._rank_world = lambda: (0, 2)
    with pytest.raises(DataError, match="set data.samples_per_epoch"):
        dm.setup("fit")


def test_batches_hold_normalised_images_and_tokens(tmp_path, tokenizer):
    write_shards(tmp_path / "shards", 2, good_per_shard=6, bad={}, repairs=REPAIRS)
    batch = epoch(wds(tokenizer, tmp_path / "shards"), 0, 1)[0]
    assert batch["images"].shape == (4, 3, 16, 16) and batch["images"].dtype == torch.float32
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 32)


def test_repairs_give_rgb_images_with_the_right_content():
    for kind, data in REPAIRS.items():
        image, repaired = decode_image(data)
        assert image.mode == "RGB" and repaired == kind
    sixteen, _ = decode_image(REPAIRS["16bit"])  # 40000/65535 of full scale, not clipped to white
    assert sixteen.getpixel((0, 0)) == (156, 156, 156)
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # transparent pixels become white, not black
    assert decode_image(clear)[0].getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("kind", [k for k in BAD if BAD[k][0] is not None and k != "undecodable_caption"
                                  and k not in ("missing_caption", "empty_caption")])
def test_each_bad_image_is_named(kind):
    with pytest.raises(BadSample) as err:
        decode_image(BAD[kind][0], max_pixels=MAX_PIXELS)
    assert err.value.kind == kind


def test_an_all_bad_source_fails_at_start_up(tmp_path, tokenizer):
    write_shard(tmp_path / "bad" / "00000.tar", [(f"k{i}", b"not an image", b"caption") for i in range(5)])
    with pytest.raises(DataError, match=r"all of the first 5 samples are bad \(not_an_image 5\)"):
        wds(tokenizer, tmp_path / "bad")
    write_shard(tmp_path / "empty" / "00000.tar", [])
    with pytest.raises(DataError, match="holds no samples"):
        wds(tokenizer, tmp_path / "empty")


def test_missing_shards_fail_at_start_up(tmp_path, tokenizer):
    write_shards(tmp_path / "shards", 2, good_per_shard=2, bad={})
    with pytest.raises(DataError, match=r"1 of 3 shards do not exist \(first: .*00002.tar\)"):
        wds(tokenizer, f"{tmp_path}/shards/{{00000..00002}}.tar")


def test_a_damaged_shard_is_counted_and_the_stream_goes_on(tmp_path, tokenizer):
    usable, _ = write_shards(tmp_path / "shards", 3, good_per_shard=5, bad={})
    damaged = tmp_path / "shards" / "00001.tar"
    damaged.write_bytes(damaged.read_bytes()[:1500])  # cut mid-member
    keys, skipped = keys_and_skips(epoch(wds(tokenizer, tmp_path / "shards"), 0, 1))
    assert skipped["unreadable_shard"] == 1
    assert {k for k in usable if "00001.tar" not in k} <= set(keys)


def test_skip_ratio_guard_names_the_worst_shards():
    health = DataHealth(max_skip_ratio=0.05, min_samples=100)
    health.update({"samples": 90, "skipped": {"truncated_image": 8, "empty_caption": 2}, "repaired": {},
                   "bad_shards": {"/d/00007.tar": 8, "/d/00001.tar": 2}, "examples": {}})
    with pytest.raises(DataError, match=r"skipped 10 of 100 samples \(10.0%.*worst shards: /d/00007.tar \(8 bad\)"):
        health.check()
    calm = DataHealth(max_skip_ratio=0.2, min_samples=100)
    calm.update({"samples": 90, "skipped": {"truncated_image": 10}, "repaired": {}, "bad_shards": {}, "examples": {}})
    calm.check()  # 10% is under a 20% limit


def test_one_warning_per_kind_not_per_sample(caplog):
    health = DataHealth()
    stats = {"samples": 4, "skipped": {"not_an_image": 3}, "repaired": {"cmyk": 1}, "bad_shards": {"a.tar": 3},
             "examples": {"not_an_image": "a.tar 0007"}}
    for _ in range(5):
        health.update(stats)
    assert len([r for r in caplog.records if "not_an_image" in r.message]) == 1
    assert len([r for r in caplog.records if "cmyk" in r.message]) == 1
    assert health.metrics()["data/skipped/not_an_image"] == 15 and health.metrics()["data/repaired/cmyk"] == 5


def write_csv(path, rows, sep="\t", header=("filepath", "title")):
    with path.open("w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f, delimiter=sep)
        writer.writerow(header)
        writer.writerows(rows)


def test_csv_paths_are_relative_to_the_file_and_bad_rows_are_counted(tmp_path, tokenizer):
    (tmp_path / "imgs").mkdir()
    for i in range(10):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(GOOD)
    (tmp_path / "imgs" / "cut.jpg").write_bytes(BAD["truncated_image"][0])
    rows = [[f"imgs/{i}.png", f"a red box number {i}"] for i in range(10)]
    rows += [["imgs/gone.png", "a file that is not there"], ["imgs/cut.jpg", "a cut-off photo"],
             ["imgs/0.png", "   "], ["imgs/1.png", "caf\udce9"]]  # surrogate: a non-UTF-8 byte in the file
    write_csv(tmp_path / "train.tsv", rows)
    dm = CsvDataModule(path=str(tmp_path / "train.tsv"), tokenizer=tokenizer, batch_size=4, num_workers=0,
                       image_size=16, corpus_size=20, rows_per_shard=5)
    keys, skipped = keys_and_skips(epoch(dm, 0, 1))
    assert len(keys) == 10 and len(set(keys)) == 10
    assert skipped == Counter({"missing_file": 1, "truncated_image": 1, "empty_caption": 1, "undecodable_caption": 1})


def test_csv_column_names_and_separator_are_checked(tmp_path, tokenizer):
    write_csv(tmp_path / "train.csv", [["a.png", "x"]], sep=",", header=("filepath", "titles"))
    with pytest.raises(DataError, match="set data.separator"):
        CsvDataModule(path=str(tmp_path / "train.csv"), tokenizer=tokenizer)
    with pytest.raises(DataError, match="no column 'title' .*did you mean 'titles'"):
        CsvDataModule(path=str(tmp_path / "train.csv"), tokenizer=tokenizer, separator=",")
    with pytest.raises(DataError, match="does not exist"):
        CsvDataModule(path=str(tmp_path / "nope.csv"), tokenizer=tokenizer)


def test_image_folder_is_a_zero_shot_set_with_its_own_names_and_templates(tmp_path, tokenizer):
    root = tmp_path / "val"
    for folder, colour in (("n01_red", (220, 20, 20)), ("n02_blue", (20, 20, 220))):
        (root / folder).mkdir(parents=True)
        for i in range(3):
            (root / folder / f"{i}.png").write_bytes(image_bytes(colour, size=(30, 20)))
    (root / "n02_blue" / "broken.jpg").write_bytes(b"\xff\xd8 garbage")
    (root / "classnames.txt").write_text("red thing\nblue thing\n")
    (root / "templates.txt").write_text("a photo of a {}.\na {}.\n")
    write_shards(tmp_path / "shards", 1, good_per_shard=4, bad={})
    dm = wds(tokenizer, tmp_path / "shards", eval_folders=[str(root)])
    (zs,) = dm.zeroshot_sets()
    assert zs.name == "val" and zs.classnames == ["red thing", "blue thing"]
    assert zs.labels.tolist() == [0, 0, 0, 1, 1, 1] and zs.images.shape == (6, 3, 16, 16)  # broken file skipped
    assert zs.prompts["input_ids"].shape[:2] == (2, 2)
    (root / "templates.txt").write_text("no placeholder\n")
    with pytest.raises(DataError, match="templates.txt"):
        wds(tokenizer, tmp_path / "shards", eval_folders=[str(root)]).zeroshot_sets()


def test_retrieval_shards_give_a_held_out_retrieval_set(tmp_path, tokenizer):
    write_shards(tmp_path / "train", 1, good_per_shard=6, bad={})
    write_shards(tmp_path / "held", 1, good_per_shard=12, bad={"empty_caption": BAD["empty_caption"]})
    dm = wds(tokenizer, tmp_path / "train", retrieval_shards=str(tmp_path / "held"))
    (rs,) = dm.retrieval_sets()
    assert rs.images.shape[0] == 8 and rs.positives.equal(torch.eye(8, dtype=torch.bool))


def test_transforms_are_resize_then_random_or_centre_square_crop():
    wide = Image.new("RGB", (64, 32))
    wide.paste((255, 0, 0), (0, 0, 16, 32))  # a red band on the left
    train, evaluate = image_transform(16, train=True), image_transform(16, train=False)
    crops = {bool(train(wide)[0, 0, 0] > 200) for _ in range(40)}
    assert train(wide).shape == (3, 16, 16) and crops == {True, False}  # the crop really moves
    assert evaluate(wide).shape == (3, 16, 16) and evaluate(wide)[0, 0, 0] < 50  # centre: no red band


def test_digits_are_real_scans_with_a_disjoint_stratified_zero_shot_split(tokenizer):
    dm = DigitsDataModule(tokenizer=tokenizer, batch_size=32, num_workers=0, image_size=16, corpus_size=2000)
    (zs,) = dm.zeroshot_sets()
    assert zs.classnames[:3] == ["zero", "one", "two"] and len(zs.classnames) == 10
    assert torch.bincount(zs.labels).min() >= 30  # ~20% of each class
    train_ids = {int(r.key) for r in dm.source().records("digits")}
    assert not train_ids & set(dm.held_out.nonzero()[0].tolist()) and len(train_ids) + len(zs.labels) == 1797
    batch = epoch(dm, 0, 1)[0]
    assert batch["images"].shape == (32, 3, 16, 16) and batch["data_stats"]["repaired"] == {}
    record = next(dm.source().records("digits"))
    assert any(w in record.caption for w in ("zero", "one", "two", "three", "four", "five", "six", "seven",
                                             "eight", "nine")) or any(c.isdigit() for c in record.caption)


def test_a_reader_with_an_empty_share_fails_in_one_line_instead_of_spinning(tmp_path, tokenizer):
    from clipkit.commands.fit import _one_line

    write_shards(tmp_path / "shards", 1, good_per_shard=8, bad={})
    write_shard(tmp_path / "shards" / "00001.tar", [])
    dm = wds(tokenizer, tmp_path / "shards", num_workers=2, samples_per_epoch=32, shuffle=False)
    with pytest.raises(DataError) as err:
        epoch(dm, 0, 1)
    assert _one_line(err.value) == "reader 1 of 2 has no samples in its share of the shards"


def listing(records, replay=None, flip_after: int | None = None) -> list:
    """A shard's records with their payloads read, and the damage that ended it; ``replay`` is switched off after
    ``flip_after`` records (the resumed reader reaching its position mid-shard)."""
    out = []
    try:
        for i, record in enumerate(records):
            if replay is not None and i == flip_after:
                replay.on = False
            out.append((record.key, *(p() if callable(p) else p for p in (record.image, record.caption))))
    except BadSample as bad:
        out.append(bad.kind)
    return out


@pytest.mark.parametrize("cut", [None, 1500, 2048, 2100, 2560, 4000])
def test_the_header_only_replay_reads_a_shard_as_the_streaming_reader_does(tmp_path, cut):
    """Keys, payloads and where damage ends the shard are the same, whatever the tar holds: pax headers (long
    names), directories, other members, a shard cut mid-payload, mid-header or at a block boundary."""
    import tarfile

    from datamodules.stream import Replay
    from datamodules.webdataset import ShardSource

    shard = tmp_path / "00000.tar"
    write_shards(tmp_path / "plain", 1, good_per_shard=4, bad={"missing_caption": BAD["missing_caption"]})
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar, tarfile.open(tmp_path / "plain/00000.tar") as src:
        directory = tarfile.TarInfo("d" * 120 + "/")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for i, member in enumerate(src):
            if i == 4:  # a name only a pax header can hold
                member.name = "x" * 150 + "/" + member.name
            member.mtime = 1.5 if i == 1 else member.mtime  # a pax mtime, as webdataset's writer adds to every member
            member.pax_headers = {"LIBARCHIVE.creationtime": "1"} if i == 2 else {}  # left to tarfile
            tar.addfile(member, src.extractfile(member))
    if cut is not None:
        shard.write_bytes(shard.read_bytes()[:cut])
    source = ShardSource(str(shard))
    streamed = listing(source.records(str(shard)))
    assert listing(source.lazy_records(str(shard), None, Replay(on=True))) == streamed
    for flip in range(len(streamed)):
        replay = Replay(on=True)
        assert listing(source.lazy_records(str(shard), None, replay), replay, flip) == streamed
    if cut is None:
        assert len(streamed) == 6 and streamed[0][1] == GOOD and any(r[0].startswith("x" * 150) for r in streamed)
    else:
        assert streamed[-1] == "unreadable_shard"
