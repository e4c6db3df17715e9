"""``python -m clipkit compare``: the paper's Figure 2 from MLflow runs.

Reads every finished run of an experiment, grouped by their ``clipkit.arm`` tag (the objective's own label, so
nothing here knows which objectives exist), or the child runs of one sweep (``--sweep``: a ``fit -m`` grid),
grouped by the values the grid varies other than the seed; and writes a plot of a zero-shot metric against
images processed (mean over seeds, min–max band) and a Markdown table: final accuracy, images needed to reach
fixed accuracy levels, and each group's efficiency relative to the best at each level. Both are logged to
MLflow: onto the sweep's parent run, or onto a ``compare`` run of the experiment, which later comparisons skip.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from clipkit.sweep import KIND_TAG, VARIES_TAG, children, parse_overrides


@dataclass
class Curve:
    """One run's metric history: images seen (the MLflow step) and the metric's values."""

    run_id: str
    arm: str
    seed: str
    images: np.ndarray
    values: np.ndarray
    minutes: float = float("nan")
    overrides: str = ""
    revision: str = ""


@dataclass
class Arm:
    """The runs of one arm, averaged over seeds on the evaluation points they share."""

    name: str
    curves: list[Curve] = field(default_factory=list)

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """(images [P], values [runs, P]) on the images-seen points every run of the arm evaluated at."""
        common = sorted(set.intersection(*(set(c.images.tolist()) for c in self.curves)))
        images = np.array(common, dtype=float)
        values = np.stack([np.interp(images, c.images, c.values) for c in self.curves])
        return images, values

    def final(self) -> np.ndarray:
        """Each run's last value."""
        return np.array([c.values[-1] for c in self.curves])


def images_to_reach(images: np.ndarray, values: np.ndarray, level: float) -> float | None:
    """Images processed when ``values`` first reaches ``level``, interpolated linearly between evaluations;
    ``None`` if it never does. A curve that starts at or above the level reaches it at its first point."""
    above = np.nonzero(values >= level)[0]
    if above.size == 0:
        return None
    i = int(above[0])
    if i == 0:
        return float(images[0])
    x0, x1, y0, y1 = images[i - 1], images[i], values[i - 1], values[i]
    return float(x0 + (level - y0) * (x1 - x0) / (y1 - y0))


def default_levels(arms: list[Arm]) -> list[float]:
    """10%, 20%, ... up to the best arm's final mean accuracy (at most nine levels)."""
    best = max(float(a.grid()[1].mean(0).max()) for a in arms)
    return [k / 10 for k in range(1, 10) if k / 10 <= best + 1e-9] or [round(best, 2)]


def efficiency(arms: list[Arm], levels: list[float]) -> dict[str, dict[float, float | None]]:
    """Images needed by each arm's mean curve to reach each level."""
    out: dict[str, dict[float, float | None]] = {}
    for arm in arms:
        images, values = arm.grid()
        out[arm.name] = {level: images_to_reach(images, values.mean(0), level) for level in levels}
    return out


def _fmt_images(n: float | None, budget: float) -> str:
    return f"> {budget:,.0f}" if n is None else f"{n:,.0f}"


def _ratio(n: float | None, best: float | None, budget: float) -> str:
    if best is None:
        return "–"
    if n is None:
        return f"> {budget / best:.1f}×"
    return f"{n / best:.1f}×"


