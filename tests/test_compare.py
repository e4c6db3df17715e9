"""``clipkit compare``: images-to-reach and efficiency ratios from MLflow runs, the plot, the logged comparison."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from clipkit.cli import main
from clipkit.commands.compare import parse_levels
from clipkit.compare import images_to_reach
from tests.test_cli import run_cli


def test_images_to_reach_interpolates_between_evaluations():
    images, values = np.array([1000.0, 2000.0, 3000.0]), np.array([0.1, 0.3, 0.5])
    assert images_to_reach(images, values, 0.2) == pytest.approx(1500.0)
    assert images_to_reach(images, values, 0.5) == pytest.approx(3000.0)
    assert images_to_reach(images, values, 0.05) == 1000.0  # already there at the first evaluation
    assert images_to_reach(images, values, 0.6) is None
    # the first crossing counts, not a later dip and recovery
    assert images_to_reach(np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 0.6, 0.2, 0.6]), 0.3) == pytest.approx(1.5)


def test_levels_accept_fractions_or_percentages_and_refuse_nonsense():
    assert parse_levels("0.5,0.25") == [0.25, 0.5] and parse_levels("30,60") == [0.3, 0.6]
    for bad in ("", "abc", "0,0.5", "150"):
        with pytest.raises(Exception, match="levels must"):
            parse_levels(bad)


def _store(tmp_path):
    """Two arms, two seeds each: "fast" is at 50% after 1,000 images, "slow" after 4,000 (4x the images)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("fig2")
    steps = [1000, 2000, 3000, 4000]
    curves = {"fast": [0.5, 0.7, 0.8, 0.9], "slow": [0.2, 0.3, 0.4, 0.5]}
    for arm, values in curves.items():
        for seed, jitter in ((0, -0.01), (1, 0.01)):
            run = client.create_run(exp, tags={"clipkit.arm": arm, "clipkit.seed": str(seed),
                                               "clipkit.overrides": f"arm={arm} seed={seed} data=x",
                                               "clipkit.git_revision": "0123456789abcdef"})
            for step, value in zip(steps, values, strict=True):
                client.log_metric(run.info.run_id, "zeroshot/scenes/top1", value + jitter, step=step)
                client.log_metric(run.info.run_id, "zeroshot/other/top1", 0.1, step=step)
            client.set_terminated(run.info.run_id)
    crashed = client.create_run(exp, tags={"clipkit.arm": "fast"})
    client.log_metric(crashed.info.run_id, "zeroshot/scenes/top1", 0.99, step=1000)
    client.set_terminated(crashed.info.run_id, status="FAILED")
    return uri, client, exp


def test_compare_writes_table_and_plot_and_logs_them(tmp_path, capsys):
    uri, client, exp = _store(tmp_path)
    out = tmp_path / "report" / "fig2.md"
    assert main(["compare", "--experiment", "fig2", "--out", str(out), "--levels", "0.5,0.8",
                 f"logger.tracking_uri={uri}"]) == 0
    text = out.read_text()
    assert (tmp_path / "report" / "fig2.png").stat().st_size > 10_000
    assert "zeroshot/scenes/top1" in text and "1 unfinished runs" in text
    assert "Runs made by `python -m clipkit fit data=x` (each run's own" in text and "revision 0123456789ab." in text
    assert "| slow | 2 | 4,000 | 50.0 ± 1.4 % | 49.0, 51.0 |" in text
    assert "| fast | 2 | 4,000 | 90.0 ± 1.4 % | 89.0, 91.0 |" in text
    # images to reach: fast 1,000 (50%) and 3,000 (80%); slow 4,000 (50%) and never 80%
    assert "| fast | 1,000 | 3,000 |" in text and "| slow | 4,000 | > 4,000 |" in text
    assert "| fast | 1.0× | 1.0× |" in text and "| slow | 4.0× | > 1.3× |" in text
    # the comparison is a run of its own, with both files, and is not compared next time
    runs = client.search_runs([exp], filter_string="tags.`clipkit.kind` = 'comparison'")
    assert len(runs) == 1
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} == {"fig2.md", "fig2.png"}
    assert runs[0].data.metrics["compare/slow/images_to_50pct"] == pytest.approx(4000)
    assert main(["compare", "--experiment", "fig2", "--out", str(out), "--no-log", f"logger.tracking_uri={uri}"]) == 0
    assert "from 4 finished runs" in out.read_text()
    assert "wrote" in capsys.readouterr().out


def test_compare_can_plot_another_metric(tmp_path):
    uri, _, _ = _store(tmp_path)
    out = tmp_path / "other.md"
    assert main(["compare", "--experiment", "fig2", "--metric", "zeroshot/other/top1", "--out", str(out), "--no-log",
                 f"logger.tracking_uri={uri}"]) == 0
    assert "`zeroshot/other/top1`" in out.read_text()


def test_unknown_experiment_is_one_line_naming_the_known_ones(tmp_path, capsys):
    uri, _, _ = _store(tmp_path)
    assert main(["compare", "--experiment", "fig3", f"logger.tracking_uri={uri}"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # above it: MLflow's own log of creating the store
    assert last.startswith("clipkit: error: no MLflow experiment 'fig3'") and "fig2" in last


@pytest.mark.slow
def test_ablation_preset_runs_every_arm_and_compare_reads_them(isolated):
    """experiments=ablation_fig2 is one multirun over the four arms; compare then finds one curve per arm."""
    tiny = ["data.image_size=32", "data.batch_size=16", "data.num_workers=0", "data.corpus_size=500",
            "data.supersample=1", "data.eval_per_class=1", "data.retrieval_size=8", "model.image.depth=1",
            "+model.image.embed_dim=32", "+model.image.num_heads=2", "model.text.config.hidden_size=32",
            "model.text.config.intermediate_size=64", "model.text.config.num_hidden_layers=1",
            "model.text.config.num_attention_heads=2", "module.warmup_steps=1", "trainer.max_steps=4",
            "callbacks.zeroshot.every_n_steps=2", "trainer.enable_progress_bar=false", "hydra.sweeper.params.seed=0"]
    proc = run_cli("fit", "experiments=ablation_fig2", *tiny)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("clipkit fit finished") == 4
    proc = run_cli("compare", "--out", "fig2.md")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (isolated / "fig2.md").read_text()
    for arm in ("caption prediction (transformer LM)", "bag-of-words prediction", "contrastive (bag of words text)",
                "contrastive (transformer text)"):
        assert f"| {arm} | 1 | 64 |" in text, text
