"""``python -m clipkit wiseft zeroshot=A finetuned=B``: robust fine-tuning by weight-space ensembling (WiSE-FT,
Wortsman et al. 2022). θ(α) = (1 − α)·θ_zero-shot + α·θ_fine-tuned for every weight the two models share, each α
scored in distribution and on every shifted domain with the code ``robustness`` uses; a table, a plot, MLflow.

Heads as WiSE-FT: when the fine-tuned model is a classifier (``objective=finetune_classifier``), the zero-shot end's
head is the zero-shot classifier of the fine-tuning classes built from the zero-shot model's own text tower (what the
fine-tuned head started as), and the heads are interpolated like every other weight. When both are contrastive, every
weight is interpolated and the classifier is recomputed from the interpolated text tower. α = 0 and α = 1 are the
endpoints themselves (their interpolated weights are theirs, bit for bit), so those rows are the endpoints' own
evaluations.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from clipkit.evaluation.robustness import IN_DISTRIBUTION, domain_accuracies
from clipkit.init import match_state
from clipkit.objectives import Contrastive, FinetuneClassifier


def parse_alphas(value) -> list[float]:
    """The mixing coefficients as floats in [0, 1] (a single number stands for itself); a one-line ``ValueError``
    for an empty list, a word or a number outside [0, 1]."""
    items = list(value) if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError("alphas=[] holds no mixing coefficient: give numbers in [0, 1], e.g. alphas=[0,0.5,1]")
    alphas = []
    for item in items:
        try:
            alpha = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"alpha {item!r} is not a number: give numbers in [0, 1], e.g. alphas=[0,0.5,1]") from None
        if isinstance(item, bool) or not 0.0 <= alpha <= 1.0:  # also refuses nan
            raise ValueError(f"alpha {item!r} is outside [0, 1]: 0 is the zero-shot model, 1 the fine-tuned one")
        alphas.append(alpha)
    return sorted(set(alphas))


def check_same_architecture(zeroshot: torch.nn.Module, finetuned: torch.nn.Module) -> None:
    """A one-line ``ValueError`` unless every weight of ``zeroshot`` is in ``finetuned`` with the same shape and
    ``finetuned`` adds nothing but its new heads (``new_heads()``, which the zero-shot end builds from its text)."""
    if not isinstance(zeroshot, Contrastive) or not (type(zeroshot) is type(finetuned) or
                                                      isinstance(finetuned, FinetuneClassifier)):
        raise ValueError(f"wiseft interpolates a contrastive model with a fine-tuned version of it (objective="
                         f"contrastive or finetune_classifier), not {zeroshot.arm!r} with {finetuned.arm!r}")
    heads = tuple(f"{h}." for h in finetuned.new_heads()) if type(zeroshot) is not type(finetuned) else ()
    # init's matching: the fine-tuned model as the target, the zero-shot one as its source
    match = match_state(finetuned.state_dict(), zeroshot.state_dict(), heads)
    if match.unexpected or match.missing:
        name, where = (match.unexpected[0], "zeroshot") if match.unexpected else (match.missing[0], "finetuned")
        raise ValueError(f"zeroshot and finetuned are different architectures: {name} is only in {where}")
    if match.mismatched:
        key, theirs, ours = match.mismatched[0]
        raise ValueError(f"zeroshot and finetuned are different architectures: {key} is {list(theirs)} in zeroshot "
                         f"and {list(ours)} in finetuned")


def interpolate(zeroshot: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor], alpha: float) -> dict:
    """θ(α) of two state dicts with the same keys; integer and boolean buffers (counters, flags) are the fine-tuned
    model's."""
    return {k: (1.0 - alpha) * zeroshot[k] + alpha * v if v.is_floating_point() else v.clone()
            for k, v in finetuned.items()}


def endpoints(cfg):
    """(zero-shot module, fine-tuned module, their checkpoints' ``clipkit`` records, the fine-tuned run's config),
    checked to be one architecture with one tokenizer: all before anything is evaluated."""
    from clipkit.evaluate import build, load_checkpoint

    (ckpt_a, stored_a), (ckpt_b, stored_b) = load_checkpoint(cfg.zeroshot), load_checkpoint(cfg.finetuned)
    a, b = build(ckpt_a, stored_a), build(ckpt_b, stored_b)
    check_same_architecture(a.objective, b.objective)
    if ckpt_a["clipkit"]["tokenizer"] != ckpt_b["clipkit"]["tokenizer"]:
        raise ValueError("zeroshot and finetuned use different tokenizers: fine-tune from the zero-shot model "
                         "(init=PATH keeps its tokenizer)")
    return a, b, ckpt_a["clipkit"], ckpt_b["clipkit"], stored_b


def curve(cfg) -> dict:
    """``{"alphas", "rows": [{"alpha", "accuracy": {domain: top1}}], ...}`` without writing anything."""
    from clipkit.devices import resolve_device
    from clipkit.evaluate import datamodule

    alphas = parse_alphas(cfg.alphas)
    a, b, info_a, info, stored = endpoints(cfg)
    stored.data.seed = cfg.seed if cfg.seed is not None else int(stored.get("seed") or 0)
    if cfg.shift_domains is not None:
        stored.data.shift_domains = list(cfg.shift_domains)
    dm = datamodule(stored, None, info["tokenizer"], info.get("tokenizer_specials"))
    device = resolve_device(cfg.device)
    zeroshot, finetuned = a.objective, b.objective
    start = zeroshot
    if type(zeroshot) is not type(finetuned):  # the zero-shot end as a classifier: its head from its own text tower
        start = FinetuneClassifier.from_contrastive(zeroshot, finetuned.classnames).eval()
        start.initialise_head(dm)
    theta_a, theta_b = start.state_dict(), finetuned.state_dict()
    mixed = copy.deepcopy(finetuned)  # loaded with θ(α) in turn; the endpoints stay as they are
    rows = []
    for alpha in alphas:
        if alpha in (0.0, 1.0):
            model = zeroshot if alpha == 0.0 else finetuned
        else:
            mixed.load_state_dict(interpolate(theta_a, theta_b, alpha))
            model = mixed
        accuracy = domain_accuracies(model.to(device).eval(), dm, device, cfg.batch_size, probe=False)["zero-shot"]
        rows.append({"alpha": alpha, "accuracy": accuracy})
    return {"alphas": alphas, "rows": rows, "zeroshot": str(cfg.zeroshot), "finetuned": str(cfg.finetuned),
            "seed": stored.data.seed, "run_ids": [info_a.get("run_id"), info.get("run_id")],
            "tracking_uri": info.get("tracking_uri"), "arm": finetuned.arm}


