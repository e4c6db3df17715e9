"""Fine-tuning against robustness (issue 21): zero-shot, fine-tuned, LoRA and WiSE-FT (Wortsman et al. 2022), in
distribution and under shift, over seeds; prints a Markdown table and the paper-claims row.

    .venv/bin/python benchmarks/finetune.py [--zeroshot PATH] [--seeds 0,1,2] [--alphas 0,0.1,...,1]
                                            [--out benchmarks/finetune] [--quick]

The zero-shot model is ``--zeroshot`` (a model.safetensors or .ckpt), else the demo (experiments=contrastive_vit,
its own steps) trained once into benchmarks/.claims/ (the same run ``robustness.py`` trains and reuses). For each seed
it fine-tunes that model with ``fit experiments=finetune_classifier init=ZS seed=S`` twice: every weight of the image
tower (full fine-tuning), and LoRA on the image tower only (``model.image.lora.r=8``). The text tower needs no LoRA
here: finetune_classifier keeps it frozen (it only builds the zero-shot head), so adapters there would never train.
Each run is reused from benchmarks/.claims/ when its last checkpoint and export exist, and its curve (below) when
it was scored at the same alphas: delete a folder to redo it. For each fine-tuned run (its export, LoRA merged)
``clipkit.wiseft.wiseft`` scores θ(α) = (1 − α)·θ_zero-shot + α·θ_fine-tuned for every α, in distribution and on
every shifted domain; α = 0 is the zero-shot model and α = 1 the fine-tuned one, so every row of
the table is read from those curves, on the held-out and shifted sets of the fine-tuned run's seed (paired by seed).

WiSE-FT's α is 0.5, fixed in advance (the paper's recommendation when no held-out shift is available). The best α is
printed too, labelled "chosen on the test sets, optimistic": it is picked on the sets it is reported on.

The claim, "WiSE-FT (α=0.5) improves shifted accuracy over both endpoints without losing in-distribution accuracy vs
the fine-tuned model", is decided on paired per-seed differences d (WiSE-FT minus the other model, same seed): a
difference counts when |mean d| exceeds the standard deviation of d over the seeds (n ≥ 2); otherwise it is noise.
  reproduced:     shifted gains over zero-shot and over fine-tuned both count and are positive, and the
                  in-distribution difference to fine-tuned is not a loss that counts;
  not reproduced: either shifted difference counts and is negative, or the in-distribution loss counts;
  within noise:   anything else (always with one seed: no spread, nothing can be told apart).
A smoke run of every code path: ``--quick`` (tiny towers, a few steps, one seed, alphas 0,0.5,1; meaningless numbers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.robustness import train  # noqa: E402
from clipkit.config import compose_config  # noqa: E402

ALPHA = 0.5  # WiSE-FT's mixing coefficient, fixed before anything is measured
LORA = ["model.image.lora.r=8"]
QUICK_STEPS = {"zeroshot": 30, "finetune": 10}


def zero_shot_model(path: str | None, workdir: Path, extra: tuple[str, ...], steps: int | None) -> Path:
    """The given model, or the demo's export (trained now unless ``workdir`` holds it)."""
    if path is not None:
        if not Path(path).exists():
            raise SystemExit(f"--zeroshot {path}: no such file (give a model.safetensors or .ckpt written by clipkit)")
        return Path(path).resolve()
    steps = steps or int(compose_config(["experiments=contrastive_vit"]).trainer.max_steps)
    out = train("contrastive_vit", steps, workdir, extra)
    export = out / "model.safetensors"
    return export if export.exists() else out / "checkpoints" / "last.ckpt"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def finetune(zeroshot: Path, seed: int, lora: bool, workdir: Path, extra: tuple[str, ...]) -> Path:
    """The export (model.safetensors, LoRA merged) of ``fit experiments=finetune_classifier init=zeroshot seed=seed``,
    trained now unless ``workdir`` holds it; the folder is keyed by the zero-shot file's SHA-256."""
    from clipkit.train import fit

    out = workdir / f"ft-{sha256(zeroshot)[:12]}-{'lora8' if lora else 'full'}-seed{seed}"
    export = out / "model.safetensors"
    if not ((out / "checkpoints" / "last.ckpt").exists() and export.exists()):
        fit(compose_config(["experiments=finetune_classifier", f"init={zeroshot}", f"seed={seed}",
                            "trainer.enable_progress_bar=false", "experiment_name=finetune_benchmark",
                            f"paths.output_dir={out}", *(LORA if lora else []), *extra]), preset="finetune_classifier")
    return export


