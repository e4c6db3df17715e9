"""Hydra multiruns as MLflow sweeps: one parent run per ``fit -m`` holding the grid, one nested child run per job.

Hydra knows the grid and MLflow knows runs; neither links them, so a multirun would scatter its jobs as unrelated,
randomly named runs. :class:`MLflowSweep` (a Hydra callback, ``hydra.callbacks.mlflow_sweep`` in ``fit.yaml``)
creates the parent run when the multirun starts and writes its id to ``<sweep dir>/mlflow_sweep.json``; each
job (:func:`job_run`) reads that file and nests its run under the parent (MLflow's ``mlflow.parentRunId`` tag).
A file rather than a process global, so that launchers which run jobs in other processes or on other machines
(joblib, submitit) nest them too. When the multirun ends the parent is closed: FINISHED when every child
finished, FAILED otherwise, and it gets the sweep's ``multirun.yaml``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("clipkit")

SWEEP_FILE = "mlflow_sweep.json"
KIND_TAG = "clipkit.kind"  # "sweep" on parent runs, "comparison" on the runs `compare` makes for a whole experiment
VARIES_TAG = "clipkit.varies"  # on a child: its values of the keys the grid varies ("objective=bow_prediction seed=1")
# Overrides that do not change what is trained: left out of run names (they stay in the clipkit.overrides tag).
NOT_IN_NAMES = ("experiments", "hydra", "logger", "paths", "resume", "experiment_name")
MAX_NAME = 250


def parse_overrides(overrides: list[str]) -> list[tuple[str, list[str], str]]:
    """``(key, values, text)`` per override: ``model/image=a,b`` -> ``("model/image", ["a", "b"], text)``."""
    out = []
    for override, text in zip(OverridesParser.create().parse_overrides(overrides), overrides, strict=True):
        values = (list(override.sweep_string_iterator()) if override.is_sweep_override()
                  else [override.get_value_element_as_str()])
        out.append((override.get_key_element(), values, text))
    return out


@dataclass
class Grid:
    """What a multirun sweeps: each key's values, in Hydra's order (the sweeper's ``params`` first, then the
    command line, a later mention of a key replacing an earlier one, as Hydra's basic sweeper does)."""

    values: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, config: DictConfig) -> Grid:
        params = config.hydra.sweeper.get("params") or {}
        overrides = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
        return cls({key: values for key, values, _ in parse_overrides(overrides)})

    @property
    def axes(self) -> list[str]:
        """The keys that take more than one value: what tells the jobs apart."""
        return [k for k, v in self.values.items() if len(v) > 1]

    @property
    def jobs(self) -> int:
        return math.prod(len(v) for v in self.values.values())

    def spec(self) -> list[str]:
        return [f"{k}={','.join(v)}" for k, v in self.values.items()]


def run_name(preset: str | None, overrides: list[str]) -> str:
    """``contrastive_vit seed=2 model/image=resnet_clip_tiny``: the preset and the overrides that change what is
    trained, as typed (so they can be pasted back on a command line); ``defaults`` for a run with neither."""
    shown = [text for key, _, text in parse_overrides(overrides)
             if key.lstrip("+~").split(".")[0].split("/")[0] not in NOT_IN_NAMES]
    name = " ".join(([preset] if preset else []) + shown) or "defaults"
    return name if len(name) <= MAX_NAME else name[:MAX_NAME - 1] + "…"


def _is_first_process() -> bool:
    """Lightning's DDP launcher starts each further local rank as a fresh ``python -m clipkit`` that composes the
    preset again (``hydra.mode: MULTIRUN`` included): only the first process may open a sweep."""
    return all(int(os.environ.get(var, "0")) == 0 for var in ("LOCAL_RANK", "RANK", "NODE_RANK"))


@dataclass
class Sweep:
    """A sweep's parent run, as recorded in ``<sweep dir>/mlflow_sweep.json``."""

    run_id: str
    experiment_id: str
    experiment_name: str
    tracking_uri: str
    axes: list[str]
    jobs: int
    preset: str | None = None

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SWEEP_FILE).write_text(json.dumps(self.__dict__, indent=2) + "\n")

    @classmethod
    def read(cls, folder: Path) -> Sweep | None:
        path = folder / SWEEP_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None


