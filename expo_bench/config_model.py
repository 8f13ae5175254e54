"""Base for every typed configuration: unknown keys are errors that suggest the closest valid key, and no float
anywhere in a configuration may be infinite or NaN."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer, model_validator
from pydantic_core import PydanticCustomError


def closest(word: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice (ignoring case), or an empty string."""
    by_lower = {choice.lower(): choice for choice in choices}
    match = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.5)
    return f" (did you mean {by_lower[match[0]]!r}?)" if match else ""


def reject_unknown_keys(data: Mapping[Any, Any], valid: Iterable[str], section: str = "") -> None:
    """Raise an ``unknown_key`` error (the recipe's field path then ends in the key) for the first key not in ``valid``."""
    valid = list(valid)
    for key in data:
        if key not in valid:
            listed = ", ".join(valid) if len(valid) <= 40 else ", ".join(sorted(valid))
            raise PydanticCustomError(
                "unknown_key",
                "unknown key {quoted}{where}{hint}; valid keys: {valid}",
                {
                    "key": str(key),
                    "quoted": repr(str(key)),
                    "where": f" for {section}" if section else "",
                    "hint": closest(str(key), valid),
                    "valid": listed,
                },
            )


def reject_non_finite(value: Any, where: str = "") -> None:
    """ValueError naming the first infinite or NaN float inside ``value`` (nested mappings and lists included): free-form
    sections (``Any``) escape pydantic's own check."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where or 'value'} is {value}; expected a finite number")
    if isinstance(value, Mapping):
        for key, item in value.items():
            reject_non_finite(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            reject_non_finite(item, f"{where}[{index}]")


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
"""A Hugging Face hub id: ``name`` or ``owner/name``, never starting with a dot (``./x``, ``../x`` are paths)."""


def hub_id_or_existing_path(value: str) -> str:
    """``value`` if it is an existing local path or has the shape of a hub id; anything else is a path that does not
    exist (``../models/x``, ``/data/tok``, ``a/b/c``), refused here rather than sent to the hub after work began."""
    if Path(value).expanduser().exists() or (HUB_ID.fullmatch(value) and ".." not in value):
        return value
    raise ValueError(f"no such file or folder: {value!r} (a hub id is 'name' or 'owner/name')")


LocalOrHub = Annotated[str, AfterValidator(hub_id_or_existing_path)]
"""A model, tokenizer or dataset named by an existing local path or a hub id."""


class ConfigModel(BaseModel):
    """A frozen pydantic model that rejects unknown keys by name, with a suggestion, and non-finite floats."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    added_later: ClassVar[frozenset[str]] = frozenset()
    """Fields added after results were stored: left out of dumps while at their defaults, so an earlier recipe's
    digests (its evaluations' identities, the recipe hash) stay the same and its stored results are reused."""

    @model_serializer(mode="wrap")
    def _omit_later_defaults(self, handler: SerializerFunctionWrapHandler) -> Any:
        dumped = handler(self)
        if not self.added_later or not isinstance(dumped, dict):
            return dumped
        fields = type(self).model_fields
        return {
            key: value
            for key, value in dumped.items()
            if key not in self.added_later or getattr(self, key) != fields[key].get_default(call_default_factory=True)
        }

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            reject_unknown_keys(data, cls.model_fields)
        return data
