"""The package's shape: every import of every module (top level, inside functions, under TYPE_CHECKING)
read from its source; the module graph has no cycle, data flows down the rooms, and only `cli` imports `cli`.

docs/architecture.md lists the rooms in this order.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "jeidnn"

ROOMS = [
    "config", "data", "model", "train", "evaluate", "hf", "export", "compress", "pipeline", "serve", "cli",
]  # fmt: skip
"""The rooms in the order a run passes through them: a module imports only from its own room, rooms before it
and the shared core modules at the top of the package (errors, log, io)."""

CORE = {"jeidnn.errors", "jeidnn.log", "jeidnn.io"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The jeidnn module an import of ``name`` loads: the longest known prefix."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    """Every jeidnn module ``module`` imports, wherever the import statement sits."""
    path = MODULES[module]
    return imports_in(path.read_text(), module, path.name == "__init__.py")


def imports_in(source: str, module: str, is_package: bool = False) -> set[str]:
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from jeidnn.train import stage2` imports the module jeidnn.train.stage2.
            names = [f"{base}.{alias.name}" for alias in node.names]
            names = [n for n in names if n in MODULES] or [base]
        else:
            continue
        for name in names:
            target = _resolve(name) if name.startswith("jeidnn") else None
            if target is not None and target != module:
                found.add(target)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def room(module: str) -> int:
    """Position of ``module``'s room: core modules -1, the package's public face after every room but cli."""
    parts = module.split(".")
    if module in CORE:
        return -1
    if module == "jeidnn":
        return ROOMS.index("cli") - 0.5
    assert len(parts) >= 2 and parts[1] in ROOMS, f"{module} is in no room; add it to ROOMS or CORE"
    return ROOMS.index(parts[1])


def test_every_module_is_in_a_room():
    for module in MODULES:
        room(module)


def test_the_module_graph_has_no_cycle():
    done: set[str] = set()
    stack: list[str] = []

    def visit(module: str) -> None:
        if module in stack:
            cycle = stack[stack.index(module) :] + [module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        stack.append(module)
        for target in sorted(GRAPH[module]):
            visit(target)
        stack.pop()
        done.add(module)

    for module in sorted(GRAPH):
        visit(module)


def test_data_flows_down_the_rooms():
    upward = [
        f"{module} imports {target}"
        for module, targets in sorted(GRAPH.items())
        for target in sorted(targets)
        if room(target) > room(module)
    ]
    assert not upward, "imports against the flow of a run:\n" + "\n".join(upward)


def test_only_the_command_line_imports_the_command_line():
    offenders = [
        f"{module} imports {target}"
        for module, targets in sorted(GRAPH.items())
        for target in sorted(targets)
        if target.startswith("jeidnn.cli") and not module.startswith("jeidnn.cli")
    ]
    assert not offenders, "\n".join(offenders)


def test_the_checker_sees_lazy_relative_and_type_checking_imports():
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from jeidnn.pipeline import run\n"
        "def f():\n    from jeidnn.cli.main import main\n    import jeidnn.model.heads\n"
        "from . import policies\nfrom ..errors import JeidnnError\nimport torch\n"
    )
    found = imports_in(source, "jeidnn.model.gates")
    assert found == {
        "jeidnn.pipeline.run",
        "jeidnn.cli.main",
        "jeidnn.model.heads",
        "jeidnn.model.policies",
        "jeidnn.errors",
    }


@pytest.mark.parametrize("module", sorted(MODULES))
def test_files_stay_under_400_lines(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= 400, f"{MODULES[module].relative_to(PACKAGE.parent)} has {lines} lines; split it by job"
