"""The method library: every module here defines one method; recipes name them or give an import path."""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

from expo_bench.config_model import closest
from expo_bench.methods.base import REGISTRY, MethodParams, PreferenceMethod, preference_nll

__all__ = [
    "MethodParams",
    "PreferenceMethod",
    "UnknownMethodError",
    "available_methods",
    "default_label",
    "method_class",
    "preference_nll",
]


class UnknownMethodError(ValueError):
    """A recipe names a method that is neither built in nor importable."""


def available_methods() -> dict[str, type[PreferenceMethod]]:
    """Built-in methods by name, importing every module of this package once."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return dict(sorted(REGISTRY.items()))


def default_label(method: type[PreferenceMethod]) -> str:
    """A method's row name when the recipe gives none: its own ``name``, else its class name (a subclass of a
    built-in does not inherit the built-in's row)."""
    return str(method.__dict__.get("name", method.__name__))


def method_class(name: str) -> type[PreferenceMethod]:
    """Resolve a built-in name (``dpo``) or an import path (``my_pkg.my_module:MyMethod``)."""
    builtins = available_methods()
    if name in builtins:
        return builtins[name]
    if ":" not in name and "." not in name:
        raise UnknownMethodError(f"unknown method {name!r}{closest(name, list(builtins))}; built in: {', '.join(builtins)}")
    module_name, _, class_name = name.rpartition(":") if ":" in name else name.rpartition(".")
    # The user's package in the directory they run from: ``python -m`` puts it on the path, a console script does
    # not. Appended, so it never shadows an installed package.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise UnknownMethodError(f"cannot import method {name!r}: {error}") from error
    if not (isinstance(obj, type) and issubclass(obj, PreferenceMethod)):
        raise UnknownMethodError(f"{name!r} is not a subclass of expo_bench.methods.PreferenceMethod")
    own = default_label(obj)
    if own in builtins and builtins[own] is not obj:
        raise UnknownMethodError(f"{name!r} calls itself {own!r}, the name of a built-in method: rename it (its name attribute)")
    return obj