def markdown(arms: list[Arm], metric: str, levels: list[float], plot_name: str, command: str,
             skipped: dict[str, int]) -> str:
    """The comparison as Markdown: plot, final accuracy, images to reach each level, ratios, runs."""
    need = efficiency(arms, levels)
    budget = {a.name: float(a.grid()[0][-1]) for a in arms}
    lines = [f"# Zero-shot `{metric}` against images processed", "",
             f"Made by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from {sum(len(a.curves) for a in arms)} "
             "finished runs. Curves are the mean over seeds on the shared evaluation points; the band is the "
             "seeds' min–max. Images-to-reach are read off the mean curve, interpolated linearly between "
             "evaluations; \"> N\" means the arm had not reached the level after its N images.", ""]
    curves = [c for a in arms for c in a.curves]
    shared = [o for o in curves[0].overrides.split() if all(o in c.overrides.split() for c in curves)]
    revisions = sorted({c.revision[:12] for c in curves if c.revision})
    lines += [f"Runs made by `python -m clipkit fit {' '.join(shared)}`".rstrip() + " (each run's own overrides are "
              "in the last table)" + (f", at git revision {', '.join(revisions)}" if revisions else "") + ".", ""]
    if any(skipped.values()):
        lines += ["Not included: " + ", ".join(f"{n} {why}" for why, n in skipped.items() if n) + ".", ""]
    lines += [f"![{metric} against images processed]({plot_name})", "", "## Final accuracy", "",
              "| arm | seeds | images | final (mean ± std) | per seed |", "| --- | ---: | ---: | ---: | --- |"]
    for a in arms:
        final = a.final()
        per_seed = ", ".join(f"{100 * v:.1f}" for v in final)
        spread = f" ± {100 * final.std(ddof=1):.1f}" if len(final) > 1 else ""
        lines.append(f"| {a.name} | {len(final)} | {budget[a.name]:,.0f} | {100 * final.mean():.1f}{spread} % | {per_seed} |")
    header = " | ".join(f"{100 * lv:.0f}%" for lv in levels)
    lines += ["", "## Images needed to reach each accuracy", "", f"| arm | {header} |",
              "| --- |" + " ---: |" * len(levels)]
    for a in arms:
        lines.append(f"| {a.name} | " + " | ".join(_fmt_images(need[a.name][lv], budget[a.name]) for lv in levels) + " |")
    lines += ["", "## Images needed relative to the most efficient arm at each level", "",
              f"| arm | {header} |", "| --- |" + " ---: |" * len(levels)]
    best = {lv: min((need[a.name][lv] for a in arms if need[a.name][lv] is not None), default=None) for lv in levels}
    for a in arms:
        lines.append(f"| {a.name} | " + " | ".join(_ratio(need[a.name][lv], best[lv], budget[a.name])
                                                    for lv in levels) + " |")
    lines += ["", "## Runs", "", "| run | arm | seed | final | minutes | overrides |", "| --- | --- | ---: | ---: | ---: | --- |"]
    for a in arms:
        for c in a.curves:
            lines.append(f"| `{c.run_id[:8]}` | {a.name} | {c.seed} | {100 * c.values[-1]:.1f} % | {c.minutes:.1f} "
                         f"| `{c.overrides}` |")
    return "\n".join(lines) + "\n"


