"""``resume=auto|PATH``: a resumed run ends exactly where the uninterrupted one does, and a resume that cannot be
exact is refused in one line before anything trains. (The SIGKILL test is in test_resume_kill.py.)"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from functools import partial
from pathlib import Path

import mlflow
import pytest
import torch
from omegaconf import OmegaConf

from clipkit.cli import main
from clipkit.errors import DataError, ResumeError
from clipkit.resume import config_differences, locate
from clipkit.tokenization import train_or_load_bpe
from clipkit.train import fit
from datamodules.stream import StreamPosition
from datamodules.webdataset import WebDatasetDataModule
from tests.conftest import TINY
from tests.datafiles import MAX_PIXELS, REPAIRS, write_shards

CHECKPOINTS = ["trainer.max_steps=8", "callbacks.checkpoint.every_n_train_steps=2",
               "callbacks.checkpoint.save_top_k=-1"]
RANDOM = ["+model.image.drop_path_rate=0.2", "+model.text.config.attention_dropout=0.2"]  # the generators matter


def weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


# -- the data position ------------------------------------------------------------------------------------------
def batches(dm, resume: dict | None = None) -> list[dict]:
    dm.resume_position = resume
    return list(dm.train_dataloader())


@pytest.mark.parametrize("workers,indexed", [(0, False), (2, False), (0, True), (2, True)])
def test_a_resumed_epoch_yields_exactly_the_batches_it_had_left_in_the_same_order(tmp_path, workers, indexed):
    """Shuffled shards with bad samples: the replay must skip what the bad samples took, not only good ones; from
    tar headers, or from the shard indexes the first pass left (``index_dir``)."""
    write_shards(tmp_path / "shards", 3, good_per_shard=11, repairs=REPAIRS)
    dm = WebDatasetDataModule(shards=str(tmp_path / "shards"), batch_size=4, num_workers=workers, image_size=16,
                              corpus_size=50, retrieval_size=8, max_image_pixels=MAX_PIXELS, shuffle_buffer=8,
                              tokenizer=partial(train_or_load_bpe, vocab_size=128, cache_dir=str(tmp_path / "tok")),
                              index_dir=str(tmp_path / "index") if indexed else None)
    full = batches(dm)
    assert len(list((tmp_path / "index").glob("*.npz"))) == (3 if indexed else 0)
    assert len(full) >= 8
    for cut in (1, 3, len(full) - 1):
        position = StreamPosition(workers or 1, 1)
        for batch in full[:cut]:
            position.trained(batch["position"])
        rest = batches(dm, StreamPosition.merge([position.state()]))
        assert [b["keys"] for b in rest] == [b["keys"] for b in full[cut:]]
        for a, b in zip(rest, full[cut:], strict=True):
            assert torch.equal(a["images"], b["images"]) and torch.equal(a["input_ids"], b["input_ids"])
        # every bad sample is counted once over the two halves: none again, none lost
        halves = [Counter(), Counter()]
        for i, batch in enumerate(full[:cut] + rest):
            halves[i >= cut].update(batch["data_stats"]["skipped"])
        assert halves[0] + halves[1] == sum((Counter(b["data_stats"]["skipped"]) for b in full), Counter())


def test_a_data_position_for_other_workers_is_refused(tmp_path, tiny_cfg):
    from hydra.utils import instantiate

    dm = instantiate(tiny_cfg("data.num_workers=0").data)
    dm.resume_position = {"epoch": 0, "workers": 2, "world": 1, "readers": {0: {"records": 4, "batches": 1, "step": 1}}}
    with pytest.raises(DataError, match="resume with the same trainer.devices and data.num_workers"):
        next(iter(dm.train_dataloader()))


# -- whole runs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers,precision", [(0, "32-true"), (2, "32-true"), (0, "64-true")])
def test_resuming_from_a_mid_run_checkpoint_ends_bitwise_where_the_uninterrupted_run_does(tiny_cfg, workers, precision):
    """Model, AdamW moments, the warm-up + cosine schedule, the temperature, the generators (stochastic depth,
    dropout, the random crops) and the position of each dataloader worker all come back: with two workers, a data
    position off by one batch or a round robin restarted at worker 0 changes every weight. In float64, Lightning
    would load the weights into the float32 model before converting it, rounding them."""
    run = [*CHECKPOINTS, *RANDOM, f"data.num_workers={workers}", f"precision={precision}"]
    full = fit(tiny_cfg(*run))
    expected = weights(full.checkpoint)
    middle = Path(full.checkpoint).parent / "step0000004.ckpt"
    resumed = fit(tiny_cfg(*run, f"resume={middle}"))
    assert resumed.run_id == full.run_id and resumed.images_seen == full.images_seen == 8 * 16
    assert_bitwise_equal(weights(resumed.checkpoint), expected)


def test_auto_resume_skips_damaged_checkpoints_and_falls_back_to_the_previous_one(tiny_cfg):
    full = fit(tiny_cfg(*CHECKPOINTS))
    folder = Path(full.checkpoint).parent
    expected = weights(full.checkpoint)
    previous = folder / "step0000006.ckpt"
    for path in folder.glob("*.ckpt"):  # everything written after step 6 is cut off mid-write
        if path.stat().st_mtime > previous.stat().st_mtime:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    found, _ = locate("auto", folder, [], [])
    assert found == previous
    resumed = fit(tiny_cfg(*CHECKPOINTS, "resume=auto"))  # the same output folder: its own checkpoints
    assert_bitwise_equal(weights(resumed.checkpoint), expected)
    # this session trained steps 7 and 8: its rate is of those images, not of the 96 seen before the resume
    assert resumed.images_seen == 8 * 16
    assert resumed.train_images_per_second * resumed.train_seconds == pytest.approx(2 * 16)


def test_auto_resume_finds_the_newest_checkpoint_of_an_earlier_run_of_the_same_command(tmp_path):
    runs = tmp_path / "outputs"
    for name, overrides in [("2026-01-01/10-00-00", ["seed=1"]), ("2026-01-02/10-00-00", ["seed=2"]),
                            ("2026-01-03/10-00-00", ["seed=1", "resume=auto"])]:  # a resumed run: no checkpoints
        (runs / name / ".hydra").mkdir(parents=True)
        (runs / name / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (runs / "2026-01-01/10-00-00/checkpoints").mkdir()
    torch.save({"global_step": 3}, runs / "2026-01-01/10-00-00/checkpoints/last.ckpt")
    found = locate("auto", tmp_path / "new/checkpoints", ["resume=auto", "seed=1"], [runs])
    assert found[0] == runs / "2026-01-01/10-00-00/checkpoints/last.ckpt" and found[1]["global_step"] == 3
    assert locate("auto", tmp_path / "new/checkpoints", ["seed=3"], [runs]) is None  # nothing to resume: a new run


# -- resumes that cannot be exact: one line, before anything trains -------------------------------------------
def only_run_status(tracking_uri: str) -> list[str]:
    client = mlflow.MlflowClient(tracking_uri)
    return [r.info.status for r in client.search_runs([e.experiment_id for e in client.search_experiments()])]


def test_resuming_with_other_settings_names_them(tiny_cfg):
    full = fit(tiny_cfg(*CHECKPOINTS))
    with pytest.raises(ResumeError, match=r"other settings \(model.image.depth: 1 -> 2\): a resumed run continues"):
        fit(tiny_cfg(*CHECKPOINTS, "model.image.depth=2", f"resume={full.checkpoint}"))
    assert only_run_status(full.tracking_uri) == ["FINISHED"]


def test_only_file_locations_may_differ_on_resume(tiny_cfg, tmp_path):
    a = tiny_cfg("trainer.max_steps=8")
    b = tiny_cfg("trainer.max_steps=8", f"paths.output_dir={tmp_path}/elsewhere", f"paths.cache_dir={tmp_path}/c2",
                 "resume=auto")
    assert config_differences(a, b) == []
    assert config_differences(a, tiny_cfg("trainer.max_steps=9")) == ["trainer.max_steps: 8 -> 9"]


def stored(cfg):
    """The config a checkpoint holds: resolved (``RunRecord.config_yaml``)."""
    return OmegaConf.create(OmegaConf.to_yaml(cfg, resolve=True))


@pytest.mark.parametrize("then,change", [
    ("trainer.precision=bf16-mixed", "trainer.precision: bf16-mixed -> 32-true"),  # now ${precision}
    ("data.seed=7", "data.seed: 7 -> 0"),  # now ${seed}
    ("module.accumulate=2", "module.accumulate: 2 -> 1"),  # now ${accumulate}
])
def test_a_literal_that_is_an_interpolation_now_is_compared_by_its_value(tiny_cfg, then, change):
    """Set by an override in the original run, the literal sits where the current config interpolates: resuming
    without the override would silently change precision, the data seed or the model."""
    assert config_differences(stored(tiny_cfg(then)), tiny_cfg()) == [change]


def test_a_changed_source_is_named_once_not_at_every_key_that_interpolates_it(tiny_cfg, tmp_path):
    now = tiny_cfg("precision=bf16-mixed", "model.image.depth=2", f"paths.output_dir={tmp_path}/elsewhere")
    assert config_differences(stored(tiny_cfg()), now) == ["model.image.depth: 1 -> 2",
                                                           "precision: 32-true -> bf16-mixed"]


def test_folders_read_from_this_machine_may_differ_but_a_literal_beside_them_may_not(monkeypatch):
    """A pretrained model's folder (``${minilm_dir:}``, ``${oc.env:...}``) and what interpolates it are where files
    are on this machine, as ``paths.*`` are."""
    monkeypatch.setenv("MODELS", "/new/models")
    now = OmegaConf.create({"precision": "32-true", "trainer": {"precision": "${precision}"},
                            "model": {"pretrained": "${oc.env:MODELS}"}, "data": {"tokenizer": "${model.pretrained}"}})
    then = {"precision": "32-true", "trainer": {"precision": "bf16-mixed"}, "model": {"pretrained": "/old/models"},
            "data": {"tokenizer": "/old/models"}}
    assert config_differences(OmegaConf.create(then), now) == ["trainer.precision: bf16-mixed -> 32-true"]


def test_the_tokenizer_check_ignores_the_padding_a_call_leaves_on_it(tmp_path):
    """Tokenizing prompts with padding= and truncation= sets them on the backend: a checkpoint written after such
    a call must still resume with the same tokenizer built afresh, and a different tokenizer must still be refused."""
    from clipkit.resume import check_tokenizer
    from clipkit.tokenization import tokenize, tokenizer_json

    def bpe(captions, folder):
        return train_or_load_bpe(captions=iter(captions * 50), context_length=32, vocab_size=64,
                                 cache_dir=str(tmp_path / folder))

    used = bpe(["a red circle", "a blue square"], "a")
    tokenize(used, ["a red circle"], 32)
    stored = tokenizer_json(used)
    check_tokenizer(stored, bpe(["a red circle", "a blue square"], "b"), tmp_path / "x.ckpt")  # no error
    check_tokenizer(used.backend_tokenizer.to_str(), bpe(["a red circle", "a blue square"], "c"), tmp_path / "x.ckpt")
    with pytest.raises(ResumeError, match="the tokenizer built from the training captions"):
        check_tokenizer(stored, bpe(["a green star", "a pink ring"], "d"), tmp_path / "x.ckpt")


def test_a_tokenizer_that_is_not_the_checkpoints_is_refused_in_one_line(tiny_cfg, tmp_path):
    """The data under the same path changed since the checkpoint: its token ids would mean other words."""
    run = [*TINY, "data.supersample=1", f"paths.output_dir={tmp_path}/out",
           f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db", *CHECKPOINTS]  # what tiny_cfg composes
    full = fit(tiny_cfg(*CHECKPOINTS))
    ckpt = torch.load(full.checkpoint, weights_only=True)
    other = train_or_load_bpe(captions=iter(["a red circle", "a blue square"] * 50), context_length=32,
                              vocab_size=64, cache_dir=str(tmp_path / "other"))
    ckpt["clipkit"]["tokenizer"] = other.backend_tokenizer.to_str()
    torch.save(ckpt, tmp_path / "changed.ckpt")
    with pytest.raises(ResumeError) as err:
        fit(tiny_cfg(*CHECKPOINTS, f"resume={tmp_path / 'changed.ckpt'}"))
    assert str(err.value).startswith("the tokenizer built from the training captions (") and "\n" not in str(err.value)
    assert "resume with the data it was trained on, or start a new run" in str(err.value)
    cli = subprocess.run([sys.executable, "-m", "clipkit", "fit", *run, f"resume={tmp_path / 'changed.ckpt'}"],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 1 and cli.stderr.strip().splitlines()[-1] == f"clipkit: error: {err.value}"
    assert only_run_status(full.tracking_uri) == ["FINISHED"]  # no run left RUNNING


def test_a_run_whose_mlflow_store_is_elsewhere_is_refused(tiny_cfg, tmp_path):
    full = fit(tiny_cfg(*CHECKPOINTS))
    with pytest.raises(ResumeError, match=f"logged to MLflow run {full.run_id}, which is not in sqlite:///"):
        fit(tiny_cfg(*CHECKPOINTS, f"resume={full.checkpoint}", f"logger.tracking_uri=sqlite:///{tmp_path}/other.db"))


def test_an_explicitly_named_damaged_checkpoint_is_refused(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(ResumeError, match=f"checkpoint {path} is damaged: resume={tmp_path} takes the newest"):
        locate(str(path), tmp_path, [], [])


class Payload:
    """Stands for any object whose unpickling would run code."""


def test_a_checkpoint_that_would_unpickle_code_is_refused_not_skipped(tmp_path):
    torch.save({"global_step": 1}, tmp_path / "step0000001.ckpt")
    torch.save({"global_step": 2, "extra": Payload()}, tmp_path / "last.ckpt")
    with pytest.raises(ResumeError, match=r"refusing to load \S*last.ckpt: it holds pickled Python objects"):
        locate("auto", tmp_path, [], [])


def test_cli_refuses_a_missing_checkpoint_in_one_line(capsys, tmp_path):
    assert main(["fit", f"resume={tmp_path}/nothing.ckpt"]) == 2
    err = capsys.readouterr().err
    assert err == f"clipkit: error: resume={tmp_path}/nothing.ckpt: no such checkpoint or run folder (resume=auto " \
                  "finds the newest checkpoint of an earlier run of the same command)\n"


@pytest.mark.parametrize("override,error", [
    ("model.image.name=vit_tiy_patch16_224", "unknown image backbone 'vit_tiy_patch16_224'"),
    ("data.image_size=50", "image size 50 is not a multiple of the patch size"),
    ("data=webdataset", "shards do not exist"),
])
def test_a_config_mistake_found_at_start_up_leaves_no_mlflow_run(tiny_cfg, override, error):
    extra = ["model/image=vit_tiny"] if "image_size" in override else []
    extra += ["data.shards='/nowhere/{0..1}.tar'"] if override == "data=webdataset" else []
    with pytest.raises(Exception, match=error):
        fit(tiny_cfg(*extra, override))
    assert only_run_status(tiny_cfg().logger.tracking_uri) == []


def test_a_crash_right_after_a_checkpoint_loses_no_metric_step(tiny_cfg, monkeypatch):
    """Lightning logs a step's metrics after the batch-end hooks that save: the save sends them first."""
    from clipkit.module import ClipKitModule

    def power_cut(self, outputs, batch, batch_idx):
        if self.trainer.global_step == 4 and not getattr(self, "resumed", False):
            raise RuntimeError("power cut")

    monkeypatch.setattr(ClipKitModule, "on_train_batch_end", power_cut, raising=False)
    with pytest.raises(RuntimeError, match="power cut"):
        fit(tiny_cfg(*CHECKPOINTS))
    uri = tiny_cfg().logger.tracking_uri
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("clipkit").experiment_id])
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [16, 32, 48, 64]

    monkeypatch.setattr(ClipKitModule, "resumed", True, raising=False)
    resumed = fit(tiny_cfg(*CHECKPOINTS, "resume=auto"))
    assert resumed.run_id == run.info.run_id
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [16 * s for s in range(1, 9)]


