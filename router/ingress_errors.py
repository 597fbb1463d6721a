"""Every exception the ingress can meet, as the OpenAI error the client gets (status, message, code); the body limit.

`read_body` refuses an oversized request (413) before reading it all.

Engine refusals cross the Ray boundary wrapped: Ray re-raises a replica's exception as a subclass of both
RayTaskError and the original class, with the original in `.cause`. We classify on the original, and show its
message, never Ray's traceback text.
"""

from __future__ import annotations

import logging

from fastapi import Request
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from cluster.contracts.engine_errors import EngineDeadError, EngineOverloadedError, EngineRequestError
from model_workers.gemma3.tokenizer import ChatFormatError
from router.admission import RequestTooLong, RouterOverloaded
from router.openai_api import ApiError
from vision_service.images import ImageInputError

log = logging.getLogger(__name__)
RETRY_AFTER_S = "1"
# A decoder replica that dies before its first delta (killed, OOM, node lost) has streamed nothing, so the
# request is sent again (to a live or restarted replica) instead of failing: at most this many sends.
DECODER_ATTEMPTS = 3


def replica_lost(exc: BaseException) -> bool:
    """The replica serving a call died or became unreachable (killed, OOM, node lost), as opposed to a refusal
    or a bug: such a call may be sent again, to whichever replica Serve has by then. A replica whose engine died
    (EngineDeadError: a lost tensor-parallel rank) is as good as lost: Serve is replacing it."""
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    return isinstance(cause, (RayActorError, EngineDeadError))


def api_error_from_exception(exc: BaseException) -> ApiError:
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    if isinstance(cause, ApiError):
        return cause
    if isinstance(cause, EngineRequestError):
        return ApiError(
            400,
            str(cause.args[0] if cause.args else cause),
            param=getattr(cause, "param", None),
            code="invalid_request",
        )
    if isinstance(cause, ChatFormatError):
        return ApiError(400, str(cause), param="messages", code="invalid_messages")
    if isinstance(cause, ImageInputError):
        return ApiError(cause.status, cause.message, param="messages", code="invalid_image")
    if isinstance(cause, RequestTooLong):
        return ApiError(400, str(cause), param="max_tokens", code="context_length_exceeded")
    if isinstance(cause, RouterOverloaded):
        retry = str(max(1, round(cause.retry_after_s)))
        return ApiError(429, str(cause.args[0]), code="overloaded", headers={"Retry-After": retry})
    if isinstance(cause, (EngineOverloadedError, BackPressureError)):
        msg = str(cause.args[0]) if isinstance(cause, EngineOverloadedError) and cause.args else "server overloaded"
        return ApiError(429, msg, code="overloaded", headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(cause, EngineDeadError):
        return ApiError(
            503,
            f"the decoder replica is being replaced ({cause}); retry shortly",
            headers={"Retry-After": RETRY_AFTER_S},
        )
    if isinstance(cause, (DeploymentUnavailableError, RayActorError)):
        return ApiError(
            503,
            f"a serving replica is unavailable ({type(cause).__name__}); retry shortly",
            headers={"Retry-After": RETRY_AFTER_S},
        )
    log.exception("internal error while serving a request", exc_info=exc)
    return ApiError(500, f"internal server error ({type(cause).__name__})")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` (before reading it all)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes; the limit is {limit}", code="request_too_large")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)
