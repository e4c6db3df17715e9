"""Command line: ``python -m clipkit {fit,eval,data,compare,ui} ...``.

``fit`` is a plain ``@hydra.main`` app (so ``--cfg job``, ``--help`` and ``-m`` work as Hydra documents);
before handing over, the overrides are composed once here so a mistyped preset or key fails in one
line that names it and suggests the nearest valid name, instead of Hydra's page of search paths.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, InstantiationException
from omegaconf import DictConfig

from clipkit.config import CONF_DIR, compose_config, single_job, suggest
from clipkit.errors import DataError, ResumeError, TrainingDiverged, UsageError
from clipkit.tracking import compare_runs_url, run_url, runs_url

log = logging.getLogger("clipkit")

USAGE = """usage: python -m clipkit COMMAND [hydra overrides]

commands:
  fit   train a model: python -m clipkit fit experiments=contrastive_vit [key=value ...]
        Hydra's own flags work: --cfg job (print the config), -m (multirun grid), --help
  eval  evaluate a checkpoint: zero-shot, retrieval, linear and few-shot probes; JSON report + MLflow:
          python -m clipkit eval ckpt=PATH [tasks=[zeroshot,retrieval,linear_probe,fewshot]] [data=NAME]
  data  write the embedded dataset to disk, or look at a dataset:
          python -m clipkit data synth --out DIR --format wds|csv --samples N
          python -m clipkit data inspect PATH   (shards, CSV/TSV or image folder; writes a contact sheet)
  compare  zero-shot accuracy against images processed, one curve per objective, from MLflow runs:
          python -m clipkit compare [--experiment ablation_fig2 | --sweep ID|NAME] [--out FILE.md] [--levels 0.3,0.5]
  ui    start the MLflow UI on 127.0.0.1 for the run store, on the experiment of the newest run:
          python -m clipkit ui [port=5000] [experiments=PRESET | experiment_name=NAME] [sweep=ID|NAME]
  robustness  accuracy under distribution shift and effective robustness against a supervised baseline:
          python -m clipkit robustness ckpts=[contrastive/last.ckpt,supervised_run/checkpoints] [out=DIR]
  predict  rank labels for images: python -m clipkit predict ckpt=PATH images=[a.png,b.jpg] labels=[cat,dog]
  import   an OpenAI/open_clip CLIP checkpoint as a clipkit model (ViT and ResNet layouts):
          python -m clipkit import ckpt=ViT-B-32.pt [out=FILE.safetensors] [act=quick_gelu|gelu]
  export   a clipkit model for transformers or open_clip: python -m clipkit export ckpt=PATH format=hf|open_clip out=DIR
"""


# Hydra's flags that take a value (``--cfg job``), and those after which there is nothing to check.
VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
               "--config-dir", "-cd", "--experimental-rerun"}
INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "--shell-completion", "-sc"}


def split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra flags with their values, key=value overrides)."""
    flags, overrides, take_value = [], [], False
    for arg in args:
        if take_value or arg.startswith("-"):
            flags.append(arg)
            take_value = not take_value and arg in VALUE_FLAGS
        else:
            overrides.append(arg)
    return flags, overrides


def preflight(args: list[str]) -> None:
    """Fail fast, in one line, on a bad preset or key before Hydra starts a (multi)run."""
    flags, overrides = split_flags(args)
    if INFO_FLAGS & set(flags):
        return
    try:
        first_job = single_job(overrides)
    except HydraException as err:
        hint = ""
        if any("{" in o and "'" not in o and '"' not in o for o in overrides):
            hint = (" (a value with braces must be quoted for Hydra, inside shell quotes: "
                    "\"data.shards='/data/{00000..00331}.tar'\")")
        raise UsageError(str(err).splitlines()[0] + hint) from None
    cfg = compose_config(first_job)
    resume = cfg.get("resume")
    if resume and resume != "auto" and not Path(str(resume)).exists():
        raise UsageError(f"resume={resume}: no such checkpoint or run folder (resume=auto finds the newest "
                         f"checkpoint of an earlier run of the same command)")
    if cfg.get("logger") is not None:
        from clipkit.tracking import check_tracking_server

        try:
            check_tracking_server(str(cfg.logger.tracking_uri))
        except ConnectionError as err:
            raise UsageError(str(err)) from None


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _one_line(err: DataError) -> str:
    """A DataError raised in a dataloader worker arrives wrapped in the worker's traceback: keep its message."""
    text = str(err).strip()
    return text.splitlines()[-1].split("DataError: ", 1)[-1] if "Original Traceback" in text else text


