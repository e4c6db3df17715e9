"""``python -m clipkit fit [overrides]``: train a model.

A plain ``@hydra.main`` app (so ``--cfg job``, ``--help`` and ``-m`` work as Hydra documents); before handing over,
the overrides are composed once here so a mistyped preset or key fails in one line that names it and suggests the
nearest valid name, instead of Hydra's page of search paths. Unlike the other commands it imports the config at
module level: Hydra, ``--help`` included, needs its resolvers anyway.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, InstantiationException
from omegaconf import DictConfig

from clipkit.config import CONF_DIR, compose_config, single_job
from clipkit.errors import DataError, ResumeError, TrainingDiverged, UsageError

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
    from clipkit.init import InitError
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
    except (TrainingDiverged, ResumeError, InitError) as err:
        raise SystemExit(f"clipkit: error: {err}") from None
    if result.global_rank == 0:  # every DDP rank trains; one reports
        print_summary(result)


def print_summary(result) -> None:
    lines = ["", "clipkit fit finished"]
    lines.append(f"  images seen           {result.images_seen:,} in {result.seconds / 60:.1f} min "
                 f"({result.train_images_per_second:.0f} training images/s)")
    for title, prefixes in (("validation (chooses best.ckpt)", ("val/",)),
                            ("test (reported; chooses nothing)", ("zeroshot/", "retrieval/"))):
        keys = [k for k in sorted(result.metrics) if k.startswith(prefixes)]
        if keys:
            lines.append(f"  {title}")
        lines += [f"    {key:<38} {100 * result.metrics[key]:6.2f} %" for key in keys]
    if result.run_id:
        lines.append(f"  MLflow run {result.run_id} (experiment id {result.experiment_id}) "
                     f"in {result.tracking_uri}")
        lines.append("  browse it: python -m clipkit ui")
    if result.checkpoint:
        lines.append(f"  checkpoint: {result.checkpoint}")
    if result.weights:
        lines.append(f"  weights:    {result.weights} (safetensors, with its config and tokenizer)")
    print("\n".join(lines), flush=True)


def main(overrides: list[str]) -> int:
    """``--help`` is Hydra's, with the header in ``conf/fit.yaml``."""
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
    finally:  # Hydra leaves its run's config global: a later fit() in this process would take it for its own
        HydraConfig.instance().cfg = None
    return 0
