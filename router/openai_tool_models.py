"""The OpenAI API's tool-calling shapes (pydantic): tool definitions, tool_choice, an assistant's calls in the
history, and the calls in a response or a streamed chunk. Used by router/openai_api.py's request and response models.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class FunctionCallIn(_Request):
    name: str
    arguments: str = "{}"  # a JSON object, as OpenAI sends it


class ToolCallIn(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class FunctionDef(_Request):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=64)  # a Python name: calls are Python-style
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ToolDef(_Request):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class FunctionCallOut(BaseModel):
    name: str | None = None
    arguments: str = ""


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ToolCallDelta(ToolCallOut):
    index: int