def _fit_task(cfg: DictConfig) -> None:
    from clipkit.train import fit  # heavy imports only once the command line is known to be good

    choices = HydraConfig.get().runtime.choices
    try:
        result = fit(cfg, preset=choices.get("experiments"))
    except InstantiationException as err:
        cause = _root_cause(err)
        if isinstance(cause, DataError):
            raise SystemExit(f"clipkit: error: {cause}") from None
        # A bad config value (unknown backbone, bad pooling...) is a usage error, not a crash.
        raise SystemExit(f"clipkit: error: {type(cause).__name__}: {cause}") from None
    except DataError as err:
        raise SystemExit(f"clipkit: error: {_one_line(err)}") from None
    except (TrainingDiverged, ResumeError) as err:
        raise SystemExit(f"clipkit: error: {err}") from None
    if result.global_rank == 0:  # every DDP rank trains; one reports
        print_summary(result)


def print_summary(result) -> None:
    lines = ["", "clipkit fit finished"]
    lines.append(f"  images seen           {result.images_seen:,} in {result.seconds / 60:.1f} min "
                 f"({result.train_images_per_second:.0f} training images/s)")
    for key in sorted(result.metrics):
        if key.startswith(("zeroshot/", "retrieval/")):
            lines.append(f"  {key:<40} {100 * result.metrics[key]:6.2f} %")
    if result.run_id:
        lines.append(f"  MLflow run {result.run_id} (experiment id {result.experiment_id}) "
                     f"in {result.tracking_uri}")
        lines.append("  browse it: python -m clipkit ui")
    if result.checkpoint:
        lines.append(f"  checkpoint: {result.checkpoint}")
    if result.weights:
        lines.append(f"  weights:    {result.weights} (safetensors, with its config and tokenizer)")
    print("\n".join(lines), flush=True)


def fit_main(overrides: list[str]) -> int:
    preflight(overrides)
    sys.argv = ["clipkit fit", *overrides]
    from clipkit.sweep import close_open

    try:
        hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="fit")(_fit_task)()
    except KeyboardInterrupt:
        close_open("KILLED")
        raise
    except BaseException:
        close_open("FAILED")  # a job stopped the multirun: its parent run is not left RUNNING
        raise
    return 0


def ui_experiment(client, cfg: DictConfig, named: bool):
    """The experiment the UI opens on: the one named on the command line (``experiments=PRESET`` or
    ``experiment_name=...``), else the one holding the most recent run (what you just trained); None if the store
    has neither."""
    ids = [] if named else [e.experiment_id for e in client.search_experiments()]
    latest = client.search_runs(ids, max_results=1, order_by=["attributes.start_time DESC"]) if ids else []
    if latest:
        return client.get_experiment(latest[0].info.experiment_id)
    return client.get_experiment_by_name(cfg.logger.experiment_name)


def ui_main(args: list[str]) -> int:
    """Serve the MLflow UI for the store ``fit`` writes to (same config, same overrides), opening on the right
    experiment; ``sweep=ID|NAME`` also prints the addresses of that sweep's parent run and of its jobs' comparison."""
    port, sweep, rest = 5000, None, []
    for arg in args:
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


def data_main(args: list[str]) -> int:
    from clipkit.datatools import data_main as run

    return run(args)


def compare_main(args: list[str]) -> int:
    from clipkit.compare import compare_main as run

    return run(args)


def eval_main(args: list[str]) -> int:
    from clipkit.evaluate import eval_main as run

    return run(args)


def predict_main(args: list[str]) -> int:
    from clipkit.predict import predict_main as run

    return run(args)


def robustness_main(args: list[str]) -> int:
    from clipkit.robustness import robustness_main as run

    return run(args)


def import_main(args: list[str]) -> int:
    from clipkit.interop.commands import import_main as run

    return run(args)


def export_main(args: list[str]) -> int:
    from clipkit.interop.commands import export_main as run

    return run(args)


COMMANDS = {"fit": fit_main, "eval": eval_main, "data": data_main, "compare": compare_main, "ui": ui_main,
            "predict": predict_main, "import": import_main, "export": export_main, "robustness": robustness_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] not in COMMANDS and os.environ.get("LOCAL_RANK") and not os.environ.get("TORCHELASTIC_RUN_ID"):
        # Lightning's DDP launcher restarts `python -m clipkit` with Hydra's argv (the overrides, without the
        # sub-command) for each further local rank
        argv = ["fit", *argv]
    command, rest = argv[0], argv[1:]
    try:
        if command not in COMMANDS:
            raise UsageError(f"unknown command {command!r}{suggest(command, list(COMMANDS))}")
        return COMMANDS[command](rest)
    except UsageError as err:
        print(f"clipkit: error: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"clipkit: error: {err}", file=sys.stderr)
        return 1
