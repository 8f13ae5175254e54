"""What ``expo-bench methods``, ``recipes`` and ``schema`` print, read from the typed definitions themselves so that
it never disagrees with what a recipe accepts: each method's hyperparameters with their defaults and bounds, one
line per shipped recipe, and every recipe field with its default, type and documentation, as commented YAML."""

from __future__ import annotations

import ast
import functools
import inspect
import itertools
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from expo_bench.errors import UserError

if TYPE_CHECKING:  # the methods and the recipe import PyTorch: `expo-bench recipes` reads files only
    from expo_bench.methods import PreferenceMethod
    from expo_bench.recipe import Experiment
    from expo_bench.train_config import TrainConfig

WIDTH = 80
BOUNDS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "min_length": "length ≥"}


def bounds(field: FieldInfo) -> str:
    """``> 0, < 0.5``: the numeric and length constraints a field declares."""
    found = [
        f"{symbol} {getattr(item, name):g}" for item in field.metadata for name, symbol in BOUNDS.items() if hasattr(item, name)
    ]
    return ", ".join(found)


def type_text(annotation: Any) -> str:
    """``float | None``, ``'keep_end' | 'keep_start'``, ``list[int]``, a model's class name."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return type_text(args[0])
    if origin is Literal:
        return " | ".join(repr(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_text(arg) for arg in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_text(arg) for arg in args)}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


@functools.cache
def attribute_docs(model: type) -> dict[str, str]:
    """Each field's docstring (the string literal right under it), read from the class's source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(model)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for field, after in itertools.pairwise(body):
        if (
            isinstance(field, ast.AnnAssign)
            and isinstance(field.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[field.target.id] = inspect.cleandoc(after.value.value)
    return docs


def field_doc(model: type[BaseModel], name: str) -> str:
    """A field's docstring from the class that declares it (or a base)."""
    return next((doc for cls in model.__mro__ if (doc := attribute_docs(cls).get(name))), "")


def summary(obj: Any) -> str:
    """The first paragraph of an object's docstring, on one line."""
    return " ".join((inspect.getdoc(obj) or "").split("\n\n")[0].split())


def default_of(field: FieldInfo) -> Any:
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return None if field.default is PydanticUndefined else field.default


def yaml_value(value: Any) -> str:
    """A value as it would be written in a recipe, on one line (a text of several lines by its length)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, str) and "\n" in value:
        return f"<a text of {len(value)} characters>"
    return yaml.safe_dump(value, default_flow_style=True, width=10_000, allow_unicode=True).strip().removesuffix("\n...")


# --- expo-bench methods --------------------------------------------------------------------------------------


def method_lines(name: str, method: type[PreferenceMethod]) -> list[str]:
    """A method's name and what it is, what the recipe's λ sets, and each hyperparameter's default and bounds."""
    module = inspect.getmodule(method)
    lines = textwrap.wrap(f"{name}: {summary(module) or summary(method)}", WIDTH, subsequent_indent="    ")
    fields = method.Params.model_fields
    if method.regularization is None:
        lam = "nothing (reference-free: no λ grid)" if method.reference_free else "nothing (no λ grid)"
    else:
        lam = f"{method.regularization} ({bounds(fields[method.regularization]) or 'any'})"
    lines.append(f"  λ sets {lam}" + ("; no reference model" if method.reference_free and method.regularization else ""))
    params = [
        f"{field}={yaml_value(default_of(info))}" + (f" ({b})" if (b := bounds(info)) else "") for field, info in fields.items()
    ]
    lines += textwrap.wrap("params: " + ", ".join(params), WIDTH, initial_indent="  ", subsequent_indent="    ")
    return lines


def methods_text() -> str:
    from expo_bench.methods import available_methods

    blocks = ["\n".join(method_lines(name, method)) for name, method in available_methods().items()]
    footer = (
        "A recipe names a method by its name or by an import path (my_package.my_module:MyMethod, found from the "
        "working directory). gamma (a margin) and length_normalize are the SimPO-style modifiers every pairwise "
        "method takes; the recipe's lam grid sets each method's λ field, the same λ the paper writes for every method."
    )
    return "\n\n".join([*blocks, textwrap.fill(footer, WIDTH)])


# --- expo-bench recipes --------------------------------------------------------------------------------------


def shipped_recipes() -> Path:
    """``recipes/`` of the working directory if it has one, else of the checkout this package lives in."""
    here = Path("recipes")
    return here if here.is_dir() else Path(__file__).resolve().parent.parent / "recipes"


def recipe_line(path: Path) -> str:
    """The first sentence of a recipe's leading comment."""
    comment = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    return " ".join(comment).split(". ")[0].rstrip(".")


def recipes_text(folder: Path | None = None, width: int = WIDTH) -> str:
    """One line per recipe, its description shortened only where ``width`` (the terminal's) is too narrow."""
    folder = folder or shipped_recipes()
    paths = sorted(folder.glob("*.yaml"))
    if not paths:
        raise UserError(f"no recipes (*.yaml) in {folder}")
    names = max(len(path.name) for path in paths)
    lines = [f"recipes in {folder}:"]
    for path in paths:
        lead = f"  {path.name:<{names}}  "
        lines.append(lead + textwrap.shorten(recipe_line(path), max(width, WIDTH) - len(lead), placeholder="…"))
    lines.append("expo-bench validate RECIPE --print-config: one resolved, with every default.")
    return "\n".join(lines)


# --- --print-config -----------------------------------------------------------------------------------------


def resolved_yaml(experiment: Experiment) -> str:
    """The recipe as it will run, as YAML: every default filled in, each method's hyperparameters complete (less
    those its grid or λ list sets) and its budget in full where it overrides the recipe's (a grid over ``train.``
    settings keeps them in its grid)."""
    data = experiment.recipe.model_dump(mode="json")
    data["task"] = {"kind": data["task"].pop("kind"), **data["task"]}
    for index, entry in enumerate(data["methods"]):
        run = next(run for run in experiment.runs if run.entry == index)
        swept = set(entry["grid"]) | ({run.method.regularization} if entry["lam"] or data["lam"] else set())
        entry["params"] = run.grid[0].model_dump(mode="json", exclude={name for name in swept if name})
        entry["train"] = _budget(
            run.train, experiment.recipe.train, {name for name in entry["grid"] if name.startswith("train.")}
        )
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=WIDTH, default_flow_style=None)


def _budget(own: TrainConfig, recipes: TrainConfig, swept: set[str]) -> dict[str, Any]:
    """A method's whole budget where it overrides the recipe's (apart from the ``train.`` settings its grid sweeps)."""

    def without_swept(train: TrainConfig) -> dict[str, Any]:
        budget = train.model_dump(mode="json")
        for dotted in swept:
            *parents, leaf = dotted.removeprefix("train.").split(".")
            node = budget
            for part in parents:
                node = node[part]
            node.pop(leaf, None)
        return budget

    mine = without_swept(own)
    return {} if mine == without_swept(recipes) else mine


class _Dumper(yaml.SafeDumper):
    """Texts of several lines (a judge's template) as literal blocks, as a person writes them."""


_Dumper.add_representer(
    str, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)
)


