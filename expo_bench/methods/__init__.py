"""The method library: every module here defines one method; recipes name them or give an import path."""

from __future__ import annotations

import importlib
import pkgutil

from expo_bench.config_model import closest
from expo_bench.methods.base import REGISTRY, MethodParams, PreferenceMethod, preference_nll

__all__ = ["MethodParams", "PreferenceMethod", "UnknownMethodError", "available_methods", "method_class", "preference_nll"]


class UnknownMethodError(ValueError):
    """A recipe names a method that is neither built in nor importable."""


def available_methods() -> dict[str, type[PreferenceMethod]]:
    """Built-in methods by name, importing every module of this package once."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return dict(sorted(REGISTRY.items()))


def method_class(name: str) -> type[PreferenceMethod]:
    """Resolve a built-in name (``dpo``) or an import path (``my_pkg.my_module:MyMethod``)."""
    builtins = available_methods()
    if name in builtins:
        return builtins[name]
    if ":" not in name and "." not in name:
        raise UnknownMethodError(f"unknown method {name!r}{closest(name, list(builtins))}; built in: {', '.join(builtins)}")
    module_name, _, class_name = name.rpartition(":") if ":" in name else name.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise UnknownMethodError(f"cannot import method {name!r}: {error}") from error
    if not (isinstance(obj, type) and issubclass(obj, PreferenceMethod)):
        raise UnknownMethodError(f"{name!r} is not a subclass of expo_bench.methods.PreferenceMethod")
    return obj
