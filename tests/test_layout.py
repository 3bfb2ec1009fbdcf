"""The package's shape, as docs/architecture.md describes it: imports run one way (no cycle,
counting imports inside functions), no module borrows another's private name (the internal
``_utils`` and ``_checks`` modules exist to be shared), library modules never draw, and no
module or function grows past what a reader can hold."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "manifoldlens"
#: Modules on top of the library: they may import matplotlib and viz.
TOP = ("manifoldlens.viz", "manifoldlens.commands", "manifoldlens.cli", "manifoldlens.__main__",
       "manifoldlens.report")
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 120


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> list[tuple[str, list[str], int]]:
    """``(module imported, names taken from it, line)`` for every import in ``name``, at any
    depth (inside functions too), resolved to modules of the package where they are."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            if target in MODULES:
                sub = [n for n in names if f"{target}.{n}" in MODULES]
                found += [(f"{target}.{n}", [], node.lineno) for n in sub]
                rest = [n for n in names if n not in sub]
                if rest:
                    found.append((target, rest, node.lineno))
            else:
                found.append((target, names, node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}


def test_the_layout_is_parsed():
    assert {"manifoldlens.jacobian", "manifoldlens.viz", "manifoldlens.commands",
            "manifoldlens.flows.layers", "manifoldlens._utils"} <= set(MODULES)


def test_no_import_cycle():
    # a package's __init__ gathers its modules for users; edges into it are edges to them
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if t == PACKAGE:  # the top-level __init__ re-exports; nothing may import it
                pytest.fail(f"{m} imports the package itself")
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in MODULES:
        if m not in state and m != PACKAGE:
            visit(m)


def test_no_module_borrows_a_private_name():
    bad = []
    for m in MODULES:
        for target, names, line in _imports(m):
            if not target.startswith(PACKAGE) or target in (f"{PACKAGE}._utils",
                                                             f"{PACKAGE}._checks"):
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != m:
                bad.append(f"{MODULES[m].relative_to(SRC)}:{line} imports {private} from "
                           f"{target}")
    assert not bad, "\n".join(bad)


def test_library_modules_never_draw():
    bad = []
    for m in MODULES:
        if m.startswith(TOP) or m == PACKAGE:
            continue
        for target, _, line in _imports(m):
            if target.split(".")[0] == "matplotlib" or target.startswith(f"{PACKAGE}.viz") or (
                    target.startswith(TOP)):
                bad.append(f"{MODULES[m].relative_to(SRC)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_sizes():
    big = []
    for path in MODULES.values():
        source = path.read_text()
        n = len(source.splitlines())
        if n > MAX_MODULE_LINES:
            big.append(f"{path.relative_to(SRC)}: {n} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    big.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}(): "
                               f"{length} lines")
    assert not big, "\n".join(big)


def test_architecture_doc_names_every_module():
    doc = (SRC.parent / "docs" / "architecture.md").read_text()
    missing = [m for m in MODULES if m != PACKAGE and m.rpartition(".")[2] not in doc]
    assert not missing, f"docs/architecture.md does not mention {missing}"
