"""No import cycle among clipkit's modules: commands sit on top of the library, the CLI only dispatches.

Every ``import``/``from ... import`` statement counts as an edge, at module level or inside a function: the cycle
issue 20 removed (cli.py -> each command -> ``from clipkit.cli import compose_config``) ran through function-level
imports, which hide a cycle until the day one of them moves to the top of its file.
"""

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root/package`` (a package is its ``__init__``)."""
    out = {}
    for path in (root / package).rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement asks for; ``from a import b`` may mean module ``a.b`` or a name in
    ``a``, so both are offered and the longest that exists is taken. Relative imports are resolved."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join([*anchor, base] if base else anchor)
    return [f"{base}.{alias.name}" for alias in node.names]


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its file (an edge per import statement)."""
    mods = modules(root, package)
    graph = {}
    for name, path in mods.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in imported(node, name, path.name == "__init__.py"):
                while target and target not in mods:  # a name inside a module -> that module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as err:
        return err.args[1]
    return None


def test_clipkit_has_no_import_cycle():
    graph = import_graph(ROOT, "clipkit")
    assert "clipkit.commands.fit" in graph and "clipkit.cli" in graph  # the walk sees the command layer
    found = cycle(graph)
    assert found is None, "import cycle: " + " -> ".join(found)


def test_the_cli_names_its_commands_without_importing_them():
    """Commands are looked up by name when run, so ``--help`` and a typo stay fast and the CLI depends on none."""
    assert not {t for t in import_graph(ROOT, "clipkit")["clipkit.cli"] if t.startswith("clipkit.commands")}


@pytest.mark.parametrize("back_import", [
    "from pkg.cli import main\n",  # module level
    "def run():\n    from pkg import cli\n    return cli\n",  # inside a function counts too
    "from .. import cli\n",  # relative
])
def test_a_back_import_is_found(tmp_path, back_import):
    (tmp_path / "pkg" / "commands").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "commands" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "cli.py").write_text("def main():\n    from pkg.commands import eval\n")
    (tmp_path / "pkg" / "commands" / "eval.py").write_text("import os\n")
    assert cycle(import_graph(tmp_path, "pkg")) is None
    (tmp_path / "pkg" / "commands" / "eval.py").write_text(back_import)
    assert set(cycle(import_graph(tmp_path, "pkg"))) == {"pkg.cli", "pkg.commands.eval"}