def plot(arms: list[Arm], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for a in arms:
        images, values = a.grid()
        line, = ax.plot(images / 1e3, 100 * values.mean(0), marker="o", ms=3, label=f"{a.name} ({len(a.curves)} seeds)")
        ax.fill_between(images / 1e3, 100 * values.min(0), 100 * values.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("images processed (thousands)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title("Zero-shot accuracy against images processed (paper Figure 2)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def load_arms(client, runs: list, metric: str | None, label=None) -> tuple[list[Arm], str, dict[str, int]]:
    """Finished runs grouped by ``label(run)`` (default: the arm tag), ordered by final accuracy, lowest first;
    the metric; and what was left out."""
    skipped = {"unfinished runs": 0, "runs without the metric": 0}
    finished = []
    for run in runs:
        if run.data.tags.get(KIND_TAG) in ("comparison", "sweep"):
            continue
        if run.info.status != "FINISHED":
            skipped["unfinished runs"] += 1
            continue
        finished.append(run)
    if metric is None:
        names = sorted({k for r in finished for k in r.data.metrics if k.startswith("zeroshot/") and k.endswith("/top1")})
        if not names:
            raise ValueError("no finished run logged a zeroshot/<set>/top1 metric")
        metric = "zeroshot/scenes/top1" if "zeroshot/scenes/top1" in names else names[0]
    by_arm: dict[str, Arm] = defaultdict(lambda: Arm(""))
    for run in finished:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric))
        if not history:
            skipped["runs without the metric"] += 1
            continue
        tags = run.data.tags
        arm = label(run) if label else _arm(run)
        minutes = ((run.info.end_time or 0) - run.info.start_time) / 60000 if run.info.end_time else float("nan")
        by_arm[arm].name = arm
        by_arm[arm].curves.append(Curve(run.info.run_id, arm, tags.get("clipkit.seed", "?"),
                                        np.array([h[0] for h in history], dtype=float),
                                        np.array([h[1] for h in history], dtype=float),
                                        minutes, tags.get("clipkit.overrides", ""),
                                        tags.get("clipkit.git_revision", "")))
    if not by_arm:
        raise ValueError(f"no finished run logged {metric!r}")
    arms = sorted(by_arm.values(), key=lambda a: float(a.final().mean()))
    for a in arms:
        a.curves.sort(key=lambda c: c.seed)
    return arms, metric, skipped


def _arm(run) -> str:
    return run.data.tags.get("clipkit.arm") or run.data.tags.get("clipkit.objective", "unknown")


def sweep_label(run) -> str:
    """A sweep's curve: the child's values of the grid's keys except the seed (its seeds make the band), the
    objective shown as its arm label; the arm alone when only seeds vary."""
    parts = []
    for key, _values, text in parse_overrides(run.data.tags.get(VARIES_TAG, "").split()):
        if key.lstrip("+~") == "seed":
            continue
        parts.append(_arm(run) if key.lstrip("+~") == "objective" else text)
    return ", ".join(parts) or _arm(run)


def find_sweep(client, ref: str, experiment: str | None):
    """The parent run of a sweep, by run id or by name (the newest of that name, in ``experiment`` if given)."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(ref)
    except MlflowException:
        run = None
    if run is None:
        experiments = [client.get_experiment_by_name(experiment)] if experiment else client.search_experiments()
        ids = [e.experiment_id for e in experiments if e is not None]
        sweeps = client.search_runs(ids, f"tags.`{KIND_TAG}` = 'sweep'", max_results=10000,
                                    order_by=["attributes.start_time DESC"]) if ids else []
        named = [r for r in sweeps if r.info.run_name == ref]
        if not named:
            known = ", ".join(dict.fromkeys(f"{r.info.run_name!r}" for r in sweeps[:5])) or "none"
            raise ValueError(f"no sweep run with id or name {ref!r}" + (f" in experiment {experiment!r}" if experiment
                             else "") + f" (newest sweeps: {known})")
        if len(named) > 1:
            print(f"{len(named)} sweeps are named {ref!r}: using the newest, {named[0].info.run_id}", file=sys.stderr)
        run = named[0]
    if run.data.tags.get(KIND_TAG) != "sweep":
        raise ValueError(f"run {ref} is not a sweep's parent run (made by python -m clipkit fit -m ...)")
    return run


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_")


def compare(tracking_uri: str, experiment: str | None, out: Path | None, metric: str | None = None,
            levels: list[float] | None = None, command: str = "python -m clipkit compare", log: bool = True,
            sweep: str | None = None) -> tuple[str, Path]:
    """Write the Markdown table and its plot (``out`` with ``.png``) for an experiment's runs, or for the child runs
    of a ``sweep`` (parent run id or name); log both to MLflow: onto the sweep's parent run, or onto a new
    ``compare`` run of the experiment. Returns the Markdown and where it was written."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    if sweep is not None:
        parent = find_sweep(client, sweep, experiment)
        arms, metric, skipped = load_arms(client, children(client, parent), metric, sweep_label)
        experiment_id, name = parent.info.experiment_id, _slug(parent.info.run_name) or parent.info.run_id
    else:
        experiment = experiment or "ablation_fig2"
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = [e.name for e in client.search_experiments()]
            raise ValueError(f"no MLflow experiment {experiment!r} in {tracking_uri} (there are: "
                             f"{', '.join(names) or 'none'})")
        runs = client.search_runs([exp.experiment_id], max_results=10000)
        arms, metric, skipped = load_arms(client, runs, metric)
        experiment_id, name = exp.experiment_id, experiment
    levels = levels or default_levels(arms)
    out = out or Path("outputs/compare") / f"{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    plot(arms, metric, png)
    text = markdown(arms, metric, levels, png.name, command, skipped)
    out.write_text(text)
    if log:
        if sweep is not None:
            run_id, folder = parent.info.run_id, "compare"
        else:
            run_id, folder = client.create_run(experiment_id, run_name="compare",
                                               tags={KIND_TAG: "comparison"}).info.run_id, None
        need = efficiency(arms, levels)
        for a in arms:
            client.log_metric(run_id, f"compare/{_slug(a.name)}/final_mean", float(a.final().mean()))
            for lv, n in need[a.name].items():
                if n is not None:
                    client.log_metric(run_id, f"compare/{_slug(a.name)}/images_to_{round(100 * lv)}pct", n)
        client.log_artifact(run_id, str(out), folder)
        client.log_artifact(run_id, str(png), folder)
        if sweep is None:
            client.set_terminated(run_id)
    return text, out