def wiseft_curve(zeroshot: Path, finetuned: Path, alphas: list[float]) -> list[dict]:
    """``[{"alpha", "accuracy": {domain: top1}}]`` from ``clipkit.wiseft``, reused from the run's folder when it
    scored the same two models at the same alphas."""
    from clipkit.wiseft import wiseft

    out = finetuned.parent / "wiseft"
    saved = out / "wiseft.json"
    if saved.exists():
        report = json.loads(saved.read_text())
        if (report["zeroshot"], report["finetuned"], report["alphas"]) == (str(zeroshot), str(finetuned), alphas):
            return report["rows"]
    cfg = compose_config([f"zeroshot={zeroshot}", f"finetuned={finetuned}", f"alphas=[{','.join(map(str, alphas))}]",
                          f"out={out}", "mlflow=none"], config_name="wiseft")
    return wiseft(cfg)["rows"]


def point(rows: list[dict], alpha: float) -> dict[str, float]:
    """{"in_distribution", "shifted"} top-1 (fractions) of the curve at ``alpha``."""
    from clipkit.evaluation.robustness import IN_DISTRIBUTION
    from clipkit.wiseft import mean_shifted

    row = next(r for r in rows if math.isclose(r["alpha"], alpha))
    return {"in_distribution": row["accuracy"][IN_DISTRIBUTION], "shifted": mean_shifted(row["accuracy"])}


def models(per_seed: dict[int, dict]) -> dict[str, list[dict]]:
    """Each reported model's per-seed points (same seed order everywhere), read from the two curves."""
    seeds = sorted(per_seed)
    full, lora = ([per_seed[s][k] for s in seeds] for k in ("full", "lora"))
    return {"zero-shot": [point(r, 0.0) for r in full], "fine-tuned": [point(r, 1.0) for r in full],
            "LoRA (image tower, r=8)": [point(r, 1.0) for r in lora],
            f"WiSE-FT α={ALPHA:g} (fine-tuned)": [point(r, ALPHA) for r in full],
            f"WiSE-FT α={ALPHA:g} (LoRA)": [point(r, ALPHA) for r in lora]}


def best_alpha(per_seed: dict[int, dict]) -> float:
    """The α of the highest seed-mean shifted top-1 on the full fine-tuning curves: chosen on the test sets."""
    alphas = [r["alpha"] for r in next(iter(per_seed.values()))["full"]]
    return max(alphas, key=lambda a: statistics.fmean(point(v["full"], a)["shifted"] for v in per_seed.values()))


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation over seeds; nan for one seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def cell(values: list[float]) -> str:
    m, s = spread([100 * v for v in values])
    return f"{m:.1f}" if math.isnan(s) else f"{m:.1f} ± {s:.1f}"


def table(rows: dict[str, list[dict]]) -> str:
    """Markdown: mean ± standard deviation over seeds (top-1, %) in distribution and over the shifted domains."""
    lines = ["| model | n | in-distribution top-1 (%) | mean shifted top-1 (%) |", "| --- | --- | --- | --- |"]
    for name, points in rows.items():
        lines.append(f"| {name} | {len(points)} | {cell([p['in_distribution'] for p in points])} | "
                     f"{cell([p['shifted'] for p in points])} |")
    return "\n".join(lines)


def difference(a: list[dict], b: list[dict], key: str) -> dict:
    """Paired by seed: a − b in points, its mean, its standard deviation and whether it counts (|mean| > sd)."""
    d = [100 * (x[key] - y[key]) for x, y in zip(a, b, strict=True)]
    m, s = spread(d)
    return {"mean": m, "sd": s, "n": len(d), "counts": not math.isnan(s) and abs(m) > s}


