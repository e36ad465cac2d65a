"""The package's structure, from its import graph: no import cycles anywhere (lazy imports inside
functions count), and the layering rule below. A reintroduced cycle or a layer break fails here."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import nasfast

PACKAGE = Path(nasfast.__file__).parent
LEAVES = ("nasfast.allocator", "nasfast.config", "nasfast.errors", "nasfast.files", "nasfast.rng", "nasfast.faults",
          "nasfast.device", "nasfast.distributed")
LOOP = ("nasfast.training.trainer", "nasfast.training.runfolder")  # the loop and the run folder it owns

# The layering rule, written once: a module under the key may not import anything under these prefixes.
# Bottom to top: leaves -> kernels -> space, data -> engines, training -> analysis, nas -> cli.
FORBIDDEN = {
    "nasfast.kernels": ("nasfast.space", "nasfast.data", "nasfast.training", "nasfast.engines", "nasfast.nas",
                        "nasfast.analysis", "nasfast.cli"),
    "nasfast.space": ("nasfast.data", "nasfast.training", "nasfast.engines", "nasfast.nas", "nasfast.analysis",
                      "nasfast.cli"),
    "nasfast.data": ("nasfast.space", "nasfast.training", "nasfast.engines", "nasfast.nas", "nasfast.analysis",
                     "nasfast.cli"),
    "nasfast.engines": (*LOOP, "nasfast.nas", "nasfast.analysis", "nasfast.cli"),
    "nasfast.training": ("nasfast.nas", "nasfast.analysis", "nasfast.cli"),
    "nasfast.analysis": (*LOOP, "nasfast.engines", "nasfast.nas", "nasfast.cli"),
    "nasfast.nas": (*LOOP, "nasfast.engines", "nasfast.cli"),
}


def _modules() -> dict[str, Path]:
    """Every module of the package, nasfast.kernels included (a link to the top-level kernels/)."""
    found = {}
    for root, dirs, files in os.walk(PACKAGE, followlinks=True):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                parts = Path(root, name).relative_to(PACKAGE.parent).with_suffix("").parts
                found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = Path(root, name)
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py" or (PACKAGE.parent / name.replace(".", "/")).is_dir()


def import_graph(top_level_only: bool = False) -> dict[str, set[str]]:
    """nasfast module -> the nasfast modules it imports (module level only, or also inside functions)."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
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
                for alias in node.names:  # `from nasfast.x import y` imports the module nasfast.x.y if there is one
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in MODULES else target)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("nasfast")}
        # importing a package's module runs the package's __init__ first: a real edge too
        deps |= {d.rpartition(".")[0] for d in deps if d.rpartition(".")[0] in MODULES and d.count(".") > 1}
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_graph_sees_the_whole_package():
    graph = import_graph()
    for module in ("nasfast.kernels.registry", "nasfast.kernels.native", "nasfast.space.supernet",
                   "nasfast.training.trainer", "nasfast.engines.deepspeed", "nasfast.cli.app"):
        assert module in graph, module
    assert "nasfast.engines.base" in graph["nasfast.engines.deepspeed"]  # lazy imports are edges


def test_no_import_cycles_anywhere():
    graph = import_graph(top_level_only=False)  # imports inside functions count: they are cycles at run time
    graph.pop("nasfast", None)  # the package __init__ only registers the Auto classes and the old paths
    cycles = sorted(m for m in graph if m in _reachable(graph, m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_layering_rule():
    graph = import_graph(top_level_only=False)
    breaks = []
    for module, deps in graph.items():
        if _under(module, LEAVES):
            breaks += [(module, d) for d in deps if not _under(d, LEAVES)]
        for layer, forbidden in FORBIDDEN.items():
            if _under(module, (layer,)):
                breaks += [(module, d) for d in deps if _under(d, forbidden)]
    assert not breaks, "imports that break the layering rule: " + ", ".join(f"{a} -> {b}" for a, b in sorted(breaks))


def test_nothing_imports_the_cli():
    graph = import_graph(top_level_only=False)
    users = sorted(m for m, deps in graph.items() if not _under(m, ("nasfast.cli", "nasfast.__main__"))
                   and any(_under(d, ("nasfast.cli",)) for d in deps))
    assert not users, users


def test_analysis_never_imports_the_training_loop():
    graph = import_graph(top_level_only=False)
    analysis = [m for m in graph if m.startswith("nasfast.analysis")] + ["nasfast.cli.analysis"]
    assert len(analysis) >= 8
    for module in analysis:
        reached = _reachable(graph, module) & {*LOOP, "nasfast.engines.plain", "nasfast.engines.deepspeed"}
        assert not reached, f"{module} imports {sorted(reached)}"


@pytest.mark.slow
def test_importing_an_analysis_command_leaves_the_trainer_unloaded():
    code = ("import sys, nasfast.cli.analysis, nasfast.analysis.groundtruth, nasfast.analysis.interference; "
            "print(sorted(m for m in sys.modules if m in ('nasfast.training.trainer', 'nasfast.engines.plain')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_long_modules_say_why():
    """No module over ~400 lines without the reason in its docstring."""
    long = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()
            if len(path.read_text().splitlines()) > 420}
    def reason(name: str) -> str:
        return " ".join((ast.get_docstring(ast.parse(MODULES[name].read_text())) or "").split())

    unexplained = [n for n in long if "lines because" not in reason(n)]
    assert not unexplained, {n: long[n] for n in unexplained}


def test_every_subpackage_says_what_it_owns():
    for pkg in ("space", "data", "training", "engines", "nas", "analysis", "cli"):
        doc = ast.get_docstring(ast.parse((PACKAGE / pkg / "__init__.py").read_text())) or ""
        assert len(doc.split()) >= 15, pkg


@pytest.mark.slow
def test_old_module_paths_still_import_for_one_release():
    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning); import nasfast\n"
            "import nasfast.space.supernet as new\n"
            "try:\n    import nasfast.supernet\nexcept DeprecationWarning as w:\n    print(w)\n"
            "warnings.simplefilter('ignore', DeprecationWarning)\n"
            "import nasfast.supernet as old, nasfast.trainer, nasfast.backend\n"
            "print(old is new, nasfast.backend.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.splitlines() == ["nasfast.supernet moved to nasfast.space.supernet; the old path is removed in nasfast 0.3",
                                       "True nasfast.kernels.registry"], out.stderr


@pytest.mark.slow
def test_old_names_of_the_space_and_data_modules_still_import():
    code = ("import warnings; warnings.simplefilter('ignore', DeprecationWarning)\n"
            "from nasfast.space import SearchSpace; from nasfast.data import build_corpus\n"
            "from nasfast.space import supernet\n"  # a submodule stays a submodule
            "print(SearchSpace.__module__, build_corpus.__module__, supernet.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["nasfast.space.searchspace", "nasfast.data.blocks", "nasfast.space.supernet"], out.stderr


@pytest.mark.slow
def test_renamed_classes_still_import_for_one_release():
    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            "from nasfast.space.candidates import AttentionModule, MultiHeadAttention\n"
            "from nasfast.nas.search import BudgetSampler\n"
            "warnings.simplefilter('ignore', DeprecationWarning)\n"
            "from nasfast.space.candidates import AttentionCandidate, FeedForwardCandidate, ConvCandidate\n"
            "from nasfast.nas.search import Sampler\n"
            "import nasfast.space.candidates as c\n"
            "print(AttentionCandidate is AttentionModule, ConvCandidate is c.SeparableConvModule, Sampler is BudgetSampler)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["True", "True", "True"], out.stderr
