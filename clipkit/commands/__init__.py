"""One module per sub-command of ``python -m clipkit``, each with ``main(args) -> int`` and its help (usage, options,
one example). :mod:`clipkit.cli` finds a command by name and imports it only when it runs.

A command reads its command line, calls the library (:mod:`clipkit.train`, :mod:`clipkit.evaluate`, ...) and prints;
nothing in the library imports a command back. Commands import the library inside ``main``: importing
:mod:`clipkit.config` alone loads Lightning and MLflow (seconds), which ``--help`` should not wait for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipkit.errors import UsageError

HELP_FLAGS = ("-h", "--help")
# clipkit.config.CONF_DIR, without importing what clipkit.config imports
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def asks_for_help(args: list[str]) -> bool:
    return any(arg in HELP_FLAGS for arg in args)


def overrides_only(command: str, args: list[str]) -> list[str]:
    """``args`` if each is a Hydra override (``key=value``, ``+key=...``, ``~key``); a flag is a one-line error
    (Hydra's parser would answer ``LexerNoViableAltException: --flag``)."""
    flags = [arg for arg in args if arg.startswith("-")]
    if flags:
        raise UsageError(f"{command} takes key=value arguments, not {flags[0]!r} "
                         f"(see python -m clipkit {command} --help)")
    return args


def config_help(config_name: str, usage: str, about: str, example: str) -> str:
    """Help of a command configured by overrides: its options are its config file's keys, with their defaults and
    comments as written there (so the help cannot drift from the config)."""
    lines = (CONF_DIR / f"{config_name}.yaml").read_text().splitlines()
    while lines and lines[0].startswith("#"):  # the file's own header: what the help says above and below
        lines.pop(0)
    options = "\n".join(f"  {line}" for line in lines if line.strip())
    return (f"usage: {usage}\n\n{about}\n\n"
            f"options (key=value overrides; ??? marks a required one; from clipkit/conf/{config_name}.yaml):\n"
            f"{options}\n\nexample:\n  {example}\n")


@dataclass(frozen=True)
class KeyValueCommand:
    """A command configured by ``key=value`` overrides of ``conf/<name>.yaml``: its help, and its config composed
    with the keys it cannot run without checked."""

    name: str
    usage: str
    about: str
    example: str
    required: tuple[str, ...] = ()

    def help_text(self) -> str:
        return config_help(self.name, self.usage, self.about, self.example)

    def arguments(self, args: list[str]) -> list[str] | None:
        """``args``, each checked to be an override; None once the help is printed (``-h``/``--help``)."""
        if asks_for_help(args):
            print(self.help_text())
            return None
        return overrides_only(self.name, args)

    def compose(self, args: list[str]):
        """The command's config (a ``DictConfig``) from ``args``; None once the help is printed."""
        args = self.arguments(args)
        if args is None:
            return None
        from clipkit.config import compose_config, require

        cfg = compose_config(args, config_name=self.name)
        require(cfg, self.required, self.usage)
        return cfg


@contextmanager
def one_line(*kinds: type[Exception]) -> Iterator[None]:
    """Errors of ``kinds`` (by default a missing file or a bad value) become the command's one-line usage error."""
    kinds = kinds or (FileNotFoundError, ValueError)
    try:
        yield
    except kinds as err:
        raise UsageError(str(err)) from None


def scoring_command(command: KeyValueCommand, args: list[str], score: Callable[[Any], tuple[dict, str]]) -> int:
    """The commands that score models and write a report (``robustness``, ``wiseft``): ``score(cfg)`` returns the
    result (``files``, ``mlflow_run``) and its table; it runs after ``mlflow=`` is checked, its mistakes one line."""
    cfg = command.compose(args)
    if cfg is None:
        return 0
    if cfg.mlflow not in ("new", "none"):
        raise UsageError(f"mlflow={cfg.mlflow}: choose new or none")
    with one_line():
        result, table = score(cfg)
    print(table)
    where = f"  (MLflow run {result['mlflow_run']})" if result["mlflow_run"] else ""
    print(f"written: {', '.join(result['files'])}{where}", flush=True)
    return 0
