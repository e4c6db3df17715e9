"""The paper's robustness claim at small scale: zero-shot CLIP loses less under distribution shift than a supervised
model of the same in-distribution accuracy, and a linear probe fitted in distribution gives part of that back.

    .venv/bin/python benchmarks/robustness.py [--steps 600] [--out benchmarks/robustness]

Trains (or reuses, from benchmarks/.claims/) experiments=contrastive_vit and experiments=supervised_vit with the same
image tower, images and budget (the supervised run keeps a checkpoint every 100 steps: its trajectory is the family of
"standard models" whose trend the effective robustness is measured against), then runs ``clipkit robustness`` on
the contrastive model's last checkpoint and every supervised checkpoint, and prints the claim rows for
``benchmarks/paper_claims.md``. The verdict is computed, whichever way it falls.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clipkit.config import compose_config  # noqa: E402


def train(preset: str, steps: int, workdir: Path, extra: tuple[str, ...] = ()) -> Path:
    """The run's output folder, trained now unless a previous call finished it (its ``last.ckpt`` is at ``steps``;
    a run interrupted earlier is resumed from it, not taken as done). ``extra``: more overrides, e.g. tiny towers
    for a smoke run; give such a run its own ``workdir``."""
    from clipkit.train import fit
    from clipkit.weights import read_weights

    out = workdir / f"{preset}-{steps}"
    last = out / "checkpoints" / "last.ckpt"
    if not last.exists() or read_weights(last, mmap=True)["global_step"] < steps:
        fit(compose_config([f"experiments={preset}", f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false",
                            f"callbacks.checkpoint.every_n_train_steps={max(1, steps // 6)}",
                            "callbacks.checkpoint.save_top_k=-1", f"paths.output_dir={out}", *extra,
                            *([f"resume={last}"] if last.exists() else [])]), preset=preset)
    return out


def mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def claims(rows: list[dict]) -> list[str]:
    """The claim rows: zero-shot more robust than the supervised trend; the in-distribution probe less so."""
    zero_shot = next(r for r in rows if r["kind"] == "zero-shot")
    probe = next(r for r in rows if r["kind"] == "linear probe")
    er_zs, er_probe = (mean(r["effective_robustness"].values()) for r in (zero_shot, probe))
    per_domain = ", ".join(f"{d} {100 * v:+.1f}" for d, v in zero_shot["effective_robustness"].items())
    note = " (the trend is extrapolated beyond the supervised accuracies)" if zero_shot.get("extrapolated") else ""
    verdict = ("reproduced" if er_probe < er_zs else "not reproduced") if er_zs > 0 else \
        "not tested: zero-shot showed no robustness to give back"
    return [
        f"| zero-shot contrastive is more robust than a supervised model of matched in-distribution accuracy | "
        f"{'reproduced' if er_zs > 0 else 'not reproduced'} | effective robustness {100 * er_zs:+.1f} points, mean "
        f"over {len(zero_shot['effective_robustness'])} shifted domains ({per_domain}){note} |",
        f"| a linear probe fitted in distribution gives back part of that robustness | "
        f"{verdict} | probe {100 * er_probe:+.1f} vs zero-shot "
        f"{100 * er_zs:+.1f} points; in-distribution top-1 probe {100 * probe['accuracy']['in_distribution']:.1f} % vs "
        f"zero-shot {100 * zero_shot['accuracy']['in_distribution']:.1f} % |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "robustness"))
    parser.add_argument("--workdir", default=str(ROOT / "benchmarks" / ".claims"))
    args = parser.parse_args()
    workdir = Path(args.workdir)
    contrastive = train("contrastive_vit", args.steps, workdir)
    supervised = train("supervised_vit", args.steps, workdir)
    from clipkit.robustness import robustness, table

    cfg = compose_config([f"ckpts=[{contrastive}/checkpoints/last.ckpt,{supervised}/checkpoints]",
                          f"out={args.out}"], config_name="robustness")
    result = robustness(cfg)
    print(table(result["rows"]))
    print("\n".join(claims(result["rows"])))
    print(json.dumps({"files": result["files"], "mlflow_run": result["mlflow_run"]}))


if __name__ == "__main__":
    main()
