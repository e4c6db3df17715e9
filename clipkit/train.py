"""``fit(cfg)``: one function from a composed config to a trained, evaluated, recorded run.

The CLI and the tests call this same function, so they exercise one path.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from transformers import PreTrainedModel

from clipkit.errors import ResumeError
from clipkit.init import InitError, changed_keys, init_tags, load_init, override_keys
from clipkit.init import prepare as init_from
from clipkit.resume import check_config, check_tokenizer, locate, static_root
from clipkit.sweep import job_run, nest
from clipkit.tokenization import special_tokens, tokenizer_json
from clipkit.tracking import MLFlowLogger, RunRecord, mark_dead_runs, process_tags, run_tags

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    metrics: dict[str, float]
    images_seen: int
    seconds: float
    train_images_per_second: float  # this session's images over train_seconds (a resumed run's images before aside)
    train_seconds: float  # this session's fit without the callbacks' evaluation
    run_id: str | None = None
    experiment_id: str | None = None
    tracking_uri: str | None = None
    checkpoint: str | None = None
    weights: str | None = None  # model.safetensors, self-describing (clipkit eval ckpt=... reads it)
    global_rank: int = 0


def check_vocabulary(tokenizer, module: L.LightningModule) -> None:
    """A text model (tower, bag of words, caption decoder) whose vocabulary or special ids disagree with the
    tokenizer trains on garbage silently."""
    for m in module.modules():
        config = m.config if isinstance(m, PreTrainedModel) else None
        size = config.vocab_size if config is not None else getattr(m, "vocab_size", None)
        if not isinstance(size, int):
            continue
        if len(tokenizer) > size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but {type(m).__name__}'s vocab_size is "
                             f"{size}: raise it in the model or objective config")
        for name in ("pad", "bos", "eos") if config is not None else ():
            want, got = getattr(tokenizer, f"{name}_token_id"), getattr(config, f"{name}_token_id", None)
            if want is not None and got != want:
                raise ValueError(f"{type(m).__name__} has {name}_token_id={got} but the tokenizer's is {want}: "
                                 f"set {name}_token_id: {want} in its config")


def drop_unused_models(cfg: DictConfig) -> list[str]:
    """Remove ``model.<name>`` sub-trees that nothing interpolates (the text tower under ``objective=bow_prediction``),
    so a run records only what it builds. Returns the names removed."""
    if "model" not in cfg:
        return []
    rest = OmegaConf.to_yaml({k: v for k, v in cfg.items_ex(resolve=False) if k != "model"})
    unused = [name for name in cfg.model if "${model." + name + "}" not in rest]
    with open_dict(cfg):
        for name in unused:
            del cfg.model[name]
    return unused


@dataclass
class Resume:
    checkpoint: Path
    info: dict  # the checkpoint's ClipKitModule.run_info
    step: int
    images_seen: int  # at the checkpoint: what this session does not count as its own


def find_resume(cfg: DictConfig) -> Resume | None:
    """The checkpoint ``cfg.resume`` names (see :func:`clipkit.resume.locate`), checked against ``cfg``; the run
    then writes into the resumed run's output folder. None: start a new run."""
    spec = cfg.get("resume")
    if not spec:
        return None
    overrides, roots, output_dir = [], [], None
    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        overrides, output_dir = list(hydra.overrides.task), Path(hydra.runtime.output_dir)
        dirs = OmegaConf.to_container(hydra, resolve=False)
        roots = [static_root(dirs["run"]["dir"]), static_root(dirs["sweep"]["dir"])]
    checkpoint = cfg.get("callbacks", {}).get("checkpoint")
    folder = Path(checkpoint.dirpath if checkpoint else f"{cfg.paths.output_dir}/checkpoints")
    found = locate(str(spec), folder, overrides, roots, output_dir)
    if found is None:
        log.info("resume=auto: no checkpoint of an earlier run of this command, so this is a new run")
        return None
    path, ckpt = found
    info = ckpt.get("clipkit") or {}
    if "config" not in info:
        raise ResumeError(f"{path} was not written by clipkit fit (it carries no config): nothing to resume")
    stored = OmegaConf.create(info["config"])
    if Path(stored.paths.output_dir).is_dir():  # keep writing checkpoints and weights where the run started
        cfg.paths.output_dir = stored.paths.output_dir
    check_config(stored, cfg, path)
    resume = Resume(path, dict(info), int(ckpt["global_step"]), int(ckpt["state_dict"].get("images_seen", 0)))
    log.info("resuming from %s (step %d); writing to %s", path, resume.step, cfg.paths.output_dir)
    return resume