# --- expo-bench schema ---------------------------------------------------------------------------------------


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The config models an annotation admits (through Optional, unions, Annotated and list items)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if origin is Annotated:
        return _models(args[0])
    if origin in (Union, types.UnionType, list):
        return [model for arg in args for model in _models(arg)]
    return []


def _kind(model: type[BaseModel]) -> str | None:
    """The ``kind`` a member of a discriminated union answers to."""
    field = model.model_fields.get("kind")
    return None if field is None or get_origin(field.annotation) is not Literal else str(get_args(field.annotation)[0])


def _comment(text: str, pad: str) -> Iterator[str]:
    for paragraph in text.split("\n\n"):
        yield from textwrap.wrap(" ".join(paragraph.split()), WIDTH, initial_indent=f"{pad}# ", subsequent_indent=f"{pad}# ")


def _kinds_lines(path: str, members: list[type[BaseModel]], pad: str) -> Iterator[str]:
    yield from _comment(f"one of these kinds; expo-bench schema {path}.<kind> shows its fields:", pad)
    for member in members:
        yield from textwrap.wrap(
            f"{_kind(member)}: {summary(member)}", WIDTH, initial_indent=f"{pad}#   ", subsequent_indent=f"{pad}#     "
        )


def schema_lines(model: type[BaseModel], path: str, pad: str = "") -> Iterator[str]:
    """Every field of ``model`` as commented YAML: its doc above it, then ``name: default  # type, bounds``."""
    kind = _kind(model)
    if kind is not None:
        yield f"{pad}kind: {kind}"
    for name, field in model.model_fields.items():
        if name == "kind" and kind is not None:
            continue
        where = f"{path}.{name}" if path else name
        members = _models(field.annotation)
        default = default_of(field)
        expand = members and len(members) == 1 and (field.is_required() or isinstance(default, BaseModel))
        doc = field_doc(model, name)
        if members and not expand:
            doc += f"{chr(10) * 2 if doc else ''}Its fields: expo-bench schema {where}"
        yield from _comment(doc, pad)
        required = "required, " if field.is_required() else ""
        hint = type_text(field.annotation) + (f", {b}" if (b := bounds(field)) else "")
        if not expand:
            value = "" if field.is_required() else f" {yaml_value(default)}"
            yield f"{pad}{name}:{value}  # {required}{hint}"
        elif get_origin(field.annotation) is list:
            yield f"{pad}{name}:  # {required}{hint}"
            yield from _list_item(schema_lines(members[0], where, pad + "    "))
        else:
            yield f"{pad}{name}:  # {required}{hint}"
            yield from schema_lines(members[0], where, pad + "  ")


