"""The package's structure: no import cycles; the analysis side never imports the training loop."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import nasfast

PACKAGE = Path(nasfast.__file__).parent
TRAINING_LOOP = {"nasfast.trainer", "nasfast.engine", "nasfast.engine_deepspeed", "nasfast.checkpointer_train"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(top_level_only: bool) -> dict[str, set[str]]:
    """nasfast module -> the nasfast modules it imports (module level only, or also inside functions)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        deps: set[str] = set()
        for node in nodes:
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("nasfast"):
                    continue
                for alias in node.names:  # `from . import x` imports the module nasfast.x
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() else target)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("nasfast")}
        graph[name] = deps - {name}
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_no_import_cycles_between_modules():
    graph = import_graph(top_level_only=True)
    graph.pop("nasfast", None)  # the package __init__ only re-exports
    cycles = sorted(m for m in graph if m in _reachable(graph, m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_analysis_never_imports_the_training_loop():
    graph = import_graph(top_level_only=False)  # lazy imports inside functions count too
    analysis = [m for m in graph if m.startswith("nasfast.analysis")] + ["nasfast.cli_analysis"]
    assert len(analysis) >= 8
    for module in analysis:
        reached = _reachable(graph, module) & TRAINING_LOOP
        assert not reached, f"{module} imports {sorted(reached)}"


def test_importing_an_analysis_command_leaves_the_trainer_unloaded():
    code = ("import sys, nasfast.cli_analysis, nasfast.analysis.groundtruth, nasfast.analysis.interference; "
            "print(sorted(m for m in sys.modules if m in ('nasfast.trainer', 'nasfast.engine')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