def continued_run(resume: Resume, cfg: DictConfig) -> str | None:
    """The MLflow run a resumed run logs to: the checkpoint's own, which must be in this store."""
    run_id = resume.info.get("run_id")
    if run_id is None or cfg.get("logger") is None:
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(str(cfg.logger.tracking_uri)).get_run(run_id)
    except MlflowException:
        raise ResumeError(f"{resume.checkpoint} logged to MLflow run {run_id}, which is not in "
                          f"{cfg.logger.tracking_uri}: run from the folder you trained in, or set "
                          f"logger.tracking_uri to that run's store") from None
    return run_id


def mark_dead_runs_of(cfg: DictConfig) -> None:
    """A relaunch (``resume=``) closes this experiment's runs whose process died without a word (on this host)."""
    from mlflow import MlflowClient

    client = MlflowClient(str(cfg.logger.tracking_uri))
    experiment = client.get_experiment_by_name(str(cfg.logger.experiment_name))
    if experiment is not None:
        mark_dead_runs(client, [experiment.experiment_id])


def selectable(callbacks: list, datamodule) -> list:
    """``callbacks`` less any checkpoint that selects on a validation metric (``val/...``) when the data have no
    validation set: it would never save, and the reported (test) sets must never stand in for one."""
    kept = [c for c in callbacks if not str(getattr(c, "monitor", None) or "").startswith("val/")]
    if len(kept) == len(callbacks) or datamodule.validation_sets():  # sets built only if something selects on them
        return callbacks
    log.info("no validation set (data.val_fraction=0 and none of the data's own): no best.ckpt is kept, "
             "since only the reported sets could choose it")
    return kept


def command_line(overrides: list[str] | None) -> list[str]:
    """The keys this run's command line set: ``overrides`` if given, else Hydra's (under the CLI), else none."""
    if overrides is not None:
        return list(overrides)
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


@dataclass
class Prepared:
    """What :func:`fit` builds before it trains: the module holds its ``init`` weights already."""

    datamodule: L.LightningDataModule
    module: L.LightningModule
    tokenizer: object
    resume: Resume | None
    record: RunRecord
    init_tags: dict[str, str]


