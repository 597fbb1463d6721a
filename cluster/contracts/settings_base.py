"""The one base of every config section: strict pydantic. Unknown keys are errors (a YAML typo must never silently
fall back to a default), sections are frozen once validated (a stage cannot change the config another stage reads;
derived copies go through `model_copy(update=...)`), and pydantic's protected `model_` namespace is off (sections
have `model...` fields)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigSection(BaseModel):
    """A section of the g3serve YAML config; every field carries a `Field(description=...)` for the docs."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())
