"""The package imports downward only, and no module imports itself through others.

Layers, bottom to top (a module may import its own layer and the ones below):
the shared conventions (errors, config I/O, console, env, logs, progress, ...) <- policies
<- trainers, advise <- mlflow <- report, cluster <- sweep <- the orchestration (api, study,
submit, advise_run) <- the CLI. Every module is declared: a package's entry covers its
submodules, and a new top-level module fails until it is given a layer here (and in the
README's table). Lazy imports inside functions count: a circle through one is still a circle.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

import freezelab

PACKAGE = Path(freezelab.__file__).parent

ROOT = "freezelab"
# A package's entry covers its submodules; the root's entry is its __init__ alone.
LAYERS = {
    "freezelab": 0,
    "freezelab.errors": 0,
    "freezelab.config_io": 0,
    "freezelab.console": 0,
    "freezelab.env": 0,
    "freezelab.logs": 0,
    "freezelab.progress": 0,
    "freezelab.redact": 0,
    "freezelab.stats": 0,
    "freezelab.objectstore": 0,
    "freezelab.policies": 1,
    "freezelab.trainers": 2,
    # advise's measurements and its search's plan and ranking; `freezelab advise` itself
    # (the search's Tune trials) is advise_run.
    "freezelab.advise": 2,
    "freezelab.mlflow": 3,
    "freezelab.report": 4,
    # the checks a multi-node run makes (storage, tracking) and the cluster templates
    "freezelab.cluster": 4,
    "freezelab.sweep": 5,
    "freezelab.api": 6,
    "freezelab.study": 6,
    "freezelab.study_trials": 6,
    "freezelab.study_config": 6,
    "freezelab.study_selection": 6,
    "freezelab.submit": 6,
    "freezelab.advise_run": 6,
    "freezelab.cli": 7,
    "freezelab.__main__": 7,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def declared_as(module: str) -> str | None:
    """The LAYERS entry that covers ``module``: its own, or its package's (never the root's)."""
    covering = [p for p in LAYERS if module == p or (p != ROOT and module.startswith(p + "."))]
    return max(covering, key=len, default=None)


def layer_of(module: str) -> int:
    return LAYERS[declared_as(module)]


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """freezelab modules that ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from freezelab.trainers import checkpoint` imports a module too.
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name in modules:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: imports_of(path, modules) - {name} for name, path in files.items()}


def test_every_module_has_a_layer():
    undeclared = sorted(m for m in import_graph() if declared_as(m) is None)
    assert not undeclared, (
        f"no layer for {', '.join(undeclared)}: add each to LAYERS in tests/test_layers.py "
        "(a module, or its package) and to the README's layer table"
    )


def test_imports_only_go_down():
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in import_graph().items()
        for target in targets
        # A package's face (__init__) re-exports its own modules.
        if layer_of(target) > layer_of(module) and not target.startswith(module + ".")
    ]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    graph = import_graph()
    # A package's __init__ importing its own submodules is how packages work; only
    # imports between modules can make a circle.
    edges = {
        m: {t for t in targets if not t.startswith(m + ".") and not m.startswith(t + ".")}
        for m, targets in graph.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (circle := visit(target)):
                return circle
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state and (circle := visit(module)):
            raise AssertionError("import circle: " + " -> ".join(circle))


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    # The walker itself: a lower layer importing a higher one is found.
    fake = tmp_path / "freezelab"
    (fake / "policies").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "policies" / "__init__.py").write_text("")
    (fake / "policies" / "x.py").write_text("def f():\n    from freezelab.cli import main\n")
    (fake / "cli.py").write_text("from freezelab.policies import x\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    graph = import_graph()
    assert graph["freezelab.policies.x"] == {"freezelab.cli"}
    upward = re.escape("freezelab.policies.x (layer 1) imports freezelab.cli (layer 7)")
    with pytest.raises(AssertionError, match=upward):
        test_imports_only_go_down()
    with pytest.raises(AssertionError, match="import circle"):
        test_no_import_circle()


def test_a_module_without_a_layer_is_named(tmp_path, monkeypatch):
    # No catch-all: a new top-level module (or package) fails until it is declared.
    fake = tmp_path / "freezelab"
    (fake / "gadgets").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "errors.py").write_text("")
    (fake / "newthing.py").write_text("")
    (fake / "gadgets" / "__init__.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(
        AssertionError, match=r"no layer for freezelab\.gadgets, freezelab\.newthing"
    ):
        test_every_module_has_a_layer()
