"""The `router:` section of the g3serve YAML config (user-facing, so pydantic with a description per field).

The runtime pieces take frozen dataclasses built from it: `PolicyConfig` (policy.py) for the score weights,
`PoolSpec` (admission.py) for the long-context pools, and the hub/serve-router knobs passed as
`request_router_kwargs`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cluster.contracts.settings_base import ConfigSection
from router.policy import PolicyConfig


class PoolSettings(ConfigSection):
    name: str = Field(description='Pool name, e.g. "short" or "long"; its decoder deployment is "decoder-<name>".')
    max_context: int = Field(
        ge=16, description="Largest prompt + max_tokens this pool serves (its replicas' max_model_len)."
    )
    num_replicas: int = Field(1, ge=1, description="Decoder replicas in this pool.")
    kv_cache_bytes: int | None = Field(
        None,
        gt=0,
        description="KV cache bytes per replica, which the pool admits by; default: the engine's own (native: "
        "kv_cache_bytes, else kv_cache_fraction; vLLM: engine.vllm.kv_cache_bytes or cpu_kv_cache_space_gib, one of "
        "which is then required).",
    )


class RouterSettings(ConfigSection):
    enabled: bool = Field(True, description="Route decoder requests by KV prefix; false = the `fallback` router.")
    fallback: Literal["power_of_two", "round_robin"] = Field(
        "power_of_two", description="Router used when `enabled` is false: Ray's power-of-two choices or round robin."
    )
    decode_cost_tokens: float = Field(
        256.0, ge=0, description="Prefill-token equivalents one running sequence costs a new request on its replica."
    )
    waiting_cost_tokens: float = Field(
        0.0, ge=0, description="Extra prefill-token equivalents per waiting request (beyond its pending prompt)."
    )
    overcommit_penalty_tokens: float = Field(
        65536.0, ge=0, description="Penalty when a request's new KV pages exceed the replica's free pages."
    )
    min_match_pages: int = Field(1, ge=0, description="Fewer matched pages than this count as no KV information.")
    session_slack_tokens: float = Field(
        8192.0,
        ge=0,
        description="A conversation stays on its replica (user / x-session-id) while that replica scores at most "
        "this many prefill tokens worse than the best.",
    )
    session_map_size: int = Field(100_000, ge=1, description="Sessions remembered per router (bounded LRU).")
    index_max_pages: int = Field(
        2_000_000, ge=1, description="Page hashes kept in each router's KV index; the oldest are dropped beyond."
    )
    predict_on_route: bool = Field(
        True, description="Count a request's pages as held by its replica as soon as it is sent (before events)."
    )
    poll_interval_s: float = Field(0.1, gt=0, description="How often each router pulls KV events from the hub.")
    publish_interval_s: float = Field(
        0.1, gt=0, description="How often each decoder replica publishes its KV events and load to the hub."
    )
    inflight_ttl_s: float = Field(
        2.0, gt=0, description="How long the router counts prefill it sent but the replica's load does not show yet."
    )
    hub_log_size: int = Field(
        100_000, ge=16, description="KV events the hub keeps for routers to catch up; older routers resync."
    )
    pools: list[PoolSettings] = Field(
        default_factory=list,
        description="Decoder pools by max context (e.g. short 8K, long 128K); empty = one pool, the decoder.",
    )
    admission_queue_size: int = Field(
        256, ge=0, description="Requests waiting for KV capacity per pool; beyond it 429."
    )
    admission_timeout_s: float = Field(30.0, gt=0, description="Longest wait for KV capacity before 429.")

    @model_validator(mode="after")
    def _pools_unique(self) -> RouterSettings:
        names = [p.name for p in self.pools]
        if len(names) != len(set(names)):
            raise ValueError(f"router.pools: duplicate pool names {names}")
        return self

    def policy_config(self, page_size: int = 16) -> PolicyConfig:
        return PolicyConfig(
            decode_cost_tokens=self.decode_cost_tokens,
            waiting_cost_tokens=self.waiting_cost_tokens,
            overcommit_penalty_tokens=self.overcommit_penalty_tokens,
            min_match_pages=self.min_match_pages,
            session_slack_tokens=self.session_slack_tokens,
            page_size=page_size,
        )

    def request_router_kwargs(self, page_size: int = 16) -> dict:
        """JSON-able kwargs for `RequestRouterConfig(request_router_kwargs=...)` (KvAwareRequestRouter)."""
        return {
            "policy": self.policy_config(page_size).__dict__.copy(),
            "session_map_size": self.session_map_size,
            "index_max_pages": self.index_max_pages,
            "predict_on_route": self.predict_on_route,
            "poll_interval_s": self.poll_interval_s,
            "inflight_ttl_s": self.inflight_ttl_s,
        }