def _list_item(lines: Iterator[str]) -> Iterator[str]:
    """A list item's fields: the first field line starts with ``- ``, the others line up under it."""
    first = True
    for line in lines:
        if first and not line.lstrip().startswith("#"):
            indent = len(line) - len(line.lstrip())
            line, first = f"{line[: indent - 2]}- {line[indent:]}", False
        yield line


def section(path: str) -> tuple[type[BaseModel] | list[type[BaseModel]], str]:
    """The model (or the kinds of a discriminated union) at a dotted path such as ``task.hh.evaluation``."""
    from expo_bench.recipe import Recipe

    current: type[BaseModel] | list[type[BaseModel]] = Recipe
    walked: list[str] = []
    for part in [part for part in path.split(".") if part]:
        if isinstance(current, list):
            by_kind = {_kind(member): member for member in current}
            if part not in by_kind:
                raise UserError(f"schema: {'.'.join(walked)} has kinds {', '.join(map(str, by_kind))}, not {part!r}")
            current = by_kind[part]
        else:
            field = current.model_fields.get(part)
            members = [] if field is None else _models(field.annotation)
            if not members:
                sections = [name for name, info in current.model_fields.items() if _models(info.annotation)]
                where = ".".join(walked) or "the recipe"
                raise UserError(f"schema: {where} has no section {part!r}; its sections: {', '.join(sections)}")
            current = members if len(members) > 1 else members[0]
        walked.append(part)
    return current, ".".join(walked)


def schema_text(path: str = "") -> str:
    found, where = section(path)
    if isinstance(found, list):
        return "\n".join(_kinds_lines(where, found, ""))
    lines = list(_comment(f"{where or 'a recipe'}: {summary(found)}", ""))
    keys = [part for part in where.split(".") if part and part not in {_kind(model) for model in _all_kinds()}]
    lines += [f"{'  ' * depth}{key}:" for depth, key in enumerate(keys)]
    return "\n".join([*lines, *schema_lines(found, where, "  " * len(keys))])


def _all_kinds() -> list[type[BaseModel]]:
    """Every member of a discriminated union anywhere in the recipe."""
    found: list[type[BaseModel]] = []

    def walk(model: type[BaseModel]) -> None:
        for field in model.model_fields.values():
            for member in _models(field.annotation):
                if member not in found:
                    found.append(member)
                    walk(member)

    from expo_bench.recipe import Recipe

    walk(Recipe)
    return [member for member in found if _kind(member) is not None]