def prepare(cfg: DictConfig, overrides: list[str] | None = None) -> Prepared:
    """Data and module from ``cfg``, started from ``cfg.init`` (see :mod:`clipkit.init`; ``overrides``: the keys
    the command line set, which the source's architecture does not replace). Every refusal (a source that does not
    fit, a tokenizer that does not match the text tower) comes from here, before any MLflow run exists."""
    overrides = command_line(overrides)
    source = init_from(cfg, overrides)  # its architecture and tokenizer put into cfg
    for name in drop_unused_models(cfg):
        log.info("model.%s is not used by %s: not built, not recorded", name, cfg.objective._target_)
    resume = find_resume(cfg)
    tags = init_tags(cfg, source)  # hashes read before anything is built: a missing file fails first
    record = RunRecord.of(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    log.info("data: %s", cfg.data._target_)
    datamodule = instantiate(cfg.data)
    tokenizer = datamodule.tokenizer
    if resume is not None:
        check_tokenizer(resume.info["tokenizer"], tokenizer, resume.checkpoint)
    log.info("objective: %s", cfg.objective._target_)
    module = instantiate(cfg.module)
    try:
        check_vocabulary(tokenizer, module)
    except ValueError as err:
        if source is None:
            raise
        raise InitError(f"init={source.path}: {err}") from None
    if source is not None:
        check_embedding(tokenizer, module, source)
        if resume is None:
            told = changed_keys(cfg, source, override_keys(overrides))
            load_init(module, source, bool(cfg.get("init_strict", True)), told)
        else:
            log.info("resume=%s and init=%s: the run continues from its checkpoint (resume wins)", cfg.resume, cfg.init)
    return Prepared(datamodule, module, tokenizer, resume, record, tags)


def check_embedding(tokenizer, module: L.LightningModule, source) -> None:
    """A tokenizer other than the source's (``data.tokenizer`` set on the command line) reads the text tower's
    pretrained embedding rows for other tokens: refused when the module has a text model."""
    if source.tokenizer_json is None or tokenizer_json(tokenizer) == tokenizer_json(source.tokenizer_json):
        return
    for m in module.modules():
        size = m.config.vocab_size if isinstance(m, PreTrainedModel) else getattr(m, "vocab_size", None)
        if isinstance(size, int):
            raise InitError(f"init={source.path}: the tokenizer ({len(tokenizer)} ids) is not the one its text "
                            f"embedding ({size} rows) was trained with: drop the data.tokenizer override")


def fit(cfg: DictConfig, preset: str | None = None, overrides: list[str] | None = None) -> FitResult:
    """Instantiate data, model, callbacks, loggers and trainer from ``cfg`` (in that order) and train;
    with ``cfg.resume``, continue an interrupted run where its checkpoint left it; with ``cfg.init``, start a new
    run from those weights (``overrides``: see :func:`prepare`)."""
    job = job_run(cfg, preset)  # its name; in a multirun, the sweep's parent run it nests under
    run = prepare(cfg, overrides)
    datamodule, module, tokenizer, resume, record = run.datamodule, run.module, run.tokenizer, run.resume, run.record
    callbacks = selectable([instantiate(c) for c in cfg.get("callbacks", {}).values() if c is not None], datamodule)
    # Only the first process records. Under torchrun or SLURM every rank runs this function at once, and merely
    # creating an MLflow client opens (and, for sqlite, creates) the store: ranks would race on it.
    records = cfg.get("logger") is not None and rank_zero_only.rank == 0
    if records and cfg.get("resume"):
        mark_dead_runs_of(cfg)
    run_id = continued_run(resume, cfg) if resume is not None and records else None
    tags = {**run_tags(cfg, preset, module.objective.arm), **record.tags, **job.tags, **run.init_tags}
    name = cfg.logger.get("run_name") or job.name if records else None
    loggers = [instantiate(cfg.logger, tags=tags, run_id=run_id, run_name=name)] if records else []
    # Lightning refuses gradient_clip_val under manual optimisation (accumulate>1): the module then clips itself
    clip = module.clip_manually(cfg.trainer.get("gradient_clip_val"), cfg.trainer.get("gradient_clip_algorithm"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **clip)
    module.run_info = {"config": record.config_yaml, "tokenizer": tokenizer_json(tokenizer),
                       "tokenizer_specials": json.dumps(special_tokens(tokenizer))}
    for logger in trainer.loggers:  # fast_dev_run swaps loggers for a dummy
        if isinstance(logger, MLFlowLogger):
            if run_id is None:  # a continued run has its record already
                record.log(logger, [p for p in [getattr(tokenizer, "cache_path", None)] if p])
            else:
                logger.experiment.set_tag(run_id, "clipkit.resumed_from", f"{resume.checkpoint} (step {resume.step})")
                for key, value in process_tags().items():  # the process now writing it
                    logger.experiment.set_tag(run_id, key, value)
                nest(logger.experiment, run_id, job)
            module.run_info.update(run_id=logger.run_id, tracking_uri=logger._tracking_uri)

    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume.checkpoint if resume else None, weights_only=True)
    seconds = time.perf_counter() - start

    eval_seconds = sum(getattr(c, "seconds", 0.0) for c in callbacks)
    seen = int(module.images_seen)
    trained, train_seconds = seen - (resume.images_seen if resume else 0), max(seconds - eval_seconds, 1e-9)
    result = FitResult(metrics={k: float(v) for k, v in trainer.callback_metrics.items()}, images_seen=seen,
                       seconds=seconds, train_images_per_second=trained / train_seconds, train_seconds=train_seconds,
                       global_rank=trainer.global_rank)
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            logger.log_metrics({"throughput/train_images_per_second": result.train_images_per_second,
                                "images_seen": seen})
            result.run_id, result.experiment_id = logger.run_id, logger.experiment_id
            result.tracking_uri = logger._tracking_uri
    result.weights = next((c.exported for c in callbacks if getattr(c, "exported", None)), None)
    last = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
    result.checkpoint = last if last and Path(last).exists() else None
    return result
