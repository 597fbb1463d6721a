"""The routing decision as a pure function: which decoder replica should serve this request.

No Ray, no clocks, no state: the Ray Serve router (serve_router.py), the simulator (benchmarks/router_sim.py)
and the unit tests all call `choose_replica` with what they know.

The score is the estimated work, in prefill-token equivalents, standing between the request and its first
token on that replica:

    score = (prompt tokens - tokens of the prefix the replica already holds)   # what it must still prefill
          + pending prefill tokens of requests already queued there             # what runs before it
          + running sequences x decode_cost_tokens                             # decode steps share the GPU
          + waiting requests x waiting_cost_tokens
          + overcommit_penalty_tokens if the request's new pages exceed the replica's free pages

Queue length alone is the wrong signal for long contexts: one queued 128K-token cold prompt costs more than
fifty short decodes. With work as the score, a holder of the prefix wins while it is not too busy, and an
overloaded holder loses to an idle replica as soon as recomputing the prefix is cheaper than waiting.

Session affinity covers the gap before any KV event arrives (a new conversation, or a turn sent while the
previous one's pages are still being published): among replicas scoring within `session_slack_tokens` of the
best, the session's replica wins. It is the replica this router last sent the session to (`sticky_replica`),
else a rendezvous hash of the session id over the candidates, which every router process computes alike.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

from cluster.contracts.messages import ReplicaLoad


@dataclass(frozen=True)
class PolicyConfig:
    """Weights and thresholds of the score (all in prefill-token equivalents)."""

    decode_cost_tokens: float = 256.0  # one running sequence delays a new prefill like this many prompt tokens
    waiting_cost_tokens: float = 0.0  # per waiting request, on top of its pending prefill tokens
    overcommit_penalty_tokens: float = 65536.0  # the request would have to wait for pages to free up
    min_match_pages: int = 1  # fewer matched pages than this count as no KV information
    session_slack_tokens: float = 8192.0  # how much worse the session's replica may score and still win
    page_size: int = 16  # used when a candidate has not published a load yet

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.min_match_pages < 0:
            raise ValueError("page_size must be >= 1 and min_match_pages >= 0")


@dataclass(frozen=True)
class RouteQuery:
    """What the policy needs to know about the request."""

    prompt_tokens: int
    num_pages: int  # full pages of the prompt (len of its page hashes)
    max_tokens: int = 0
    session_id: str | None = None
    sticky_replica: str | None = None  # where this router last sent the session
    tiebreak: int = 0  # spreads exact ties (e.g. the first page hash or a request counter)


@dataclass(frozen=True)
class Candidate:
    replica_id: str
    matched_pages: int = 0  # leading pages of the prompt this replica holds (KvIndex.longest_prefix)
    load: ReplicaLoad | None = None  # None: not heard from yet (a new replica): scored as idle


@dataclass(frozen=True)
class Decision:
    replica_id: str
    reason: str  # "kv": a prefix holder won, "session": affinity, "load": least work, nothing cached
    cached_tokens: int  # prompt tokens the chosen replica is expected to reuse
    ranked: tuple[str, ...]  # every candidate, best first: the fallback order when the first is full
    scores: tuple[float, ...]  # same order as `ranked`


def _stable_hash(*parts: object) -> int:
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def rendezvous(session_id: str, replica_ids: Sequence[str]) -> str:
    """Highest-random-weight hashing: stable per session, and removing a replica moves only its sessions."""
    return max(replica_ids, key=lambda r: _stable_hash(session_id, r))


def load_tokens(load: ReplicaLoad | None, cfg: PolicyConfig) -> float:
    """Work already on a replica, in prefill-token equivalents."""
    if load is None:
        return 0.0
    return load.pending_prefill_tokens + load.running * cfg.decode_cost_tokens + load.waiting * cfg.waiting_cost_tokens


def _fits_context(c: Candidate, q: RouteQuery) -> bool:
    return c.load is None or c.load.max_model_len <= 0 or q.prompt_tokens + q.max_tokens <= c.load.max_model_len


def score(c: Candidate, q: RouteQuery, cfg: PolicyConfig) -> tuple[float, int]:
    """(estimated work before this request's first token on `c`, prompt tokens `c` would reuse)."""
    page_size = c.load.page_size if c.load is not None and c.load.page_size > 0 else cfg.page_size
    matched = min(c.matched_pages, q.num_pages)
    cached = min(matched * page_size, q.prompt_tokens)
    work = (q.prompt_tokens - cached) + load_tokens(c.load, cfg)
    if c.load is not None and c.load.total_pages > 0:
        need_pages = math.ceil((q.prompt_tokens + q.max_tokens) / page_size) - matched
        if need_pages > c.load.free_pages:
            work += cfg.overcommit_penalty_tokens
    return work, cached


def choose_replica(q: RouteQuery, candidates: Sequence[Candidate], cfg: PolicyConfig = PolicyConfig()) -> Decision:
    """Pick the replica for `q` among `candidates` (at least one)."""
    if not candidates:
        raise ValueError("choose_replica needs at least one candidate")
    # Replicas whose context is too short cannot serve it; if none can, let one refuse it with the real limit.
    pool = [c for c in candidates if _fits_context(c, q)] or list(candidates)

    scored = []
    for c in pool:
        work, cached = score(c, q, cfg)
        # Ties go to the least loaded, then to a per-request hash so simultaneous ties spread out.
        scored.append((work, load_tokens(c.load, cfg), _stable_hash(q.tiebreak, c.replica_id), c, cached))
    scored.sort(key=lambda t: t[:3])
    best_work = scored[0][0]
    has_kv = any(c.matched_pages >= max(cfg.min_match_pages, 1) for c in pool)

    chosen = scored[0]
    reason = "kv" if has_kv and chosen[3].matched_pages >= max(cfg.min_match_pages, 1) else "load"
    if q.session_id is not None:
        ids = [t[3].replica_id for t in scored]
        target = q.sticky_replica if q.sticky_replica in ids else rendezvous(q.session_id, ids)
        for t in scored:
            if t[3].replica_id == target and t[0] <= best_work + cfg.session_slack_tokens:
                if t is not chosen:
                    chosen, reason = t, "session"
                break

    ranked = [chosen] + [t for t in scored if t is not chosen]
    return Decision(
        replica_id=chosen[3].replica_id,
        reason=reason,
        cached_tokens=chosen[4],
        ranked=tuple(t[3].replica_id for t in ranked),
        scores=tuple(t[0] for t in ranked),
    )
