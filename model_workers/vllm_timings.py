"""Stage timings of one vLLM request (engine queue, prefill, first decode step) from vLLM's RequestStateStats."""

from __future__ import annotations

from cluster.contracts.stage_timing import ENGINE_QUEUE, FIRST_DECODE, PREFILL, Timings


def first_token_timings(stats) -> Timings:
    """Engine queue and prefill from vLLM's per-request stats (engine-core monotonic timestamps; absent when vLLM
    logs no stats): queued -> scheduled -> first token."""
    if stats is None or not (stats.queued_ts and stats.scheduled_ts and stats.first_token_ts):
        return ()
    return (
        (ENGINE_QUEUE, max(0.0, stats.scheduled_ts - stats.queued_ts)),
        (PREFILL, max(0.0, stats.first_token_ts - stats.scheduled_ts)),
    )


def first_decode_timing(stats) -> Timings:
    """The first decode step, when this output is exactly the second token (merged outputs hide its own time)."""
    if stats is None or stats.num_generation_tokens != 2 or not (stats.first_token_ts and stats.last_token_ts):
        return ()
    return ((FIRST_DECODE, max(0.0, stats.last_token_ts - stats.first_token_ts)),)