def verdict(rows: dict[str, list[dict]]) -> dict:
    """The WiSE-FT claim decided by the rule in the module docstring, with the three differences behind it."""
    wise = rows[f"WiSE-FT α={ALPHA:g} (fine-tuned)"]
    vs_zs = difference(wise, rows["zero-shot"], "shifted")
    vs_ft = difference(wise, rows["fine-tuned"], "shifted")
    in_dist = difference(wise, rows["fine-tuned"], "in_distribution")
    if (vs_zs["counts"] and vs_zs["mean"] < 0) or (vs_ft["counts"] and vs_ft["mean"] < 0) or \
            (in_dist["counts"] and in_dist["mean"] < 0):
        decided = "not reproduced"
    elif vs_zs["counts"] and vs_ft["counts"]:  # both positive here
        decided = "reproduced"
    else:
        decided = "within noise"
    return {"verdict": decided, "shifted_vs_zeroshot": vs_zs, "shifted_vs_finetuned": vs_ft,
            "in_distribution_vs_finetuned": in_dist}


def claim_row(claim: dict) -> str:
    def pts(d: dict) -> str:
        return f"{d['mean']:+.1f}" + ("" if math.isnan(d["sd"]) else f" ± {d['sd']:.1f}")

    n = claim["shifted_vs_zeroshot"]["n"]
    note = " (one seed: no spread measured)" if n < 2 else ""
    return (f"| WiSE-FT (α={ALPHA:g}) improves shifted accuracy over both endpoints without losing in-distribution "
            f"accuracy vs the fine-tuned model | {claim['verdict']}{note} | paired over {n} seed(s), points: shifted "
            f"{pts(claim['shifted_vs_zeroshot'])} vs zero-shot, {pts(claim['shifted_vs_finetuned'])} vs fine-tuned; "
            f"in distribution {pts(claim['in_distribution_vs_finetuned'])} vs fine-tuned |")


