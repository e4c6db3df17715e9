"""conda users get the same pins as the Makefile's venv; every declared dependency is pinned."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[=<>!\[ ;]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[_name(name)] = version.strip()
    return pins


def conda_pins() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return {_name(r): r.split("==")[1] for r in pip}


def test_environment_yml_pins_equal_constraints():
    pinned = constraints()
    for name, version in conda_pins().items():
        assert pinned.get(name) == version, f"{name}: environment.yml {version} vs constraints.txt {pinned.get(name)}"


def test_every_declared_dependency_is_pinned_in_both():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    assert declared <= set(constraints()), declared - set(constraints())
    assert declared <= set(conda_pins()), declared - set(conda_pins())


def test_torch_and_torchvision_are_the_pair_that_runs_on_this_cpu():
    pins = constraints()
    assert (pins["torch"], pins["torchvision"]) == ("2.15.0", "0.29.2")
