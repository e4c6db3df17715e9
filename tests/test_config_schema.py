"""Every value a user types is checked before anything is built: types while Hydra composes, ranges right after
(clipkit/schema.py), each refusal one line naming the key, the value and what is allowed."""

import copy
import faulthandler
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from clipkit.cli import main
from clipkit.config import compose_config
from clipkit.errors import UsageError
from clipkit.schema import check_config, leaves, type_error

ROOT = Path(__file__).resolve().parent.parent
PRESETS = [None, *sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))]  # None: the default run
VALUES = (0, -1, "word")


@cache
def preset_config(preset):
    return compose_config([f"experiments={preset}"] if preset else [])


def numeric_keys(cfg) -> list[str]:
    """Dotted keys of every number in the composed config (interpolations included, resolved)."""
    out = []
    for key, parent, name in leaves(cfg):
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(key)
    return out


def answer(cfg, key: str, value) -> str | None:
    """What ``compose_config([..., f"{key}={value}"])`` answers, computed on a composed ``cfg`` (composing ~1,500
    times would take minutes): the value applied as Hydra applies a command-line override (``OmegaConf.update``,
    where the schema's types refuse a word), then the same range checks. None: accepted; else the one line.
    :func:`test_the_walk_answers_as_compose_config_does` checks the two agree."""
    path, _, name = key.rpartition(".")
    before = (OmegaConf.select(cfg, path) if path else cfg)._get_node(name)._value()  # restored after
    try:
        OmegaConf.update(cfg, key, value, merge=True)
    except OmegaConfBaseException as err:
        return type_error(err) or f"untranslated: {err}"
    try:
        check_config(cfg)
    except UsageError as err:
        return str(err)
    finally:
        OmegaConf.update(cfg, key, before, merge=True)
    return None


@cache
def walk() -> dict:
    """{(preset, key, value): None (accepted) or the one-line refusal} over every numeric key of every preset."""
    out = {}
    for preset in PRESETS:
        cfg = copy.deepcopy(preset_config(preset))
        for key in numeric_keys(cfg):
            for value in VALUES:
                out[preset, key, value] = answer(cfg, key, value)
    return out


def accepted_cases() -> list[tuple[str, object]]:
    """(key, value) accepted in some preset where the preset has another value (its own value runs in every preset
    run): the cases the slow test trains with."""
    cases = set()
    for (preset, key, value), refusal in walk().items():
        if refusal is None and OmegaConf.select(preset_config(preset), key) != value:
            cases.add((key, value))
    return sorted(cases, key=str)


def test_every_numeric_key_of_every_preset_is_refused_in_one_line_or_accepted():
    """0, -1 and a word in every numeric key of every preset: a refusal is one line that starts with the key and the
    value and says what is allowed; a word is never accepted where a number goes."""
    answers = walk()
    assert len({key for _, key, _ in answers}) > 40  # the walk found the keys (sizes, steps, rates, callbacks ...)
    for (preset, key, value), refusal in answers.items():
        if refusal is None:
            assert value != "word", (preset, key)
            continue
        assert "\n" not in refusal and "must be" in refusal, (preset, key, value, refusal)
        named, _, shown = refusal.split(": ")[0].partition("=")
        assert named == key and (shown == str(value) or float(shown) == value), (preset, key, value, refusal)


def test_sizes_steps_and_rates_refuse_zero_and_negatives():
    answers = walk()
    for key in ("data.batch_size", "data.image_size", "trainer.max_steps", "module.optimizer.lr", "accumulate",
                "module.accumulate", "objective.embed_dim", "model.image.depth", "model.text.config.hidden_size",
                "trainer.log_every_n_steps", "data.context_length", "module.max_nonfinite_steps"):
        for value in (0, -1):
            assert answers[None, key, value] is not None, (key, value)
    assert answers[None, "data.batch_size", -1] == "data.batch_size=-1: must be an integer >= 1"
    assert answers[None, "module.optimizer.lr", 0] == "module.optimizer.lr=0.0: must be a number > 0"
    assert answers[None, "callbacks.data_health.max_skip_ratio", -1] == (
        "callbacks.data_health.max_skip_ratio=-1.0: must be a number in [0, 1]")
    assert answers["caption_lm", "objective.score_batch", 0] == "objective.score_batch=0: must be an integer >= 1"


@pytest.mark.parametrize("override,message", [
    ("data.batch_size=-4", "data.batch_size=-4: must be an integer >= 1"),
    ("data.batch_size=many", "data.batch_size=many: must be an integer"),
    ("trainer.max_steps=1.5", "trainer.max_steps=1.5: must be an integer"),
    ("compile=maybe", "compile=maybe: must be true or false"),
    ("seed=abc", "seed=abc: must be an integer or null"),
    ("data.mean=[a,b,c]", "data.mean[0]=a: must be a number"),
    ("callbacks.throughput.window=x", "callbacks.throughput.window=x: must be an integer"),
    ("model.image.depth=deep", "model.image.depth=deep: must be an integer >= 1"),
    ("model.text.config.bos_token_id=0",  # train.py would refuse it only once the towers are built
     "model.text.config.bos_token_id=0: must be 1, the start id of clipkit's BPE (data/tokenizer=bpe)"),
    ("trainer.devices=0", "trainer.devices=0: must be an integer >= 1 or auto"),
    ("precision=17", "precision=17: must be 32-true or 32 or 64-true or 64 or bf16-mixed or 16-mixed or bf16-true or "
                     "16-true or bf16 or 16 or transformer-engine or transformer-engine-float16"),
    ("data.eval_folders=[/no/such/folder]", "data.eval_folders=[/no/such/folder]: must be a list of existing folders"),
])
def test_a_bad_value_is_one_line_naming_key_value_and_what_is_allowed(override, message):
    with pytest.raises(UsageError) as err:
        compose_config([override])
    assert str(err.value) == message


