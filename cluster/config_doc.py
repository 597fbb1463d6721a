"""Documentation generated from the config models: the commented default YAML (`g3serve config --defaults`) and
the README's config reference table. Generated, so the docs cannot drift from the code."""

from __future__ import annotations

from collections.abc import Iterator

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from cluster.config import G3ServeConfig


def _submodel(field: FieldInfo) -> type[BaseModel] | None:
    ann = field.annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _scalar(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def commented_yaml(config: BaseModel | None = None, indent: int = 0) -> str:
    """The config as YAML with each field's description as a comment above it."""
    config = config if config is not None else G3ServeConfig()
    lines: list[str] = []
    pad = "  " * indent
    for name, field in type(config).model_fields.items():
        if field.exclude:
            continue
        value = getattr(config, name)
        if field.description:
            lines.append(f"{pad}# {field.description}")
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            lines.append(commented_yaml(value, indent + 1))
        else:
            dumped = value.model_dump(mode="json") if isinstance(value, BaseModel) else _jsonable(value)
            lines.append(f"{pad}{name}: {_scalar(dumped)}")
    return "\n".join(lines)


def _jsonable(value):
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _rows(model: type[BaseModel], defaults: BaseModel, prefix: str = "") -> Iterator[tuple[str, str, str]]:
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        value = getattr(defaults, name)
        sub = _submodel(field)
        if sub is not None and isinstance(value, BaseModel):
            yield from _rows(sub, value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", _scalar(_jsonable(value)), field.description or ""


def markdown_reference() -> str:
    """A Markdown table of every setting: dotted key, default, description."""
    out = ["| key | default | description |", "|---|---|---|"]
    for key, default, desc in _rows(G3ServeConfig, G3ServeConfig()):
        out.append(f"| `{key}` | `{default}` | {desc.replace('|', '/')} |")
    return "\n".join(out)
