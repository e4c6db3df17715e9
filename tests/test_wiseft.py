"""WiSE-FT: θ(α) = (1 − α)·θ_zero-shot + α·θ_fine-tuned, every α scored in and out of distribution; the endpoints
reproduce their own evaluations, and bad input is one line before anything is evaluated."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from hydra.utils import instantiate

from clipkit.cli import main
from clipkit.evaluate import build, datamodule, load_checkpoint
from clipkit.evaluation.robustness import IN_DISTRIBUTION, domain_accuracies
from clipkit.objectives import FinetuneClassifier
from clipkit.train import fit
from clipkit.wiseft import check_same_architecture, interpolate, parse_alphas, plot, table


@pytest.mark.parametrize("alphas,message", [
    ([0, 1.5], "alpha 1.5 is outside [0, 1]"), ([-0.1], "alpha -0.1 is outside [0, 1]"),
    ([], "alphas=[] holds no mixing coefficient"), ("half", "alpha 'half' is not a number"),
    (["0.5", "x"], "alpha 'x' is not a number"), ([float("nan")], "alpha nan is outside [0, 1]")])
def test_bad_alphas_are_one_line(alphas, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_alphas(alphas)


def test_alphas_are_sorted_numbers_and_bad_ones_stop_the_command_before_it_loads_anything(capsys):
    assert parse_alphas([1, "0.5", 0, 0.5]) == [0.0, 0.5, 1.0] and parse_alphas(0.3) == [0.3]
    assert main(["wiseft", "zeroshot=missing.ckpt", "finetuned=missing.ckpt", "alphas=[0,2]"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "clipkit: error: alpha 2 is outside [0, 1]: 0 is the zero-shot model, 1 the fine-tuned one"
    assert main(["wiseft", "zeroshot=missing.ckpt", "finetuned=missing.ckpt"]) == 2
    assert capsys.readouterr().err.strip() == "clipkit: error: no checkpoint at missing.ckpt"
    assert main(["wiseft", "--help"]) == 0 and "zeroshot=PATH finetuned=PATH" in capsys.readouterr().out


def test_interpolation_is_exact_at_the_ends_and_linear_between():
    a = {"w": torch.randn(3, 4), "n": torch.tensor(3)}
    b = {"w": torch.randn(3, 4), "n": torch.tensor(7)}
    assert torch.equal(interpolate(a, b, 0.0)["w"], a["w"]) and torch.equal(interpolate(a, b, 1.0)["w"], b["w"])
    assert torch.allclose(interpolate(a, b, 0.25)["w"], 0.75 * a["w"] + 0.25 * b["w"])
    assert interpolate(a, b, 0.25)["n"] == 7  # counters are the fine-tuned model's


def test_different_architectures_are_one_line(tiny_cfg):
    narrow = instantiate(tiny_cfg().module).objective
    wide = instantiate(tiny_cfg("objective.embed_dim=24").module).objective
    with pytest.raises(ValueError, match=r"^zeroshot and finetuned are different architectures: image_proj.weight is "
                                         r"\[16, 32\] in zeroshot and \[24, 32\] in finetuned$"):
        check_same_architecture(narrow, wide)
    classifier = FinetuneClassifier.from_contrastive(narrow, ["a", "b"])
    check_same_architecture(narrow, classifier)  # a fine-tuned classifier adds only its head
    with pytest.raises(ValueError, match="wiseft interpolates a contrastive model with a fine-tuned version of it"):
        check_same_architecture(classifier, narrow)
    bow = instantiate(tiny_cfg("objective=bow_contrastive").module).objective
    with pytest.raises(ValueError, match="different architectures: text_tower.* is only in"):
        check_same_architecture(narrow, bow)


def test_table_and_plot_mark_the_ends(tmp_path):
    rows = [{"alpha": a, "accuracy": {IN_DISTRIBUTION: 0.5 + 0.3 * a, "sketch": 0.4 + 0.2 * a * (1 - a),
                                      "clutter": 0.3}} for a in (0.0, 0.5, 1.0)]
    md = table(rows).splitlines()
    assert md[0] == "| alpha | in_distribution | sketch | clutter | mean shifted |"
    assert md[2] == "| 0 (zero-shot) | 50.0 | 40.0 | 30.0 | 35.0 |" and md[4].startswith("| 1 (fine-tuned) | 80.0 |")
    plot(rows, tmp_path / "w.png")
    assert (tmp_path / "w.png").stat().st_size > 10_000


def test_wiseft_curve_reproduces_both_endpoints_and_logs_table_plot_and_metrics(tiny_cfg, isolated, capsys):
    shifts = "data.shift_domains=[sketch]"
    zero_shot = fit(tiny_cfg(shifts, "trainer.max_steps=2", "experiment_name=wiseft_test",
                             "callbacks.checkpoint.every_n_train_steps=1", "callbacks.checkpoint.save_top_k=-1"))
    # the README's recipe: fine-tune the zero-shot model's export with the classifier preset (its architecture and
    # tokenizer come from the source), then interpolate
    finetuned = fit(tiny_cfg(shifts, "experiments=finetune_classifier", f"init={zero_shot.weights}",
                             "trainer.max_steps=2", "module.optimizer.lr=1e-2", "module.warmup_steps=1",
                             f"paths.output_dir={isolated}/ft", "experiment_name=wiseft_test"))
    source, tuned = load_checkpoint(zero_shot.weights)[0]["state_dict"], load_checkpoint(finetuned.weights)[0]
    assert tuned["clipkit"]["tokenizer"] == load_checkpoint(zero_shot.weights)[0]["clipkit"]["tokenizer"]
    moved = [k for k, v in source.items() if k.startswith("objective.image_tower.")
             and not torch.equal(v, tuned["state_dict"][k])]
    assert moved, "the fine-tuned image tower should have moved from its init"
    frozen = [k for k in source if k.startswith("objective.text_tower.")]  # frozen: still exactly the source's
    assert frozen and all(torch.equal(source[k], tuned["state_dict"][k]) for k in frozen)
    uri = f"sqlite:///{isolated}/mlflow.db"
    capsys.readouterr()
    assert main(["wiseft", f"zeroshot={zero_shot.checkpoint}", f"finetuned={finetuned.weights}",
                 "alphas=[1,0,0.5]", f"out={isolated}/wise", f"tracking_uri={uri}"]) == 0
    printed = capsys.readouterr().out
    assert "| 0 (zero-shot) |" in printed and "| 1 (fine-tuned) |" in printed
    report = json.loads((isolated / "wise" / "wiseft.json").read_text())
    assert [r["alpha"] for r in report["rows"]] == [0.0, 0.5, 1.0]

    # each end alone, as `robustness` scores a checkpoint (its own data config and tokenizer, domain_accuracies)
    for path, row in ((zero_shot.checkpoint, report["rows"][0]), (finetuned.weights, report["rows"][2])):
        ckpt, stored = load_checkpoint(path)
        dm = datamodule(stored, None, ckpt["clipkit"]["tokenizer"])
        assert domain_accuracies(build(ckpt, stored).objective, dm, probe=False)["zero-shot"] == row["accuracy"]
    # between the ends: every shared weight mixed, the zero-shot end's head its zero-shot classifier of the classes
    (ckpt_a, stored_a), (ckpt_b, stored_b) = load_checkpoint(zero_shot.checkpoint), load_checkpoint(finetuned.weights)
    classifier = build(ckpt_b, stored_b).objective
    dm = datamodule(stored_b, None, ckpt_b["clipkit"]["tokenizer"])
    start = FinetuneClassifier.from_contrastive(build(ckpt_a, stored_a).objective, classifier.classnames)
    start.initialise_head(dm)
    theta = start.state_dict()
    classifier.load_state_dict({k: 0.5 * theta[k] + 0.5 * v if v.is_floating_point() else v
                                for k, v in classifier.state_dict().items()})
    assert domain_accuracies(classifier, dm, probe=False)["zero-shot"] == report["rows"][1]["accuracy"]
    assert set(report["rows"][1]["accuracy"]) == {IN_DISTRIBUTION, "sketch"}
    assert (isolated / "wise" / "wiseft.png").stat().st_size > 10_000
    assert (isolated / "wise" / "wiseft.md").read_text().count("\n") == 5
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("wiseft").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"wiseft.json", "wiseft.md", "wiseft.png"}
    history = client.get_metric_history(run.info.run_id, f"wiseft/{IN_DISTRIBUTION}/top1")
    assert [(m.step, m.value) for m in history] == \
        [(s, r["accuracy"][IN_DISTRIBUTION]) for s, r in zip((0, 50, 100), report["rows"], strict=True)]
    assert set(run.data.tags["clipkit.evaluated_runs"].split(",")) == {zero_shot.run_id, finetuned.run_id}

    # two contrastive ends: everything mixed, the classifier recomputed from the mixed text tower
    first = Path(zero_shot.checkpoint).parent / "step0000001.ckpt"
    assert main(["wiseft", f"zeroshot={first}", f"finetuned={zero_shot.checkpoint}", "alphas=[0,0.5,1]",
                 f"out={isolated}/both", "mlflow=none"]) == 0
    rows = json.loads((isolated / "both" / "wiseft.json").read_text())["rows"]
    ckpt_1, stored_1 = load_checkpoint(first)
    early, late = build(ckpt_1, stored_1).objective, build(ckpt_a, stored_a).objective
    theta = early.state_dict()
    late.load_state_dict({k: 0.5 * theta[k] + 0.5 * v if v.is_floating_point() else v
                          for k, v in late.state_dict().items()})
    dm = datamodule(stored_a, None, ckpt_a["clipkit"]["tokenizer"])
    assert domain_accuracies(late, dm, probe=False)["zero-shot"] == rows[1]["accuracy"]

    # another tokenizer: one line
    other = torch.load(first, weights_only=False)
    other["clipkit"]["tokenizer"] = other["clipkit"]["tokenizer"].replace('"unk_token"', '"unknown_token"', 1)
    torch.save(other, isolated / "other.ckpt")
    assert main(["wiseft", f"zeroshot={isolated / 'other.ckpt'}", f"finetuned={zero_shot.checkpoint}",
                 "mlflow=none"]) == 2
    assert capsys.readouterr().err.strip() == ("clipkit: error: zeroshot and finetuned use different tokenizers: "
                                               "fine-tune from the zero-shot model (init=PATH keeps its tokenizer)")

    # the wrong way round: one line, before anything is evaluated, and no run left behind
    assert main(["wiseft", f"zeroshot={finetuned.weights}", f"finetuned={zero_shot.checkpoint}",
                 f"out={isolated}/wrong", f"tracking_uri={uri}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["clipkit: error: wiseft interpolates a contrastive model with a fine-tuned version of it (objective="
                   "contrastive or finetune_classifier), not 'fine-tuned classifier (zero-shot head)' with "
                   "'contrastive (transformer text)'"]
    assert not (isolated / "wrong").exists()
    assert len(client.search_runs([client.get_experiment_by_name("wiseft").experiment_id])) == 1
