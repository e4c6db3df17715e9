"""The command line: help, one-line errors that name the mistake, Hydra's own flags, every preset runs."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from clipkit.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "clipkit", *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "fit" in out and "ui" in out and "experiments=" in out


@pytest.mark.parametrize("args,message", [
    (["fit", "experiments=contrastive_vt"], "unknown experiments choice 'contrastive_vt': did you mean contrastive_vit?"),
    (["fit", "trainer.max_stepz=3"], "unknown config key 'trainer.max_stepz': did you mean trainer.max_steps?"),
    (["fit", "model/image=vit_huge_nonexistent"], "unknown model/image choice 'vit_huge_nonexistent'"),
    (["fti"], "unknown command 'fti': did you mean fit?"),
    (["fit", "logger.tracking_uri=http://127.0.0.1:9"],  # nothing listens on port 9: refused at once
     "MLflow server http://127.0.0.1:9 does not answer"),
])
def test_mistakes_get_one_line_that_names_them(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_mistyped_key_inside_a_multirun_sweep_is_caught_before_any_job(capsys):
    assert main(["fit", "-m", "seed=1,2", "module.optimizer.lrr=1e-3,1e-4"]) == 2
    assert "unknown config key 'module.optimizer.lrr'" in capsys.readouterr().err


def exit_code(args: list[str]) -> int:
    """``main``'s return value, or the code Hydra exits with (``fit``'s help is Hydra's own)."""
    try:
        return main(args)
    except SystemExit as done:
        return done.code
    finally:
        GlobalHydra.instance().clear()  # Hydra exits without releasing its config search path


# command -> an option its help must explain (besides usage and an example)
OPTIONS = {"fit": "model/image: resnet_clip_tiny, vit_tiny, vit_tiny_hybrid", "eval": "ckpt: ???",
           "data": "{synth,inspect}", "compare": "--experiment", "ui": "port=5000", "predict": "labels: ???",
           "robustness": "ckpts: ???", "import": "act: quick_gelu", "export": "format: ???",
           "wiseft": "finetuned: ???"}


def test_every_command_has_its_help_checked():
    assert sorted(OPTIONS) == sorted(COMMANDS)


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_prints_usage_options_and_an_example_on_help(command, flag, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # fit hands its own argv to Hydra
    assert exit_code([command, flag]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"usage: python -m clipkit {command}") and not err
    assert OPTIONS[command] in out
    example = out.split("\nexample:\n", 1)[1].splitlines()[0].strip()
    assert example.startswith(f"python -m clipkit {command} ") and len(example.split()) > 4


def test_help_wins_over_any_other_argument(capsys):
    """``eval --help`` used to say "eval needs a checkpoint"; the help comes first, whatever else is given."""
    assert main(["eval", "tasks=[zeroshot]", "--help"]) == 0
    assert "ckpt: ???" in capsys.readouterr().out


def test_fit_help_is_hydras_with_presets_explained(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert exit_code(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    assert "experiments=NAME" in out and "model/image: resnet_clip_tiny, vit_tiny, vit_tiny_hybrid" in out
    assert "objective: bow_contrastive, bow_prediction, caption_lm, contrastive" in out


@pytest.mark.parametrize("command", ["eval", "predict", "robustness", "import", "export", "ui", "wiseft"])
def test_a_flag_given_to_a_key_value_command_is_one_line(command, capsys):
    assert main([command, "--ckpt", "model.ckpt"]) == 2
    err = capsys.readouterr().err
    assert err == (f"clipkit: error: {command} takes key=value arguments, not '--ckpt' "
                   f"(see python -m clipkit {command} --help)\n")


def test_the_top_level_help_is_answered_without_importing_lightning():
    proc = subprocess.run([sys.executable, "-c", "import sys; from clipkit.cli import main; main(['--help']); "
                           "main(['eval', '--help']); print(sorted(m for m in ('lightning', 'mlflow', 'torch') "
                           "if m in sys.modules))"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"


def test_cfg_job_prints_the_composed_preset():
    proc = run_cli("fit", "experiments=contrastive_vit", "trainer.max_steps=7", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "experiment_name: contrastive_vit" in proc.stdout and "max_steps: 7" in proc.stdout


def test_unknown_backbone_value_is_one_line_at_run_time(isolated):
    proc = run_cli("fit", "debug=fdr", "model.image.name=vit_tiy_patch16_224", "~logger")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("clipkit: error: ValueError: unknown image backbone 'vit_tiy_patch16_224'")
    assert "did you mean vit_tiny_patch16_224" in last


def test_image_size_that_the_patch_size_does_not_divide_is_refused(isolated):
    """timm would silently drop the last 2 pixel rows and columns of a 50 px image cut into 8 px patches."""
    proc = run_cli("fit", "debug=fdr", "model/image=vit_tiny", "data.image_size=50", "~logger")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "clipkit: error: ValueError: image size 50 is not a multiple of the patch size 8: the last 2 pixel rows "
        "and columns would be dropped; use data.image_size=48 or 56, or another patch size")


@pytest.mark.slow
def test_every_preset_runs_a_fast_dev_run_in_one_multirun(isolated):
    proc = run_cli("fit", "-m", "experiments=" + ",".join(PRESETS), "debug=fdr", "~logger")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("clipkit fit finished") == len(PRESETS) >= 1
    assert len(list((isolated / "multirun").glob("*/*/*/.hydra/config.yaml"))) == len(PRESETS)


def test_the_fit_summary_names_validation_and_test_metrics_apart(capsys):
    from clipkit.commands.fit import print_summary
    from clipkit.train import FitResult

    metrics = {"val/zeroshot/mean_top1": 0.5, "zeroshot/mean_top1": 0.25, "train/loss": 2.0}
    print_summary(FitResult(metrics, images_seen=64, seconds=6.0, train_images_per_second=16.0, train_seconds=4.0))
    out = capsys.readouterr().out
    validation, test = out.index("validation (chooses best.ckpt)"), out.index("test (reported; chooses nothing)")
    assert validation < out.index("val/zeroshot/mean_top1") < test < out.rindex("zeroshot/mean_top1")
    assert "50.00 %" in out and "25.00 %" in out and "train/loss" not in out
