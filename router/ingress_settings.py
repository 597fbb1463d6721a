"""The `ingress:` section of the g3serve YAML config: the HTTP API's address, auth and guard rails.

User-facing, so pydantic with a description per field. The root config (cluster/config.py) adds the ingress's
`deployment:` (replicas and resources, a composition concern) and hands the ingress only this section.
"""

from __future__ import annotations

import os

from pydantic import Field

from cluster.contracts.settings_base import ConfigSection

API_KEYS_ENV = "G3SERVE_API_KEYS"  # comma-separated keys, added to ingress.api_keys


class IngressSettings(ConfigSection):
    host: str = Field("127.0.0.1", description="HTTP bind address (0.0.0.0 to listen on all interfaces).")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port.")
    api_keys: list[str] | None = Field(
        None,
        description=f"Accepted Bearer API keys; none = no auth. Keys in ${API_KEYS_ENV} (comma-separated) are added.",
    )
    max_body_bytes: int = Field(20 * 2**20, ge=1024, description="Largest request body; larger gets 413.")
    max_images_per_request: int = Field(8, ge=0, description="Most images in one request; more gets 400.")
    max_tokens: int = Field(4096, ge=1, description="Cap on max_tokens / max_completion_tokens; above it 400.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none.")
    request_timeout_s: float = Field(600, gt=0, description="A request running longer is aborted.")
    max_queue: int = Field(
        256, ge=1, description="In-flight requests per ingress replica; beyond it 429 with Retry-After."
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with 429.")
    server_timing: bool = Field(
        True,
        description="Send a W3C Server-Timing header with each answer: the request's time per stage (ms) and its TTFT "
        "(a streamed answer's header has the stages up to the first token).",
    )

    def resolved_api_keys(self) -> tuple[str, ...]:
        """Config keys plus the environment's, read where the app is built (the driver), not in replicas."""
        env = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
        return tuple(dict.fromkeys([*(self.api_keys or []), *env]))