@pytest.mark.parametrize("indexed", [False, True])
def test_a_resumed_reader_reads_no_payload_of_the_records_it_replays(tmp_path, monkeypatch, indexed):
    """At web scale a reader is millions of records deep: its replay reads tar headers only (or, for the shards
    the first pass read whole, their indexes), and the payloads of just the records it still yields (those the
    shuffle buffer held at the position, and after)."""
    import tarfile

    import datamodules.webdataset as wds

    write_shards(tmp_path / "shards", 3, good_per_shard=11, bad={})
    offsets = {}  # (shard, payload offset) -> key
    for shard in (tmp_path / "shards").glob("*.tar"):
        with tarfile.open(shard) as tar:
            offsets.update({(str(shard), m.offset_data): m.name.split(".")[0] for m in tar})
    dm = WebDatasetDataModule(shards=str(tmp_path / "shards"), batch_size=4, num_workers=0, image_size=16,
                              corpus_size=50, retrieval_size=8, shuffle_buffer=8,
                              tokenizer=partial(train_or_load_bpe, vocab_size=128, cache_dir=str(tmp_path / "tok")),
                              index_dir=str(tmp_path / "index") if indexed else None)
    full = batches(dm)
    read = set()
    members, payload = wds.tar_members, wds.read_payload

    def counted_members(stream, shard, seen=None):
        for member in members(stream, shard, seen):
            read.add(member["fname"].split(".")[0])
            yield member

    def counted_payload(shard, offset, size):
        read.add(offsets[(shard, offset)])
        return payload(shard, offset, size)

    monkeypatch.setattr(wds, "tar_members", counted_members)
    monkeypatch.setattr(wds, "read_payload", counted_payload)
    if indexed:  # every shard was read whole, so none has its headers read again
        monkeypatch.setattr(wds, "tar_entries", lambda *_: pytest.fail("an indexed shard's headers were read"))
    position = StreamPosition(1, 1)
    for batch in full[:6]:  # 24 of 33 records: deep in the last shard, so most are replayed
        position.trained(batch["position"])
    rest = batches(dm, StreamPosition.merge([position.state()]))
    assert [b["keys"] for b in rest] == [b["keys"] for b in full[6:]]
    yielded = {key.split(" ")[1] for b in rest for key in b["keys"]}
    assert read == yielded, f"payloads read of {len(read - yielded)} replayed records"
