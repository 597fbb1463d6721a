"""The errors a decoder engine raises before its first delta, which the API maps to HTTP statuses (400 / 429).

Shared by the engines (which raise them) and the ingress and batch job (which answer them), so neither side
imports the other for them.
"""

from __future__ import annotations


class EngineRequestError(ValueError):
    """The engine refused a request (too long, bad parameters): the API answers 400 with this message."""


class EngineOverloadedError(RuntimeError):
    """The engine's waiting queue is full: the API answers 429 with Retry-After."""
