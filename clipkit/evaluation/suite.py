"""The evaluation suite on a trained objective: every task reads the datamodule's held-out sets and the
objective's one interface (``zero_shot_logits`` and ``image_tower``), so it never asks which objective ran."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from clipkit.evaluation import classification_report, retrieval_report
from clipkit.evaluation.probe import C_GRID, few_shot, linear_probe
from clipkit.zeroshot import on_device

TASKS = ("zeroshot", "retrieval", "linear_probe", "fewshot")


def _as_input(objective, images: torch.Tensor, device) -> torch.Tensor:
    """Images on the model's device, in its parameters' dtype (float64 under precision=64-true; mixed precision
    keeps float32 parameters and autocasts)."""
    return images.to(device, dtype=next(objective.parameters()).dtype)


@torch.no_grad()
def scores(objective, images: torch.Tensor, prompts: dict, device, batch_size: int = 256,
           text_batch_size: int | None = 1024) -> torch.Tensor:
    """``[N, C]`` zero-shot scores: the set's classifier is built once (prompts ``text_batch_size`` at a time),
    then images are scored ``batch_size`` at a time against it."""
    classifier = objective.zero_shot_classifier(on_device(prompts, device), text_batch_size)
    return torch.cat([objective.zero_shot_logits(_as_input(objective, chunk, device), classifier).float().cpu()
                      for chunk in images.split(batch_size)])


def rank_rows(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of ``n`` rows; shares differ by at most one row."""
    return slice(n * rank // world, n * (rank + 1) // world)


def gather_rows(local: torch.Tensor, n: int, world: int, all_gather) -> torch.Tensor:
    """Every rank's :func:`rank_rows` share ``[m_r, C]`` back into ``[n, C]``, in rank order. ``all_gather``
    (Lightning's ``LightningModule.all_gather``) maps ``[m, C]`` to ``[world, m, C]`` and needs the same shape on
    every rank, so shares are padded to the largest and trimmed after."""
    most = -(-n // world)
    padded = torch.cat([local, local.new_zeros(most - len(local), *local.shape[1:])])
    gathered = all_gather(padded)
    sizes = [len(range(n)[rank_rows(n, r, world)]) for r in range(world)]
    return torch.cat([gathered[r][:size] for r, size in enumerate(sizes)])


@torch.no_grad()
def image_features(objective, images: torch.Tensor, device, batch_size: int = 256) -> np.ndarray:
    """The image tower's pooled features (before any projection, as the paper probes), L2-normalised."""
    feats = [F.normalize(objective.image_tower(_as_input(objective, chunk, device)).float(), dim=-1).cpu()
             for chunk in images.split(batch_size)]
    return torch.cat(feats).numpy()


def evaluate(objective, datamodule, tasks: list[str], device="cpu", batch_size: int = 256,
             ks: tuple[int, ...] = (1, 2, 4, 8, 16), seeds: tuple[int, ...] = (0, 1, 2),
             c_grid: tuple[float, ...] = C_GRID, val_fraction: float = 0.2, progress: bool = True,
             text_batch_size: int | None = 1024) -> dict:
    """``{task: {set: report}}`` for the requested tasks; a task with no set on this data says so."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown evaluation task {unknown[0]!r}: choose from {', '.join(TASKS)}")
    objective.eval()
    jobs = []
    if "zeroshot" in tasks:
        jobs += [("zeroshot", zs) for zs in datamodule.zeroshot_sets()]
    if "retrieval" in tasks and objective.reads_text:
        jobs += [("retrieval", rs) for rs in datamodule.retrieval_sets()]
    if "linear_probe" in tasks or "fewshot" in tasks:
        jobs += [("probe", ps) for ps in datamodule.probe_sets()]
    report: dict = {t: {} for t in tasks}
    for kind, item in tqdm(jobs, desc="evaluating", disable=not progress, unit="set"):
        if kind == "zeroshot":
            logits = scores(objective, item.images, item.prompts, device, batch_size, text_batch_size)
            report["zeroshot"][item.name] = classification_report(logits, item.labels, item.classnames)
        elif kind == "retrieval":
            s = scores(objective, item.images, item.prompts, device, batch_size, text_batch_size)
            report["retrieval"][item.name] = {**retrieval_report(s, item.positives),
                                              "images": s.shape[0], "captions": s.shape[1]}
        else:
            train_x = image_features(objective, item.train_images, device, batch_size)
            test_x = image_features(objective, item.test_images, device, batch_size)
            train_y, test_y = item.train_labels.numpy(), item.test_labels.numpy()
            probe = linear_probe(train_x, train_y, test_x, test_y, c_grid, val_fraction)
            if "linear_probe" in tasks:
                report["linear_probe"][item.name] = {**probe, "train_images": len(train_y)}
            if "fewshot" in tasks:
                report["fewshot"][item.name] = {**few_shot(train_x, train_y, test_x, test_y, ks, seeds, probe["C"]),
                                                "C": probe["C"]}
    for task in tasks:
        if not report[task]:
            report[task] = {"skipped": f"this data offers no set for {task}"}
    return report


def flat_metrics(report: dict) -> dict[str, float]:
    """Numeric leaves as ``eval/<task>/<set>/<metric>`` for MLflow (per-class entries kept in the JSON only)."""
    out = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key not in ("per_class", "validation_top1", "per_seed"):
                    walk(f"{prefix}/{key}", value)
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            out[prefix] = float(node)

    walk("eval", report)
    return out