_open: dict[str, Sweep] = {}  # parent runs this process opened and has not closed, by run id


class MLflowSweep(Callback):
    """Opens the parent run when a multirun starts and closes it when it ends (see the module's docstring)."""

    sweep: Sweep | None = None  # the parent this callback opened (none on further DDP ranks, or without a logger)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if config.get("logger") is None or not _is_first_process():
            return
        import mlflow

        grid, preset = Grid.of(config), config.hydra.runtime.choices.get("experiments")
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        uri, experiment_name = str(config.logger.tracking_uri), str(config.logger.experiment_name)
        client = mlflow.MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
        from clipkit.tracking import git_revision

        params = {f"sweep/{key.lstrip('+~')}": ",".join(values)[:6000]  # MLflow's limit on a param's value
                  for key, values in grid.values.items()}
        params.update({"sweep/jobs": str(grid.jobs), "sweep/dir": str(sweep_dir)})
        sweep = _reopen(client, sweep_dir, uri, experiment_id, params) if config.get("resume") else None
        if sweep is not None:
            _open[sweep.run_id] = self.sweep = sweep
            log.info("MLflow sweep run %s reopened: %s already holds this grid's parent run", sweep.run_id, sweep_dir)
            return
        command = " ".join(["python -m clipkit fit", *config.hydra.overrides.task])
        tags = {KIND_TAG: "sweep", "clipkit.preset": preset or "none", "clipkit.sweep_dir": sweep_dir.as_uri(),
                "clipkit.overrides": " ".join(config.hydra.overrides.task), "clipkit.git_revision": git_revision(),
                "clipkit.axes": " ".join(grid.axes),
                "mlflow.note.content": (f"Hydra multirun of {grid.jobs} jobs: `{command}`\n\n"
                                        f"Grid: `{' '.join(grid.spec())}`\n\nSweep directory: {sweep_dir.as_uri()}"
                                        "\n\nCompare the jobs: `python -m clipkit compare --sweep RUN_ID` "
                                        "(this run's id)")}
        axes = [f"{k}={','.join(grid.values[k])}" for k in grid.axes]
        run = client.create_run(experiment_id, run_name=f"sweep {run_name(preset, axes)}", tags=tags)
        from mlflow.entities import Param

        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
        sweep = Sweep(run.info.run_id, experiment_id, experiment_name, uri, grid.axes, grid.jobs, preset)
        sweep.write(sweep_dir)
        _open[sweep.run_id] = self.sweep = sweep
        log.info("MLflow sweep run %s (%d jobs over %s) in experiment %r", sweep.run_id, grid.jobs,
                 ", ".join(grid.axes) or "one point", experiment_name)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.sweep is not None and self.sweep.run_id in _open:
            close(self.sweep, multirun_yaml=Path(str(config.hydra.sweep.dir)) / "multirun.yaml")


def _reopen(client, sweep_dir: Path, uri: str, experiment_id: str, params: dict[str, str]) -> Sweep | None:
    """The parent run an earlier launch of this very grid left in ``sweep_dir`` (a fixed ``hydra.sweep.dir``,
    relaunched with ``resume=auto`` after a requeue), set RUNNING again; None when there is none to reuse: no
    record, another store or experiment, a deleted run, or another grid (whose params MLflow cannot change)."""
    from mlflow.exceptions import MlflowException

    sweep = Sweep.read(sweep_dir)
    if sweep is None or (sweep.tracking_uri, sweep.experiment_id) != (uri, experiment_id):
        return None
    try:
        run = client.get_run(sweep.run_id)
    except MlflowException:
        return None
    if run.info.lifecycle_stage != "active" or _same_grid(run.data.params) != _same_grid(params):
        return None
    client.update_run(sweep.run_id, status="RUNNING")
    return sweep


