"""Robustness to distribution shift, the paper's section 3.3 at small scale: each model's top-1 in distribution and on
every shifted domain, and the *effective robustness* of the zero-shot and probed models: how far their shifted
accuracy lies above what the supervised models reach at the same in-distribution accuracy.

As the paper (after Taori et al. 2020) does, the supervised models' trend is a straight line through their
(in-distribution, shifted) accuracies in logit space, one line per domain; here the supervised models are the
checkpoints along one supervised run, so the line spans the accuracies that run passed through.
"""

from __future__ import annotations

import math

import numpy as np

from clipkit.evaluation import topk_accuracy
from clipkit.evaluation.probe import C_GRID, fit_probe
from clipkit.evaluation.suite import image_features, scores

IN_DISTRIBUTION = "in_distribution"


def domain_sets(datamodule) -> list[tuple[str, object]]:
    """(name, ZeroShotSet) of the in-distribution held-out set and each shifted domain, all over the same classes."""
    shifted = datamodule.shifted_sets()
    if not shifted:
        raise ValueError("this data draws no shifted domains: the robustness evaluation needs data=synthetic "
                         "(data.shift_domains)")
    same = [z for z in datamodule.zeroshot_sets() if z.classnames == shifted[0].classnames]
    return [(IN_DISTRIBUTION, same[0]), *((s.name, s) for s in shifted)]


def domain_accuracies(objective, datamodule, device="cpu", batch_size: int = 256, c_grid=C_GRID,
                      val_fraction: float = 0.2, probe: bool = True) -> dict[str, dict[str, float]]:
    """``{"zero-shot": {domain: top1}, "linear probe": {domain: top1}}``. "zero-shot" is the objective's own interface
    (the supervised model's classifier); the probe is fitted on in-distribution images only (the probe set's
    training split), as the paper adapts CLIP to ImageNet and tests it on the shifts."""
    sets = domain_sets(datamodule)
    zero_shot = {name: topk_accuracy(scores(objective, s.images, s.prompts, device, batch_size), s.labels)["top1"]
                 for name, s in sets}
    if not probe:
        return {"zero-shot": zero_shot}
    probe_set = next(p for p in datamodule.probe_sets() if p.classnames == sets[0][1].classnames)
    probe, _, _ = fit_probe(image_features(objective, probe_set.train_images, device, batch_size),
                            probe_set.train_labels.numpy(), tuple(c_grid), val_fraction)
    probed = {name: probe.accuracy(image_features(objective, s.images, device, batch_size), s.labels.numpy())
              for name, s in sets}
    return {"zero-shot": zero_shot, "linear probe": probed}


def _clip(p: float) -> float:
    return min(max(p, 1e-3), 1 - 1e-3)


def _logit(p: float) -> float:
    p = _clip(p)
    return math.log(p / (1 - p))


def trend(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares line ``logit(shifted) = a * logit(in distribution) + b`` through ``points``; None for fewer than
    two distinct in-distribution accuracies."""
    xs = np.array([_logit(x) for x, _ in points])
    if len(points) < 2 or np.ptp(xs) < 1e-9:
        return None
    a, b = np.polyfit(xs, [_logit(y) for _, y in points], 1)
    return float(a), float(b)


def on_trend(line: tuple[float, float], in_distribution: float) -> float:
    a, b = line
    return 1.0 / (1.0 + math.exp(-(a * _logit(in_distribution) + b)))


def effective_robustness(rows: list[dict], baseline: str) -> list[dict]:
    """``rows`` (``{"model", "kind", domain: top1, ...}``) with ``effective_robustness`` per shifted domain for every
    row that is not the baseline: its shifted top-1 minus the baseline rows' trend at its in-distribution top-1
    (``extrapolated`` when that accuracy lies outside the baseline rows' range)."""
    base = [r for r in rows if r["kind"] == baseline]
    domains = [d for d in rows[0]["accuracy"] if d != IN_DISTRIBUTION]
    lines = {d: trend([(r["accuracy"][IN_DISTRIBUTION], r["accuracy"][d]) for r in base]) for d in domains}
    span = [r["accuracy"][IN_DISTRIBUTION] for r in base]
    for row in rows:
        if row["kind"] == baseline:
            continue
        x = row["accuracy"][IN_DISTRIBUTION]
        row["effective_robustness"] = {d: (row["accuracy"][d] - on_trend(lines[d], x)) if lines[d] else None
                                       for d in domains}
        row["extrapolated"] = bool(span) and not min(span) <= x <= max(span)  # beyond the baseline's accuracies
    return rows


def plot(rows: list[dict], baseline: str, path) -> None:
    """Shifted against in-distribution top-1, one point per model and domain, the y = x line, and the baseline's
    trend per domain, on logit axes as the paper's Figure 13 (accuracies near 100% spread out; the trends, fitted in
    logit space, are straight). Accuracies are clipped to [0.001, 0.999] to be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = [d for d in rows[0]["accuracy"] if d != IN_DISTRIBUTION]
    colours = dict(zip(domains, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    markers = {}
    fig, ax = plt.subplots(figsize=(7, 6))
    ends = (_clip(0.0), _clip(1.0))
    ax.plot(ends, ends, color="black", lw=1, ls=":", label="y = x (no loss under shift)")
    base = [r for r in rows if r["kind"] == baseline]
    xs = [_clip(r["accuracy"][IN_DISTRIBUTION]) for r in rows]
    grid = np.linspace(min(xs), max(xs), 50)  # the trend where models are, not extrapolated across the axis
    for d in domains:
        line = trend([(r["accuracy"][IN_DISTRIBUTION], r["accuracy"][d]) for r in base])
        if line:
            ax.plot(grid, [on_trend(line, x) for x in grid], color=colours[d], lw=1, ls="--", alpha=0.6)
    for row in rows:
        marker = markers.setdefault(row["kind"], "os^Dvp"[len(markers) % 6])
        for d in domains:
            ax.scatter(_clip(row["accuracy"][IN_DISTRIBUTION]), _clip(row["accuracy"][d]), color=colours[d],
                       marker=marker, s=55 if row["kind"] != baseline else 30, edgecolors="black", linewidths=0.5)
    for d in domains:
        ax.scatter([], [], color=colours[d], marker="s", label=f"domain: {d}")
    for kind, marker in markers.items():
        ax.scatter([], [], color="grey", marker=marker, label=kind)
    ax.plot([], [], color="grey", ls="--", label=f"{baseline} trend (logit fit)")
    ticks = [0.01, 0.1, 0.5, 0.9, 0.99, 0.999]
    ax.set_xscale("logit")
    ax.set_yscale("logit")
    ax.set_xticks(ticks, [f"{100 * t:g}%" for t in ticks])
    ax.set_yticks(ticks, [f"{100 * t:g}%" for t in ticks])
    ax.minorticks_off()
    ax.set(xlim=ends, ylim=ends, xlabel="in-distribution top-1 (logit axis)",
           ylabel="shifted-domain top-1 (logit axis)",
           title="Effective robustness: shifted against in-distribution top-1")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