def mean_shifted(accuracy: dict[str, float]) -> float:
    shifted = [v for d, v in accuracy.items() if d != IN_DISTRIBUTION]
    return sum(shifted) / len(shifted)


def label(alpha: float) -> str:
    return f"{alpha:g}" + {0.0: " (zero-shot)", 1.0: " (fine-tuned)"}.get(alpha, "")


def table(rows: list[dict]) -> str:
    """Markdown: one row per α, top-1 (%) in distribution, on each shifted domain and their mean."""
    domains = list(rows[0]["accuracy"])
    head = ["alpha", *domains, "mean shifted"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [label(r["alpha"]), *(f"{100 * r['accuracy'][d]:.1f}" for d in domains),
                 f"{100 * mean_shifted(r['accuracy']):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path) -> None:
    """Mean shifted-domain top-1 against in-distribution top-1, one point per α joined in order (each shifted domain
    faintly behind), the zero-shot (α = 0) and fine-tuned (α = 1) ends marked, as WiSE-FT's Figure 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5.5))
    domains = [d for d in rows[0]["accuracy"] if d != IN_DISTRIBUTION]
    xs = [100 * r["accuracy"][IN_DISTRIBUTION] for r in rows]
    for d in domains:
        ax.plot(xs, [100 * r["accuracy"][d] for r in rows], lw=0.8, alpha=0.35, marker=".", label=f"{d}")
    ys = [100 * mean_shifted(r["accuracy"]) for r in rows]
    ax.plot(xs, ys, color="black", lw=1.5, marker="o", ms=4, label="mean of shifted domains")
    for r, x, y in zip(rows, xs, ys, strict=True):
        ax.annotate(f"{r['alpha']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ends = {0.0: ("*", "tab:green", "zero-shot (α = 0)"), 1.0: ("s", "tab:red", "fine-tuned (α = 1)")}
    for r, x, y in zip(rows, xs, ys, strict=True):
        if r["alpha"] in ends:
            marker, colour, name = ends[r["alpha"]]
            ax.scatter([x], [y], marker=marker, s=160, color=colour, edgecolors="black", zorder=3, label=name)
    ax.set(xlabel="in-distribution top-1 (%)", ylabel="shifted-domain top-1 (%)",
           title="WiSE-FT: θ(α) = (1 − α)·θ_zero-shot + α·θ_fine-tuned")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_to_mlflow(result: dict, files: list[Path], uri: str) -> str:
    """A run in experiment ``wiseft``: per-α metrics (``wiseft/<domain>/top1`` at step round(100 α), and the same
    under ``wiseft/alpha_<α>/``), the table, plot and JSON as artifacts. Marked FAILED if logging breaks."""
    import time

    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("wiseft")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("wiseft")
    tags = {"clipkit.kind": "wiseft", "clipkit.zeroshot": result["zeroshot"], "clipkit.finetuned": result["finetuned"],
            "clipkit.evaluated_runs": ",".join(r for r in result["run_ids"] if r)}
    run = client.create_run(experiment_id, run_name="wiseft", tags=tags)
    try:
        now, metrics = int(time.time() * 1000), []
        for r in result["rows"]:
            step = round(100 * r["alpha"])
            values = {**r["accuracy"], "mean_shifted": mean_shifted(r["accuracy"])}
            for domain, value in values.items():
                metrics.append(Metric(f"wiseft/{domain}/top1", value, now, step))
                metrics.append(Metric(f"wiseft/alpha_{r['alpha']:g}/{domain}/top1", value, now, 0))
            metrics.append(Metric("wiseft/alpha", r["alpha"], now, step))
        for start in range(0, len(metrics), 500):
            client.log_batch(run.info.run_id, metrics=metrics[start:start + 500])
        client.log_param(run.info.run_id, "alphas", ",".join(f"{a:g}" for a in result["alphas"]))
        for path in files:
            client.log_artifact(run.info.run_id, str(path))
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def wiseft(cfg) -> dict:
    """Evaluate the curve, write ``wiseft.json``, ``wiseft.md`` and ``wiseft.png`` under ``cfg.out``, log to MLflow
    (``mlflow=new``)."""
    result = curve(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "wiseft.json", out / "wiseft.md", out / "wiseft.png"]
    files[0].write_text(json.dumps({k: v for k, v in result.items() if k != "tracking_uri"}, indent=2))
    files[1].write_text(table(result["rows"]) + "\n")
    plot(result["rows"], files[2])
    result["files"], result["mlflow_run"] = [str(f) for f in files], None
    if cfg.mlflow == "new":
        uri = cfg.tracking_uri or result["tracking_uri"] or "sqlite:///mlflow.db"
        result["mlflow_run"] = log_to_mlflow(result, files, uri)
    return result

