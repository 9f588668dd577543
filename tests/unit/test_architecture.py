"""The layering, read from the source: which of our modules imports which.

Arrows point one way, `cluster -> pipelines -> models`; the registry and the config schema
are leaves the strategies build on; no strategy package reaches into another. Every
`import` statement counts, those inside functions too: a late import is still a
dependency, and a late import that closes a circle only hides it.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("cluster", "pipelines", "models")
STRATEGY_PACKAGES = ("ps", "lbfgs", "pipeline_parallel", "diloco")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The module of ours that `name` (a module or a name inside one) is, if any."""
    while name:
        if name in modules():
            return name
        name = name.rpartition(".")[0]
    return None


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree` but those under `if TYPE_CHECKING:` (read by type checkers only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


@lru_cache(maxsize=None)
def imports(module: str) -> frozenset[str]:
    """Our modules that `module` imports at run time, anywhere in it."""
    found = set()
    for node in _runtime_nodes(ast.parse(modules()[module].read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pipelines import data` imports the module pipelines.data
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(m for m in map(_resolve, names) if m and m != module)
    return frozenset(found)


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_module_list_is_read():
    assert {"pipelines.registry", "pipelines.config", "pipelines.strategies.ps.strategy",
            "cluster.cli", "models.mlp"} <= set(modules())
    assert "pipelines.strategies.base" in imports("pipelines.strategies.ps.strategy")


def test_no_import_cycles():
    """Depth-first search over the import graph; every cycle found is reported."""
    graph = {m: imports(m) for m in modules()}
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_models_import_nothing_of_ours_but_models():
    bad = {m: sorted(i for i in imports(m) if not _in(i, "models"))
           for m in modules() if _in(m, "models")}
    assert {m: i for m, i in bad.items() if i} == {}


def test_pipelines_never_import_cluster():
    bad = {m: sorted(i for i in imports(m) if _in(i, "cluster"))
           for m in modules() if _in(m, "pipelines")}
    assert {m: i for m, i in bad.items() if i} == {}


@pytest.mark.parametrize("leaf, allowed", [
    ("pipelines.registry", set()),
    ("pipelines.errors", set()),
    ("pipelines.startup", set()),
    ("pipelines.yaml_files", {"pipelines.errors"}),
    ("pipelines.values", {"pipelines.errors"}),
    ("pipelines.user_code", set()),
    # A user's model is a kind of model section: its schema reads its import path.
    ("pipelines.imported_model", {"models", "pipelines.errors", "pipelines.values", "pipelines.user_code"}),
    # The sequence settings are a section of the schema, in a file of their own.
    ("pipelines.sequence_config", set()),
    ("pipelines.optim_config", set()),
    ("pipelines.config", {"models", "pipelines.registry", "pipelines.errors", "pipelines.yaml_files",
                          "pipelines.values", "pipelines.imported_model", "pipelines.sequence_config",
                          "pipelines.optim_config", "pipelines.recipes"}),
    # The recipes are defaults laid under a config's dict: they read YAML, not the schema.
    ("pipelines.recipes", {"pipelines.errors", "pipelines.values", "pipelines.yaml_files"}),
])
def test_leaves_stay_leaves(leaf, allowed):
    outside = {i for i in imports(leaf) if not any(_in(i, a) for a in allowed)}
    assert outside == set(), f"{leaf} imports {sorted(outside)}"


def test_a_strategy_package_imports_no_other_strategy():
    strategies = {name: f"pipelines.strategies.{name}" for name in
                  (*STRATEGY_PACKAGES, "local", "allreduce")}
    bad = {}
    for name, package in strategies.items():
        for module in (m for m in modules() if _in(m, package)):
            others = [i for i in imports(module)
                      if any(_in(i, p) for n, p in strategies.items() if n != name)]
            if others:
                bad[module] = others
    assert bad == {}


def test_shared_machinery_imports_no_strategy():
    """`training/`, the run, its context, storage and tracking serve every strategy alike."""
    shared = [m for m in modules() if _in(m, "pipelines") and not _in(m, "pipelines.strategies")
              and not _in(m, "pipelines.sweep") and m != "pipelines.registry"]
    bad = {m: sorted(i for i in imports(m) if _in(i, "pipelines.strategies")
                     and i != "pipelines.strategies.base")
           for m in shared}
    assert {m: i for m, i in bad.items() if i} == {}


def test_cluster_names_no_strategy():
    """The command line goes through the registry: it imports no strategy and compares no
    value with a strategy's name."""
    from pipelines import registry

    names = set(registry.BUILTIN)
    bad = []
    for module in (m for m in modules() if _in(m, "cluster")):
        bad += [f"{module} imports {i}" for i in imports(module) if _in(i, "pipelines.strategies")]
        for node in ast.walk(ast.parse(modules()[module].read_text())):
            if isinstance(node, ast.Compare):
                constants = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                bad += [f"{module}:{node.lineno} compares with {c!r}" for c in constants if c in names]
    assert bad == []


def test_modules_stay_small():
    """One concept per file: none past about 400 lines."""
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
