"""MLflow: the run record (flattened config, tags, config artifact) and the logger that steps by images seen."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger as _LightningMLFlowLogger
from mlflow.entities import Param
from omegaconf import DictConfig, ListConfig, OmegaConf

from clipkit.config import REPO_ROOT

log = logging.getLogger(__name__)


class MLFlowLogger(_LightningMLFlowLogger):
    """Lightning's MLflow logger, with each metric's step set to the ``images_seen`` logged beside it, and each
    metric logged at most once per step.

    Images seen is the x-axis of the paper's Figure 2 and stays comparable across batch sizes,
    accumulation and world sizes, where optimiser steps do not. Metrics logged without ``images_seen``
    keep Lightning's step.

    Given the ``run_id`` of an interrupted run, it continues that run: steps the run already holds (those
    between the checkpoint and the crash, which the resumed run recomputes) are not logged again, so every
    metric's history has each step once, and none missing.
    """

    def __init__(self, *args, run_id: str | None = None, **kwargs) -> None:
        super().__init__(*args, run_id=run_id, **kwargs)
        self.last_steps: dict[str, int] = {}
        if run_id is not None:
            client = self.experiment
            for key in client.get_run(run_id).data.metrics:
                self.last_steps[key] = max(m.step for m in client.get_metric_history(run_id, key))
            client.update_run(run_id, status="RUNNING")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "images_seen" in metrics:
            step = int(metrics["images_seen"])
        step = step or 0
        fresh = {k: v for k, v in metrics.items() if step > self.last_steps.get(k, -1)}
        if fresh:
            self.last_steps.update(dict.fromkeys(fresh, step))
            super().log_metrics(fresh, step)


def flatten_config(cfg: DictConfig, prefix: str = "") -> dict[str, Any]:
    """Resolved leaves as ``a/b/c -> value``. A key that interpolates a whole sub-tree (the objective's
    ``image_tower: ${model.image}``) is recorded as the interpolation, since that tree is logged once
    under its own key."""
    flat: dict[str, Any] = {}
    items = cfg.items_ex(resolve=False) if isinstance(cfg, DictConfig) else enumerate(cfg)
    for key, _ in items:
        name = f"{prefix}{key}"
        if OmegaConf.is_interpolation(cfg, key) and isinstance(cfg[key], (DictConfig, ListConfig)):
            flat[name] = cfg._get_node(key)._value()
        elif isinstance(cfg[key], DictConfig):
            flat.update(flatten_config(cfg[key], f"{name}/"))
        elif isinstance(cfg[key], ListConfig):
            flat[name] = OmegaConf.to_container(cfg[key], resolve=True)
        else:
            flat[name] = cfg[key]
    return flat


def git_revision() -> str:
    """The commit the code ran at, with ``-dirty`` if the tree had uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
    try:
        return git("rev-parse", "HEAD") + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_tags(cfg: DictConfig, preset: str | None, arm: str | None = None) -> dict[str, str]:
    """What the MLflow UI filters and groups by; ``clipkit.arm`` is the objective's label (``compare`` groups
    by it) and ``clipkit.overrides`` the command line of this run (of this job, in a multirun)."""
    revision = git_revision()
    return {
        "mlflow.source.git.commit": revision.removesuffix("-dirty"),  # shown by the MLflow UI
        "clipkit.git_revision": revision,
        "clipkit.preset": preset or "none",
        "clipkit.objective": str(cfg.objective._target_).rsplit(".", 1)[-1],
        "clipkit.arm": arm or str(cfg.objective._target_).rsplit(".", 1)[-1],
        "clipkit.seed": str(cfg.get("seed")),
        "clipkit.overrides": " ".join(_command_line()),
        **process_tags(),
    }


