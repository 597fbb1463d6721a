"""The errors a decoder engine raises, which the API maps to HTTP statuses (400 / 429 before the first delta; 503 or
a retry for a dead engine).

Shared by the engines (which raise them) and the ingress and batch job (which answer them), so neither side
imports the other for them.
"""

from __future__ import annotations


class EngineRequestError(ValueError):
    """The engine refused a request (too long, bad parameters): the API answers 400 with this message (and `param`,
    the request field at fault, when the engine knows it)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # keep `param` across Ray's pickling (the default rebuilds from args alone)
        return type(self), (self.args[0], self.param)


class EngineOverloadedError(RuntimeError):
    """The engine's waiting queue is full: the API answers 429 with Retry-After."""


class EngineDeadError(RuntimeError):
    """The engine lost a part it cannot serve without (a tensor-parallel rank, vLLM's engine core): it refuses every
    request from now on and its replica reports itself unhealthy, so Serve replaces it. A request that got this
    before anything was streamed may be sent again (the API retries it, else answers 503 with Retry-After)."""
