"""Dispatch and autotuning import each other in one direction only.

``kpt.ops._registry`` imports ``kpt.autotune`` (the lookup) and hands it what it needs through
``kpt.autotune.connect``; the lookup's modules import nothing of ``kpt.ops``; the tuner and the
command line, which run ops, import dispatch. Function-level imports count: they are imports
all the same, only later.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import kpt

ROOT = Path(kpt.__file__).resolve().parent
LOOKUP = ("kpt.autotune", "kpt.autotune.db", "kpt.autotune.provenance", "kpt.autotune.winner")


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _walk(node: ast.AST):
    """``ast.walk``, minus the bodies of ``if TYPE_CHECKING:`` (not imports at run time)."""
    yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            yield from (n for stmt in child.orelse for n in _walk(stmt))
        else:
            yield from _walk(child)


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The kpt modules ``name`` imports anywhere in its body, type-checking blocks aside."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != name}


def _cycle_through(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """A path start -> ... -> start, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_registry_and_autotune_modules_are_in_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "kpt.autotune" in graph["kpt.ops._registry"]  # the test sees the edge it guards
    # Every cycle with the registry and autotune in it passes through an autotune module. (The
    # registry and kpt.ops import each other: all_ops() imports the op packages to register
    # them, a package's own business.)
    checked = [m for m in modules if m.startswith("kpt.autotune")]
    cycles = [c for c in map(lambda m: _cycle_through(m, graph), checked) if c]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
    for name in LOOKUP:
        assert not any(m.startswith("kpt.ops") for m in graph[name]), (name, graph[name])


def test_each_side_imports_first_in_a_fresh_process():
    lookup_alone = ("import sys, kpt.autotune, kpt.autotune.provenance, kpt.autotune.winner; "
                    "assert not [m for m in sys.modules if m.startswith('kpt.ops')]")
    for code in (lookup_alone, "import kpt.ops._registry", "import kpt.autotune.tuner",
                 "import kpt.autotune.cli"):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0, (code, done.stderr[-2000:])