def process_tags() -> dict[str, str]:
    """The process writing a run (set again by each resume): a run left RUNNING by a process that is gone was
    killed before it could say so (:func:`mark_dead_runs`)."""
    return {"clipkit.host": socket.gethostname(), "clipkit.pid": str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def mark_dead_runs(client, experiment_ids: list[str] | None = None) -> list[str]:
    """Mark as KILLED the RUNNING runs of ``experiment_ids`` (all experiments if None) whose recorded process
    (:func:`process_tags`) ran on this host and is gone: a process killed before its first checkpoint (SIGKILL, the
    OOM killer, a preempted node) leaves its run RUNNING forever. Runs of other hosts, runs without the tags and runs
    of live processes are left alone (a reused pid counts as live). Returns the ids marked."""
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return []
    query = f"attributes.status = 'RUNNING' and tags.`clipkit.host` = '{socket.gethostname()}'"
    marked, token = [], None
    while True:
        page = client.search_runs(experiment_ids, query, page_token=token)
        for run in page:
            pid = run.data.tags.get("clipkit.pid", "")
            if pid.isdigit() and not _alive(int(pid)):
                client.set_terminated(run.info.run_id, status="KILLED")
                marked.append(run.info.run_id)
        token = page.token
        if not token:
            break
    if marked:
        log.info("marked %d run(s) whose process is gone as KILLED: %s", len(marked), ", ".join(marked))
    return marked


def _choices() -> dict[str, str]:
    from hydra.core.hydra_config import HydraConfig

    return {k: str(v) for k, v in HydraConfig.get().runtime.choices.items()} if HydraConfig.initialized() else {}


def _component(node: Any, choice: str | None) -> str:
    """A config sub-tree as the choice that made it, else its class (and its ``name``: the timm model)."""
    if choice:
        return choice
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return "none"
    kind = str(node._target_).rsplit(".", 1)[-1]
    return f"{kind}({node.name})" if isinstance(node.get("name"), str) else kind


def component_tags(cfg: DictConfig) -> dict[str, str]:
    """Which data and towers a run trained, for filtering and grouping in the UI: the config choices
    (``model/image=vit_tiny_hybrid``) where the objective uses ``model.*``, else the class it builds (the
    bag-of-words tower inside ``objective=bow_contrastive``), ``none`` for a tower the objective does not have.
    Read before ``instantiate``, which can resolve the ``${model.image}`` interpolations in place."""
    choices, objective = _choices(), cfg.objective
    tags = {"clipkit.data": _component(cfg.data, choices.get("data"))}
    for tower, group in (("image_tower", "model/image"), ("text_tower", "model/text")):
        uses_group = tower in objective and OmegaConf.is_interpolation(objective, tower) and \
            objective._get_node(tower)._value() == "${" + group.replace("/", ".") + "}"
        node = objective.get(tower) if tower in objective else None
        if node is None and tower == "text_tower" and isinstance(objective.get("decoder"), DictConfig):
            tags[f"clipkit.{tower}"] = f"decoder {_component(objective.decoder, None)}"  # the caption model's
            continue
        tags[f"clipkit.{tower}"] = _component(node, choices.get(group) if uses_group else None)
    return tags


def _command_line() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


@dataclass(frozen=True)
class RunRecord:
    """What a run logs about its configuration, taken before anything is instantiated (Hydra's
    ``instantiate`` can resolve interpolated sub-trees of the original config in place)."""

    params: dict[str, Any]
    config_yaml: str
    tags: dict[str, str]  # component_tags

    @classmethod
    def of(cls, cfg: DictConfig) -> RunRecord:
        return cls(flatten_config(cfg), OmegaConf.to_yaml(cfg, resolve=True), component_tags(cfg))

    def log(self, logger: MLFlowLogger, extra_artifacts: list[str | Path] = ()) -> None:
        """Params = the flattened resolved config; artifacts = the resolved config (enough, with the git
        revision and the seed, to rerun) and files such as the trained tokenizer."""
        client, run_id = logger.experiment, logger.run_id
        params = [Param(k, str(v)) for k, v in self.params.items()]
        for start in range(0, len(params), 100):  # MLflow's batch limit; Lightning's own would cut values at 250 chars
            client.log_batch(run_id, params=params[start:start + 100])
        client.log_text(run_id, self.config_yaml, "config.yaml")
        for path in extra_artifacts:
            client.log_artifact(run_id, str(path))


def runs_url(host: str, port: int, experiment_id: str) -> str:
    """The training-runs table (MLflow 3 opens an experiment on its GenAI overview otherwise)."""
    return f"http://{host}:{port}/#/experiments/{experiment_id}/runs"


def run_url(host: str, port: int, experiment_id: str, run_id: str) -> str:
    """One run's page: a sweep's parent shows its grid (params) and the comparison (artifacts)."""
    return f"http://{host}:{port}/#/experiments/{experiment_id}/runs/{run_id}"


def compare_runs_url(host: str, port: int, experiment_id: str, run_ids: list[str]) -> str:
    """MLflow's side-by-side view of runs (params that differ, metric charts)."""
    import json
    from urllib.parse import quote

    return (f"http://{host}:{port}/#/compare-runs?runs={quote(json.dumps(run_ids, separators=(',', ':')))}"
            f"&experiments={quote(json.dumps([experiment_id]))}")


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """An http(s) tracking URI must answer ``/health`` now: MLflow's client would otherwise retry for minutes
    once training has started. Local stores (sqlite, files) need no check."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ConnectionError(f"MLflow server {uri} does not answer ({reason}): start it (python -m clipkit ui) or "
                              f"log locally with logger.tracking_uri=sqlite:///mlflow.db") from None
