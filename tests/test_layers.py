"""The package imports downward only, and no module imports itself through others.

Layers, bottom to top (a module may import its own layer and the ones below):
shared conventions (errors, config I/O, console, env, redact, stats) <- policies <- trainers,
advise <- mlflow, report <- sweep, cluster <- the orchestration (api, study, advise.run) <- the CLI.
Lazy imports inside functions count: a circle through one is still a circle.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

import freezelab

PACKAGE = Path(freezelab.__file__).parent

LAYERS = {
    "freezelab": 0,
    "freezelab.errors": 0,
    "freezelab.config_io": 0,
    "freezelab.console": 0,
    "freezelab.env": 0,
    "freezelab.redact": 0,
    "freezelab.stats": 0,
    "freezelab.objectstore": 0,
    "freezelab.policies": 1,
    "freezelab.trainers": 2,
    # `freezelab advise`: its measurements and rules beside the trainers; its
    # orchestration (checks, a Ray task, the MLflow run) with the other orchestration.
    "freezelab.advise": 2,
    "freezelab.advise_run": 5,
    "freezelab.submit": 5,
    "freezelab.mlflow": 3,
    "freezelab.report": 3,
    "freezelab.sweep": 4,
    "freezelab.cluster": 4,
    "freezelab.api": 5,
    "freezelab.study": 5,
    "freezelab.cli": 6,
    "freezelab.__main__": 6,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


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
    for module in import_graph():
        assert any(module == p or module.startswith(p + ".") for p in LAYERS), module


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
    upward = re.escape("freezelab.policies.x (layer 1) imports freezelab.cli (layer 6)")
    with pytest.raises(AssertionError, match=upward):
        test_imports_only_go_down()
    with pytest.raises(AssertionError, match="import circle"):
        test_no_import_circle()
