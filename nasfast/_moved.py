"""Old flat module paths (``nasfast.supernet``, ``nasfast.trainer``, ``nasfast.backend`` ...) kept
importable for one release after the 0.2 restructure: ``import nasfast.supernet`` returns the module
``nasfast.space.supernet`` itself (same objects, so isinstance checks and old pickles still work) and
warns once with the new path. README's changelog lists every move; this goes away in 0.3."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings

MOVED = {
    "alignment": "space.alignment", "backend": "kernels.registry", "candidates": "space.candidates",
    "checkpointer": "training.checkpointer", "cli_analysis": "cli.analysis", "cli_common": "cli.common",
    "cli_nas": "cli.nas", "datasources": "data.sources", "engine": "engines.plain",
    "engine_deepspeed": "engines.deepspeed", "evaluation": "space.evaluation", "export": "nas.export",
    "finetune": "nas.finetune", "hf_model": "nas.hf_model", "loader": "data.loader", "metrics": "training.metrics",
    "native": "kernels.native", "optim": "training.optim", "prepare": "data.prepare",
    "runfolder": "training.runfolder", "samplers": "space.samplers", "search": "nas.search",
    "supernet": "space.supernet", "trainer": "training.trainer", "zero_child": "engines.zero_child",
}
# nasfast.space, nasfast.data and nasfast.cli are packages now; their old module contents moved to
# nasfast.space.searchspace, nasfast.data.blocks and nasfast.cli.app (the first two forward their old
# names with forward_old_names below; nasfast.cli keeps main). nasfast.checkpoint was split
# (atomic writes -> nasfast.files, RNG state -> nasfast.rng, raw load -> training.checkpointer).


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.partition(".")
        if prefix == "nasfast" and name in MOVED:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        new = "nasfast." + MOVED[spec.name.partition(".")[2]]
        warnings.warn(f"{spec.name} moved to {new}; the old path is removed in nasfast 0.3",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module) -> None:  # the new module is already executed
        pass


def install() -> None:
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())


def forward_old_names(package: str, module: str) -> object:
    """A package's ``__getattr__`` for the names its old same-named module had (PEP 562):
    ``from nasfast.space import SearchSpace`` still works for one release, with a warning."""
    def __getattr__(name: str):
        if name.startswith("__") or importlib.util.find_spec(f"{package}.{name}") is not None:
            raise AttributeError(name)  # a submodule: let the import system load it
        target = importlib.import_module(module)
        if not hasattr(target, name):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        warnings.warn(f"{package}.{name} moved to {module}.{name}; the old path is removed in nasfast 0.3",
                      DeprecationWarning, stacklevel=2)
        return getattr(target, name)

    return __getattr__


def renamed(module: str, names: dict[str, str], name: str) -> object:
    """The body of a module ``__getattr__`` for names renamed in place: ``names[name]`` with a warning."""
    if name not in names:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(f"{module}.{name} is now {module}.{names[name]}; the old name is removed in nasfast 0.3",
                  DeprecationWarning, stacklevel=3)
    return getattr(sys.modules[module], names[name])
