"""``--set dotted.key=value`` overrides and the merging of recipe sections."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from expo_bench.errors import RecipeError


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def yaml_problem(error: yaml.YAMLError) -> str:
    return str(getattr(error, "problem", None) or error)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``dotted.key=value`` (value parsed as YAML; numeric segments index lists) in place."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise RecipeError("--set", [(assignment, "expected dotted.key=value")])
    *parents, leaf = key.split(".")
    node: Any = data
    for depth, part in enumerate(parents):
        where = ".".join(parents[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError("--set", [(where, f"no list item {part!r} (the list has {len(node)})")])
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise RecipeError("--set", [(where, f"is a value, not a section: cannot set {key}")])
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise RecipeError("--set", [(key, f"value {raw!r} is not valid YAML ({yaml_problem(error)})")]) from None
    if isinstance(node, list):
        if not leaf.isdigit() or int(leaf) >= len(node):
            raise RecipeError("--set", [(key, f"no list item {leaf!r} (the list has {len(node)})")])
        node[int(leaf)] = value
    else:
        node[leaf] = value
