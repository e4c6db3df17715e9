"""``python -m clipkit ui [port=5000] [sweep=ID|NAME] [overrides]``: the MLflow UI for the run store ``fit`` writes
to, opening on the right experiment's training-runs table."""

from __future__ import annotations

import subprocess
import sys

from omegaconf import DictConfig

from clipkit.commands import asks_for_help, overrides_only
from clipkit.errors import UsageError

HELP = """usage: python -m clipkit ui [port=5000] [sweep=ID|NAME] [experiments=PRESET | experiment_name=NAME] [key=value ...]

Serve the MLflow UI on 127.0.0.1 for the run store fit writes to (same config, same overrides), opening on the
training-runs table of the experiment named, else of the one holding the newest run. Ctrl-C stops it.

options:
  port=5000              the port on 127.0.0.1
  sweep=ID|NAME          a fit -m sweep's MLflow parent run (id, or name: the newest of that name): also print the
                         addresses of that run and of its jobs side by side
  experiments=PRESET     open on that preset's experiment; experiment_name=NAME on any experiment
  key=value              fit's overrides locate the store, e.g. logger.tracking_uri=sqlite:///other.db

example:
  python -m clipkit ui port=5001 experiments=contrastive_vit
"""


def ui_experiment(client, cfg: DictConfig, named: bool):
    """The experiment the UI opens on: the one named on the command line (``experiments=PRESET`` or
    ``experiment_name=...``), else the one holding the most recent run (what you just trained); None if the store
    has neither."""
    ids = [] if named else [e.experiment_id for e in client.search_experiments()]
    latest = client.search_runs(ids, max_results=1, order_by=["attributes.start_time DESC"]) if ids else []
    if latest:
        return client.get_experiment(latest[0].info.experiment_id)
    return client.get_experiment_by_name(cfg.logger.experiment_name)


def main(args: list[str]) -> int:
    """Serve the MLflow UI for the store ``fit`` writes to (same config, same overrides), opening on the right
    experiment; ``sweep=ID|NAME`` also prints the addresses of that sweep's parent run and of its jobs' comparison."""
    if asks_for_help(args):
        print(HELP)
        return 0
    from clipkit.config import compose_config
    from clipkit.tracking import compare_runs_url, run_url, runs_url

    port, sweep, rest = 5000, None, []
    for arg in overrides_only("ui", args):
        if arg.startswith("port="):
            value = arg.split("=", 1)[1]
            if not value.isdigit():
                raise UsageError(f"port must be a number, got {value!r}")
            port = int(value)
        elif arg.startswith("sweep="):
            sweep = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    cfg = compose_config(rest)
    uri = cfg.logger.tracking_uri
    import mlflow

    from clipkit.tracking import mark_dead_runs

    client = mlflow.MlflowClient(tracking_uri=uri)
    mark_dead_runs(client)  # runs whose process died unannounced show as KILLED, not RUNNING forever
    lines = []
    if sweep:
        from clipkit.compare import find_sweep
        from clipkit.sweep import children

        try:
            parent = find_sweep(client, sweep, None)
        except ValueError as err:
            raise UsageError(str(err)) from None
        experiment = client.get_experiment(parent.info.experiment_id)
        jobs = [r.info.run_id for r in children(client, parent)]
        eid = experiment.experiment_id
        lines += [f"  sweep {parent.info.run_name!r}: {run_url('127.0.0.1', port, eid, parent.info.run_id)}",
                  f"  its {len(jobs)} jobs side by side: {compare_runs_url('127.0.0.1', port, eid, jobs)}"]
    else:
        named = cfg.logger.experiment_name != compose_config([]).logger.experiment_name
        experiment = ui_experiment(client, cfg, named)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    server = subprocess.Popen(cmd)
    where = runs_url("127.0.0.1", port, experiment.experiment_id) if experiment else f"http://127.0.0.1:{port}"
    note = (f" (experiment {experiment.name!r})" if experiment
            else f" (no experiment {cfg.logger.experiment_name!r} in {uri} yet)")
    print(f"MLflow UI for {uri}: {where}{note}  (ready in ~15 s; Ctrl-C stops it)", flush=True)
    if lines:
        print("\n".join(lines), flush=True)
    try:
        return server.wait()
    except KeyboardInterrupt:
        server.terminate()
        return 0