def plot(per_seed: dict[int, dict], path: Path) -> None:
    """Mean shifted against in-distribution top-1: one WiSE-FT curve per seed (solid: full fine-tuning, dashed: LoRA),
    α = 0 (zero-shot), α = 1 (fine-tuned) and α = 0.5 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5.5))
    marks = {0.0: ("*", 200, "zero-shot (α = 0)"), 1.0: ("s", 70, "fine-tuned (α = 1)"),
             ALPHA: ("D", 50, f"WiSE-FT α = {ALPHA:g}")}
    labelled = set()
    for i, (seed, curves) in enumerate(sorted(per_seed.items())):
        colour = f"C{i % 10}"
        for kind, style in (("full", "-"), ("lora", "--")):
            pts = [point(curves[kind], r["alpha"]) for r in curves[kind]]
            xs, ys = [100 * p["in_distribution"] for p in pts], [100 * p["shifted"] for p in pts]
            ax.plot(xs, ys, style, color=colour, marker=".", lw=1.2,
                    label=f"seed {seed}, {'fine-tuned' if kind == 'full' else 'LoRA'}")
            for r, x, y in zip(curves[kind], xs, ys, strict=True):
                for alpha, (marker, size, name) in marks.items():
                    if math.isclose(r["alpha"], alpha):
                        ax.scatter([x], [y], marker=marker, s=size, color=colour, edgecolors="black", zorder=3,
                                   label=None if name in labelled else name)
                        labelled.add(name)
    ax.set(xlabel="in-distribution top-1 (%)", ylabel="mean shifted-domain top-1 (%)",
           title="WiSE-FT: θ(α) = (1 − α)·θ_zero-shot + α·θ_fine-tuned")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finite(value):
    """``value`` with every nan (the spread of one seed) as None: JSON has no nan."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def numbers(text: str, kind, name: str) -> list:
    """A comma-separated list of ``kind``; a one-line exit on anything else."""
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{name} {text!r}: give comma-separated numbers, e.g. {name} 0,0.5,1") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zeroshot", help="a model.safetensors or .ckpt; default: the demo, trained once")
    parser.add_argument("--seeds", default=None, help="fine-tuning seeds (default 0,1,2; --quick: 0)")
    parser.add_argument("--alphas", default=None, help="default 0,0.1,...,1 (--quick: 0,0.5,1); must hold 0, 0.5, 1")
    parser.add_argument("--out", default=None, help="default benchmarks/finetune (--quick: WORKDIR/out)")
    parser.add_argument("--workdir", default=None, help="default benchmarks/.claims (--quick: its quick/)")
    parser.add_argument("--quick", action="store_true", help="tiny towers, few steps: a smoke run, numbers meaningless")
    args = parser.parse_args()
    seeds = numbers(args.seeds or ("0" if args.quick else "0,1,2"), int, "--seeds")
    alphas = sorted(set(numbers(args.alphas or ("0,0.5,1" if args.quick else ",".join(f"{i / 10:g}" for i in
                                                                                      range(11))), float, "--alphas")))
    try:  # before anything trains
        from clipkit.wiseft import parse_alphas

        parse_alphas(alphas)
    except ValueError as err:
        raise SystemExit(f"--alphas: {err}") from None
    if not seeds or not {0.0, ALPHA, 1.0} <= set(alphas):
        raise SystemExit(f"--seeds needs one seed or more and --alphas must hold 0, {ALPHA:g} and 1 (got {alphas})")
    workdir = Path(args.workdir or ROOT / "benchmarks" / ".claims" / ("quick" if args.quick else ""))
    out = Path(args.out or (workdir / "out" if args.quick else ROOT / "benchmarks" / "finetune"))
    extra, zs_steps = (), None
    if args.quick:  # the tests' tiny towers; their own MLflow store
        from tests.conftest import TINY

        extra = (*TINY, "data.supersample=1", f"logger.tracking_uri=sqlite:///{workdir.resolve()}/mlflow.db")
        zs_steps = QUICK_STEPS["zeroshot"]
    zeroshot = zero_shot_model(args.zeroshot, workdir, (*extra, *(
        [f"callbacks.zeroshot.every_n_steps={zs_steps}"] if args.quick else [])), zs_steps)
    ft_extra = (*extra, f"trainer.max_steps={QUICK_STEPS['finetune']}", "callbacks.zeroshot.every_n_steps=5") \
        if args.quick else ()

    per_seed, runs = {}, {}
    for seed in seeds:
        full, lora = (finetune(zeroshot, seed, with_lora, workdir, ft_extra) for with_lora in (False, True))
        per_seed[seed] = {"full": wiseft_curve(zeroshot, full, alphas), "lora": wiseft_curve(zeroshot, lora, alphas)}
        runs[seed] = {"full": str(full), "lora": str(lora)}

    rows = models(per_seed)
    chosen = best_alpha(per_seed)
    rows[f"WiSE-FT best α={chosen:g} (fine-tuned; chosen on the test sets, optimistic)"] = \
        [point(per_seed[s]["full"], chosen) for s in sorted(per_seed)]
    claim = verdict(rows)
    out.mkdir(parents=True, exist_ok=True)
    plot(per_seed, out / "finetune.png")
    report = {"command": " ".join(sys.argv), "quick": args.quick, "zeroshot": str(zeroshot),
              "zeroshot_sha256": sha256(zeroshot), "seeds": seeds, "alphas": alphas, "alpha": ALPHA,
              "best_alpha_on_test_sets": chosen, "runs": runs, "curves": per_seed,
              "summary": {name: {"n": len(p), **{k: dict(zip(("mean", "sd"), spread([x[k] for x in p])))
                                                 for k in ("in_distribution", "shifted")}} for name, p in rows.items()},
              "claim": claim}
    (out / "finetune.json").write_text(json.dumps(finite(report), indent=2))
    print(f"Fine-tuning from {zeroshot} (seeds {','.join(map(str, seeds))}; top-1 mean ± sd over seeds):\n")
    print(table(rows))
    print("\n| claim | reproduced | numbers |\n| --- | --- | --- |")
    print(claim_row(claim))
    print(f"\nwritten: {out / 'finetune.json'}, {out / 'finetune.png'}")


if __name__ == "__main__":
    from clipkit.errors import DataError, UsageError

    try:
        main()
    except (UsageError, DataError) as err:  # e.g. a --zeroshot file that is no model clipkit reads: one line
        raise SystemExit(f"error: {err}") from None