def test_typed_groups_stay_open_to_new_keys_and_closed_to_mistyped_ones():
    """The schema types the keys it lists without closing the group: a Lightning argument can still be added with
    +, a mistyped key is still Hydra's "unknown config key", a datamodule keeps its own keys."""
    cfg = compose_config(["+trainer.limit_val_batches=2", "data=digits", "data.zeroshot_fraction=0.3"])
    assert cfg.trainer.limit_val_batches == 2 and cfg.data.zeroshot_fraction == 0.3
    with pytest.raises(UsageError, match="unknown config key 'trainer.max_stepz'"):
        compose_config(["trainer.max_stepz=3"])


@pytest.mark.parametrize("overrides,message", [
    (["data=webdataset"], "data.shards is required and not set: give it on the command line, data.shards="),
    (["data=csv"], "data.path is required and not set: give it on the command line, data.path="),
])
def test_a_mandatory_value_left_unset_names_the_key_and_how_to_set_it(overrides, message):
    with pytest.raises(UsageError, match=message):
        compose_config(overrides)


def test_every_preset_and_the_other_commands_configs_still_compose():
    for preset in PRESETS:
        preset_config(preset)
    for overrides in (["trainer=ddp"], ["trainer=fsdp"], ["debug=fdr"], ["model/image=resnet_clip_tiny"],
                      ["data=digits"], ["~logger", "~callbacks"]):
        compose_config(overrides)
    for name in ("eval", "predict", "robustness", "import", "export"):  # their ??? are the commands' to report
        compose_config([], config_name=name)


@pytest.mark.parametrize("preset,key,value", [
    (None, "data.batch_size", -4), (None, "data.batch_size", "many"), (None, "module.accumulate", 0),
    ("caption_lm", "objective.decoder.n_layer", 0), ("contrastive_digits", "data.zeroshot_fraction", 0),
    (None, "callbacks.zeroshot.every_n_steps", 0), (None, "trainer.max_epochs", 0),
])
def test_the_walk_answers_as_compose_config_does(preset, key, value):
    walked = answer(copy.deepcopy(preset_config(preset)), key, value)
    try:
        compose_config([*([f"experiments={preset}"] if preset else []), f"{key}={value}"])
        composed = None
    except UsageError as err:
        composed = str(err)
    assert walked == composed


@pytest.mark.parametrize("args,message", [
    (["fit", "data=webdataset"], "clipkit: error: data.shards is required and not set"),
    (["fit", "data.batch_size=-4"], "clipkit: error: data.batch_size=-4: must be an integer >= 1"),
    (["fit", "data.batch_size=0"], "clipkit: error: data.batch_size=0: must be an integer >= 1"),
    (["fit", "-m", "data.batch_size=-4,8"], "clipkit: error: data.batch_size=-4: must be an integer >= 1"),
])
def test_the_issues_three_cases_fail_in_one_line_before_anything_is_built(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


@pytest.mark.slow
def test_the_issues_three_cases_exit_2_in_one_line_from_the_shell(isolated):
    """The three reports of the issue, as a new user types them: each exits 2 with one line, no traceback, no hang
    (data.batch_size=0 used to run empty epochs forever)."""
    cases = {"data=webdataset": "data.shards is required", "data.batch_size=-4": "data.batch_size=-4: must be",
             "data.batch_size=0": "data.batch_size=0: must be"}
    procs = {arg: subprocess.Popen([sys.executable, "-m", "clipkit", "fit", arg], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for arg in cases}
    for arg, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 2, (arg, err[-2000:])
        assert err.startswith(f"clipkit: error: {cases[arg]}") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.slow
def test_every_accepted_value_trains_to_a_normal_end_within_a_time_bound(tiny_cfg):
    """The values the walk accepts (0 and -1 where they mean "off", "none", "no warm-up" or "keep all") run through
    the real fit on the tiny model for 2 steps under a hard time cap: faulthandler ends the test process, printing
    where it hung, if a run goes past it. One run per value with every key that accepts it (a run costs ~20 s on the
    shared CPU, a run per key would take minutes): each of these values only switches its own feature off or keeps
    more, so none of them changes how another is read."""
    from clipkit.train import fit

    cases = accepted_cases()
    assert cases and all(value != "word" for _, value in cases)
    known = set(numeric_keys(tiny_cfg()))
    assert {key for key, _ in cases} <= known, "a key only some presets have: run it with that preset's choices"
    for value in sorted({value for _, value in cases}):
        overrides = [f"{key}={value}" for key, v in cases if v == value]
        cfg = tiny_cfg("trainer.max_steps=2", *overrides)
        cfg.logger = None  # no MLflow run: not what is tested, and seconds per run
        faulthandler.dump_traceback_later(120, exit=True)
        start = time.monotonic()
        try:
            result = fit(cfg)
        finally:
            faulthandler.cancel_dump_traceback_later()
        assert result.images_seen > 0 and time.monotonic() - start < 120, overrides
