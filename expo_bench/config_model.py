"""Base for every typed configuration: unknown keys are errors that suggest the closest valid key."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError


def closest(word: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice (ignoring case), or an empty string."""
    by_lower = {choice.lower(): choice for choice in choices}
    match = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.5)
    return f" (did you mean {by_lower[match[0]]!r}?)" if match else ""


class ConfigModel(BaseModel):
    """A frozen pydantic model that rejects unknown keys by name, with a suggestion."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            valid = list(cls.model_fields)
            for key in data:
                if key not in valid:
                    raise PydanticCustomError(
                        "unknown_key",
                        "unknown key {quoted}{hint}; valid keys: {valid}",
                        {"key": str(key), "quoted": repr(str(key)), "hint": closest(str(key), valid), "valid": ", ".join(valid)},
                    )
        return data
