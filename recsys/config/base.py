"""The pieces every config section is built from: strict frozen models and the error type."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

PositiveInt = Annotated[int, Field(gt=0)]


class ConfigError(ValueError):
    """A configuration problem, with the file and key that caused it."""


class Strict(BaseModel):
    """Unknown keys are refused and a loaded config cannot change under a run."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Named(Strict):
    """A YAML list of these may hold bare names (`- C1`) as shorthand for `{name: C1}`."""

    name: str

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value
