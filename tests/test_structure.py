"""The package's shape: an acyclic import graph, library modules independent of the apps, an explicit public API.

The import graph is read from the source with :mod:`ast` (nothing is imported to build it). Two graphs are built:

* **import time**: the imports a module runs when it is imported (module level, including ``try`` / ``if``
  blocks, but not ``if TYPE_CHECKING:``). A cycle here is a circular import, so this graph must be acyclic.
* **all**: every intra-package import, also those deferred into functions. No library module may import the
  applications built on it (``diffmem.cli``, ``diffmem.workflows``, ``diffmem.zoo``), not even lazily, and a
  registry is filled at import time: ``diffmem.edits`` imports its kinds, none of its modules defers an import.
"""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "diffmem"
APPS = ("diffmem.cli", "diffmem.__main__", "diffmem.workflows", "diffmem.zoo")
VERBS = ("record", "locate", "apply_edit", "export_edited", "detect", "evaluate", "extraction_attack")


def module_name(path: Path) -> str:
    parts = ["diffmem", *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name (packages by their ``__init__``)."""
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


@dataclass(frozen=True)
class Import:
    target: str
    line: int
    at_import_time: bool


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(module: str, is_package: bool, node: ast.ImportFrom, known: set[str]) -> list[str]:
    """The package modules an ``from ... import ...`` statement loads."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    if not prefix.startswith("diffmem"):
        return []
    # ``from pkg import name`` loads ``pkg.name`` when that is a module, else only ``pkg``
    targets = [f"{prefix}.{alias.name}" for alias in node.names if f"{prefix}.{alias.name}" in known]
    return targets or [prefix]


def imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    """Intra-package imports of one module, each marked as run at import time or deferred."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, top)
            return  # the body never runs
        if isinstance(node, ast.Import):
            found.extend(Import(a.name, node.lineno, top) for a in node.names if a.name.startswith("diffmem"))
        elif isinstance(node, ast.ImportFrom):
            found.extend(Import(t, node.lineno, top) for t in _resolve(module, is_package, node, known))
        deferred = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, top and not deferred)

    visit(tree, True)
    return found


def import_graph(at_import_time_only: bool) -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = {i.target for i in imports_of(name, path, known) if i.at_import_time or not at_import_time_only}
        graph[name] = {t for t in edges if t in known and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def is_app(module: str) -> bool:
    return any(module == app or module.startswith(app + ".") for app in APPS)


# -----------------------------------------------------------------------------------------------------------------


def test_the_graph_sees_the_imports_it_should() -> None:
    graph = import_graph(at_import_time_only=True)
    assert {"diffmem.edits.base", "diffmem.errors"} <= graph["diffmem.edits.mask"]  # relative imports
    assert "diffmem.score" in graph["diffmem.evaluation"]  # ``from .score import X`` loads the subpackage
    assert "diffmem.edits.mask" in graph["diffmem.edits"]  # a package's ``from .mask import X``
    assert "diffmem.cli" in graph["diffmem.__main__"]  # absolute imports


def test_imports_of_a_hand_made_module(tmp_path) -> None:
    source = tmp_path / "x.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import diffmem.a\n"
        "from . import b, not_a_module\n"
        "from .pkg.c import thing\n"
        "if TYPE_CHECKING:\n"
        "    from .d import D\n"
        "def f():\n"
        "    from .e import E\n"
    )
    known = {"diffmem", "diffmem.a", "diffmem.b", "diffmem.pkg", "diffmem.pkg.c", "diffmem.d", "diffmem.e"}
    found = {(i.target, i.at_import_time) for i in imports_of("diffmem.x", source, known)}
    assert found == {("diffmem.a", True), ("diffmem.b", True), ("diffmem.pkg.c", True), ("diffmem.e", False)}


def test_find_cycle_reports_the_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a2"}, "a2": set(), "x": {"y"}, "y": {"x"}}) == ["x", "y", "x"]


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph(at_import_time_only=True))
    assert cycle is None, "circular import: " + " -> ".join(cycle or [])


def test_the_edits_package_defers_no_import_and_never_imports_the_locators() -> None:
    """The edit kinds register when ``diffmem.edits`` is imported; the locators build on edits, not the reverse."""
    modules = package_modules()
    known = set(modules)
    edits = {name: path for name, path in modules.items() if (name + ".").startswith("diffmem.edits.")}
    deferred = [f"{name}:{imp.line} imports {imp.target}" for name, path in edits.items()
                for imp in imports_of(name, path, known) if not imp.at_import_time]
    assert not deferred, "deferred imports in diffmem.edits: " + "; ".join(deferred)
    graph = import_graph(at_import_time_only=False)
    assert all("diffmem.localization" not in graph[name] for name in edits)
    assert "diffmem.edits" in graph["diffmem.localization"]


def test_library_never_imports_the_apps() -> None:
    modules = package_modules()
    known = set(modules)
    offences = [
        f"{name}:{imp.line} imports {imp.target}"
        for name, path in modules.items()
        if not is_app(name)
        for imp in imports_of(name, path, known)
        if is_app(imp.target)
    ]
    assert not offences, "library modules import the applications: " + "; ".join(offences)


def test_all_is_explicit_and_every_name_imports() -> None:
    import diffmem

    tree = ast.parse((PACKAGE_DIR / "__init__.py").read_text(encoding="utf-8"))
    assigned = [n for n in tree.body if isinstance(n, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)]
    assert len(assigned) == 1, "diffmem/__init__.py assigns __all__ exactly once"
    names = list(diffmem.__all__)
    assert len(names) == len(set(names)), "__all__ lists a name twice"
    assert all(isinstance(n, str) and not n.startswith("_") or n == "__version__" for n in names)
    assert set(VERBS) <= set(names)
    for name in names:
        value = getattr(diffmem, name)
        assert value is not None, name
    for verb in VERBS:
        assert callable(getattr(diffmem, verb)), verb
    assert sorted(dir(diffmem)) == sorted(names)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        diffmem.not_a_name  # noqa: B018


@pytest.mark.parametrize("module", sorted(m for m in package_modules() if not is_app(m)))
def test_every_library_module_imports_and_lists_what_it_defines(module: str) -> None:
    mod = importlib.import_module(module)
    for name in getattr(mod, "__all__", []):
        assert hasattr(mod, name), f"{module}.__all__ lists {name!r}, which it does not define"


# The layers of the library, from the bottom: a module may import its own layer and the layers below it, never one
# above (imports deferred into functions included). The applications (cli, workflows, zoo) sit on top of all.
STAGES = (
    ("diffmem", "diffmem.errors", "diffmem.files", "diffmem.targets", "diffmem.metrics", "diffmem.score",
     "diffmem.modelcard"),
    ("diffmem.pipelines", "diffmem.sampling", "diffmem.config", "diffmem.stats", "diffmem.parallel", "diffmem.data",
     "diffmem.quality", "diffmem.objective"),
    ("diffmem.recording", "diffmem.edits", "diffmem.detection", "diffmem.detectors", "diffmem.reextraction_result",
     "diffmem.reextraction"),
    ("diffmem.localization", "diffmem.evaluation", "diffmem.extraction", "diffmem.resume"),
    ("diffmem.crossfit",),
    ("diffmem.mitigation",),
)
MAX_LINES = 600


def stage_of(module: str) -> int:
    """The layer of ``module`` (its top-level unit, e.g. ``diffmem.edits`` for ``diffmem.edits.mask``)."""
    unit = ".".join(module.split(".")[:2])
    for k, names in enumerate(STAGES):
        if unit in names:
            return k
    return len(STAGES) if is_app(module) else -1


def test_every_library_module_has_a_stage() -> None:
    missing = sorted(m for m in package_modules() if stage_of(m) < 0)
    assert not missing, "modules without a stage in STAGES: " + ", ".join(missing)


def test_no_import_cycle_even_through_deferred_imports() -> None:
    cycle = find_cycle(import_graph(at_import_time_only=False))
    assert cycle is None, "import cycle (deferred imports included): " + " -> ".join(cycle or [])


def test_no_module_imports_a_later_stage() -> None:
    modules = package_modules()
    known = set(modules)
    offences = [
        f"{name}:{imp.line} imports {imp.target}"
        for name, path in modules.items()
        for imp in imports_of(name, path, known)
        if stage_of(imp.target) > stage_of(name)
    ]
    assert not offences, "imports of a later stage: " + "; ".join(offences)


def test_no_file_is_over_the_size_a_reader_can_hold() -> None:
    long = {str(p.relative_to(PACKAGE_DIR)): n for p in PACKAGE_DIR.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"