def _same_grid(params: dict[str, str]) -> dict[str, str]:
    """The params that make two launches the same grid: all ``sweep/*`` but the ``resume=auto`` a relaunch adds."""
    return {k: v for k, v in params.items() if k.startswith("sweep/") and k != "sweep/resume"}


def nest(client, run_id: str, job: JobRun) -> None:
    """Move a continued run (``resume=auto`` inside a multirun) under this sweep's parent: a requeued grid's
    parent then holds every job, the resumed ones included. A no-op outside a sweep."""
    if "mlflow.parentRunId" not in job.tags:
        return
    from mlflow.entities import RunTag

    log.info("MLflow run %s continues under this sweep's parent run %s", run_id, job.tags["mlflow.parentRunId"])
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in job.tags.items()])


def children(client, sweep_run) -> list:
    """The child runs of a parent run, oldest first."""
    return client.search_runs([sweep_run.info.experiment_id], f"tags.mlflow.parentRunId = '{sweep_run.info.run_id}'",
                              max_results=10000, order_by=["attributes.start_time ASC"])


def close(sweep: Sweep, multirun_yaml: Path | None = None, status: str | None = None) -> str:
    """End the parent run: FINISHED if every job's run finished (and there is one per grid point), else FAILED,
    or the ``status`` given (KILLED on Ctrl-C). Returns the status."""
    import mlflow

    _open.pop(sweep.run_id, None)
    client = mlflow.MlflowClient(tracking_uri=sweep.tracking_uri)
    parent = client.get_run(sweep.run_id)
    runs = children(client, parent)
    finished = sum(r.info.status == "FINISHED" for r in runs)
    if status is None:
        status = "FINISHED" if finished == len(runs) and len(runs) >= sweep.jobs else "FAILED"
    client.log_metric(sweep.run_id, "sweep/finished_jobs", finished)
    if multirun_yaml is not None and multirun_yaml.is_file():
        client.log_artifact(sweep.run_id, str(multirun_yaml))
    client.set_terminated(sweep.run_id, status=status)
    print(f"\nclipkit sweep: {finished} of {sweep.jobs} jobs finished; MLflow parent run {sweep.run_id} ({status}) in "
          f"experiment {sweep.experiment_name!r}\n  compare them: python -m clipkit compare --sweep {sweep.run_id}"
          f"\n  browse them:  python -m clipkit ui sweep={sweep.run_id}", flush=True)
    return status


def close_open(status: str) -> None:
    """Close the parents this process opened whose multirun stopped early (a job raised, Ctrl-C), so none is
    left RUNNING."""
    for sweep in list(_open.values()):
        close(sweep, status=status)


@dataclass
class JobRun:
    """How a ``fit`` job's run is named and, inside a sweep, nested."""

    name: str
    tags: dict[str, str]


def job_run(cfg: DictConfig, preset: str | None) -> JobRun:
    """The run name and the sweep tags of this job: a plain run outside a multirun (or when the sweep's parent
    is in another store or experiment, which MLflow cannot nest across); a child of the parent inside one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return JobRun(run_name(preset, []), {})
    hydra = HydraConfig.get()
    overrides = list(hydra.overrides.task)
    sweep = Sweep.read(Path(hydra.sweep.dir)) if hydra.mode == RunMode.MULTIRUN else None
    if sweep is None:
        return JobRun(run_name(preset, overrides), {})
    here = (str(cfg.logger.tracking_uri), str(cfg.logger.experiment_name))
    if here != (sweep.tracking_uri, sweep.experiment_name):
        log.warning("this job logs to %s / %r, its sweep's parent run to %s / %r: not nested under it",
                    *here, sweep.tracking_uri, sweep.experiment_name)
        return JobRun(run_name(preset, overrides), {})
    varies = [text for key, _, text in parse_overrides(overrides) if key in sweep.axes]
    return JobRun(run_name(preset, varies) if varies else run_name(preset, overrides),
                  {"mlflow.parentRunId": sweep.run_id, VARIES_TAG: " ".join(varies),
                   "clipkit.sweep_job": str(hydra.job.num)})
