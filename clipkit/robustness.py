"""``python -m clipkit robustness ckpts=[...]``: every checkpoint on the in-distribution held-out set and on each
shifted domain (zero-shot and an in-distribution linear probe for models that read text, the classifier for
supervised ones), the effective robustness of the first against the second's trend, a table, a plot, MLflow."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from clipkit.evaluation.robustness import IN_DISTRIBUTION, domain_accuracies, effective_robustness, plot

BASELINE = "supervised"


def checkpoints_in(folder: Path) -> list[Path]:
    """A run's trajectory: its ``step*.ckpt`` checkpoints (in ``folder`` or its ``checkpoints/``), by name."""
    found = sorted(folder.glob("step*.ckpt")) or sorted(folder.glob("checkpoints/step*.ckpt"))
    if not found:
        raise FileNotFoundError(f"no step*.ckpt checkpoints in {folder}")
    return found


def checkpoint_paths(entries: list[str]) -> list[Path]:
    """Files as given; a folder stands for its checkpoints (:func:`checkpoints_in`)."""
    from clipkit.config import expand_paths

    return expand_paths(entries, checkpoints_in, "no checkpoint at ")


def model_rows(path: Path, cfg, seed: int, datamodules: dict) -> list[dict]:
    """The rows of one checkpoint; ``datamodules`` keeps the held-out sets of each (data config, tokenizer) drawn
    once, since a run's checkpoints share them."""
    from clipkit.api import resolve_device
    from clipkit.evaluate import build, datamodule, load_checkpoint

    ckpt, stored = load_checkpoint(path)
    stored.data.seed = seed  # every model is scored on the same generated images
    device = resolve_device(cfg.device)
    module = build(ckpt, stored).to(device)
    info, objective = ckpt["clipkit"], module.objective
    key = (OmegaConf.to_yaml(stored.data), info["tokenizer"], info.get("tokenizer_specials"))
    if key not in datamodules:
        datamodules[key] = datamodule(stored, None, info["tokenizer"], info.get("tokenizer_specials"))
    dm = datamodules[key]
    accuracy = domain_accuracies(objective, dm, device, cfg.batch_size, tuple(cfg.linear_probe.c_grid),
                                 cfg.linear_probe.val_fraction, probe=objective.reads_text)
    seen = int(module.images_seen)
    kinds = accuracy if objective.reads_text else {BASELINE: accuracy["zero-shot"]}
    return [{"model": f"{objective.arm} @ {seen:,} images", "kind": kind, "checkpoint": str(path),
             "images_seen": seen, "run_id": info.get("run_id"), "accuracy": acc} for kind, acc in kinds.items()]


def table(rows: list[dict]) -> str:
    domains = list(rows[0]["accuracy"])
    shifted = [d for d in domains if d != IN_DISTRIBUTION]
    head = ["model", "kind", *domains, "mean shifted", "effective robustness (mean)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        acc = r["accuracy"]
        er = [v for v in (r.get("effective_robustness") or {}).values() if v is not None]
        cells = [r["model"], r["kind"], *(f"{100 * acc[d]:.1f}" for d in domains),
                 f"{100 * sum(acc[d] for d in shifted) / len(shifted):.1f}",
                 (f"{100 * sum(er) / len(er):+.1f}" + (" (extrapolated)" if r.get("extrapolated") else ""))
                 if er else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def log_to_mlflow(rows: list[dict], files: list[Path], uri: str) -> str:
    import time

    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("robustness")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("robustness")
    runs = sorted({r["run_id"] for r in rows if r["run_id"]})
    run = client.create_run(experiment_id, run_name="robustness",
                            tags={"clipkit.kind": "robustness", "clipkit.evaluated_runs": ",".join(runs)})
    now, metrics = int(time.time() * 1000), []
    for r in rows:
        for domain, value in r["accuracy"].items():
            metrics.append(Metric(f"robustness/{r['kind']}/{domain}/top1", value, now, r["images_seen"]))
        for domain, value in (r.get("effective_robustness") or {}).items():
            if value is not None:
                metrics.append(Metric(f"robustness/{r['kind']}/{domain}/effective", value, now, r["images_seen"]))
    for start in range(0, len(metrics), 500):
        client.log_batch(run.info.run_id, metrics=metrics[start:start + 500])
    for path in files:
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def robustness(cfg) -> dict:
    from clipkit.evaluate import load_checkpoint

    paths = checkpoint_paths([str(c) for c in (cfg.ckpts if OmegaConf.is_list(cfg.ckpts) else [cfg.ckpts])])
    first = load_checkpoint(paths[0])
    seed = cfg.seed if cfg.seed is not None else int(first[1].get("seed") or 0)
    datamodules: dict = {}
    rows = [row for path in paths for row in model_rows(path, cfg, seed, datamodules)]
    rows = effective_robustness(rows, BASELINE)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "robustness.json", out / "robustness.md", out / "effective_robustness.png"]
    files[0].write_text(json.dumps({"seed": seed, "baseline": BASELINE, "rows": rows}, indent=2))
    files[1].write_text(table(rows) + "\n")
    plot(rows, BASELINE, files[2])
    result = {"rows": rows, "files": [str(f) for f in files], "mlflow_run": None}
    if cfg.mlflow == "new":
        uri = cfg.tracking_uri or first[0]["clipkit"].get("tracking_uri") or "sqlite:///mlflow.db"
        result["mlflow_run"] = log_to_mlflow(rows, files, uri)
    return result
