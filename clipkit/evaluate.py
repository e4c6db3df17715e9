"""``python -m clipkit eval ckpt=PATH ...``: rebuild a checkpoint's model and tokenizer, run the evaluation
suite, write a JSON report and log it to MLflow (the checkpoint's own run by default)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from clipkit.devices import resolve_device
from clipkit.tokenization import StoredTokenizer
from clipkit.weights import read_weights


def load_checkpoint(path: str | Path) -> tuple[dict, DictConfig]:
    """(the checkpoint or exported weights, the run's resolved config). Refuses files that cannot rebuild
    themselves, and checkpoints that would unpickle code."""
    ckpt = read_weights(path)
    info = ckpt.get("clipkit") or {}
    if "config" not in info or "tokenizer" not in info:
        raise ValueError(f"{path} was not written by clipkit fit (it carries no config and tokenizer)")
    return ckpt, OmegaConf.create(info["config"])


def build(ckpt: dict, stored: DictConfig, merge: bool = True):
    """The trained ``ClipKitModule`` from the stored config and weights. LoRA adapters are merged into their base
    layers (``merge=False`` keeps them, with the checkpoint's names): the model then has the names and layers of one
    built with ``lora.r=0`` (:func:`clipkit.models.lora.without_lora` of ``stored``), and needs no peft."""
    from clipkit.models.lora import merge_adapters

    module = instantiate(stored.module)
    module.load_state_dict(ckpt["state_dict"])
    if merge:
        merge_adapters(module)
    return module.eval()


def datamodule(stored: DictConfig, data_cfg: DictConfig | None, tokenizer_json: str, specials: str | None = None):
    """The stored data config (or a new one) with the checkpoint's tokenizer in place of a freshly trained one."""
    cfg = data_cfg if data_cfg is not None else stored.data
    return instantiate(cfg, tokenizer=StoredTokenizer(tokenizer_json, specials), _recursive_=False)


def log_report(metrics: dict[str, float], info: dict, mode: str, images_seen: int, report_path: Path) -> str | None:
    """Log to the checkpoint's run (``checkpoint``) or a new run in its experiment (``new``); the run id."""
    if mode == "none":
        return None
    import mlflow
    from mlflow.entities import Metric

    uri = info.get("tracking_uri") or "sqlite:///mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = info.get("run_id") if mode == "checkpoint" else None
    if run_id is None:
        experiment = client.get_run(info["run_id"]).info.experiment_id if info.get("run_id") else (
            client.get_experiment_by_name("clipkit_eval") or client.get_experiment(client.create_experiment("clipkit_eval"))
        ).experiment_id
        run = client.create_run(experiment, run_name="eval", tags={"clipkit.kind": "evaluation",
                                                                   "clipkit.evaluated_run": info.get("run_id", "")})
        run_id = run.info.run_id
    now = int(time.time() * 1000)
    items = [Metric(k, v, now, images_seen) for k, v in metrics.items()]
    for start in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[start:start + 500])
    client.log_artifact(run_id, str(report_path), "eval")
    if mode == "new":
        client.set_terminated(run_id)
    return run_id


def run_eval(cfg: DictConfig, data_overrides: list[str], ckpt: dict, stored: DictConfig) -> dict:
    """``ckpt``, ``stored``: :func:`load_checkpoint` of ``cfg.ckpt``."""
    from clipkit.evaluation.suite import evaluate, flat_metrics

    info = ckpt["clipkit"]
    data_cfg = cfg.get("data")
    if data_cfg is None and data_overrides:
        data_cfg = OmegaConf.merge(stored.data, OmegaConf.from_dotlist(data_overrides).data)
    module = build(ckpt, stored)
    device = resolve_device(cfg.device)
    module.to(device)
    dm = datamodule(stored, data_cfg, info["tokenizer"], info.get("tokenizer_specials"))
    tasks = list(cfg.tasks)
    report = evaluate(module.objective, dm, tasks, device, cfg.batch_size, tuple(cfg.fewshot.ks),
                      tuple(cfg.fewshot.seeds), tuple(cfg.linear_probe.c_grid), cfg.linear_probe.val_fraction,
                      text_batch_size=cfg.get("text_batch_size"))
    seen = int(module.images_seen)
    result = {"checkpoint": str(Path(cfg.ckpt).resolve()), "run_id": info.get("run_id"), "images_seen": seen,
              "objective": stored.objective._target_, "data": (data_cfg or stored.data)._target_, "tasks": report}
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).with_suffix(".eval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    result["mlflow_run"] = log_report(flat_metrics(report), info, cfg.mlflow, seen, out)
    result["out"] = str(out)
    return result


def summary(result: dict) -> str:
    lines = ["", f"clipkit eval: {result['checkpoint']} ({result['images_seen']:,} images seen)"]
    for task, sets in result["tasks"].items():
        for name, rep in sets.items():
            if name == "skipped":
                lines.append(f"  {task:<13} {rep}")
            elif task == "zeroshot":
                lines.append(f"  zeroshot      {name:<12} top1 {100 * rep['top1']:5.1f} %  top5 {100 * rep['top5']:5.1f} %  "
                             f"mean per-class recall {100 * rep['mean_per_class_recall']:5.1f} %")
            elif task == "retrieval":
                lines.append(f"  retrieval     {name:<12} image->text R@1/5/10 {100 * rep['image_to_text_r1']:.1f}/"
                             f"{100 * rep['image_to_text_r5']:.1f}/{100 * rep['image_to_text_r10']:.1f} %  text->image "
                             f"{100 * rep['text_to_image_r1']:.1f}/{100 * rep['text_to_image_r5']:.1f}/"
                             f"{100 * rep['text_to_image_r10']:.1f} %")
            elif task == "linear_probe":
                lines.append(f"  linear_probe  {name:<12} top1 {100 * rep['top1']:5.1f} %  (C={rep['C']:g}, "
                             f"{rep['train_images']} training images)")
            elif task == "fewshot":
                shots = "  ".join(f"{k.split('_')[0]}:{100 * v['top1']:.1f}" for k, v in rep.items() if k.endswith("_shot"))
                lines.append(f"  fewshot       {name:<12} top1 % by shots  {shots}")
    lines.append(f"  report: {result['out']}" + (f"  (logged to MLflow run {result['mlflow_run']})"
                                                 if result.get("mlflow_run") else ""))
    return "\n".join(lines)
