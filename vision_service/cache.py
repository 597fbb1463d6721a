"""The Redis image-embedding cache: lookups and writes that can never fail a request.

Every Redis call is bounded by short socket timeouts and an overall deadline; any failure is counted, logged,
and answered as "not cached", and for `retry_after_s` afterwards the cache is skipped entirely, so a dead or
slow Redis costs one timeout per interval instead of one per request. Values are `embedding_codec` blobs (no
pickle); a value that fails to decode or does not match the expected shape/dtype is counted, deleted and
reported as a miss, so the caller re-encodes and overwrites it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import torch
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from vision_service.embedded_redis import EmbeddedRedis
from vision_service.embedding_codec import CorruptEntry, decode_embedding, encode_embedding
from vision_service.metrics import VisionMetrics
from vision_service.settings import CacheSettings

log = logging.getLogger(__name__)
_FAILURES = (RedisError, OSError, asyncio.TimeoutError)
_DTYPE_TAG = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

REDIS_URL_ENV = "G3SERVE_REDIS_URL"  # used when cache.redis_url is not set


class EmbeddingCache:
    def __init__(self, settings: CacheSettings, metrics: VisionMetrics):
        self.settings = settings
        self.metrics = metrics
        self._redis: Redis | None = None
        self._embedded: EmbeddedRedis | None = None
        self._down_until = 0.0
        # Bound on one whole operation, on top of the socket timeouts (a connect + a read).
        self._deadline_s = settings.connect_timeout_s + settings.socket_timeout_s

    async def start(self) -> None:
        s = self.settings
        if not s.enabled:
            return
        # No retries inside redis-py: a retry would multiply the timeout we promised to bound.
        common = dict(
            socket_timeout=s.socket_timeout_s,
            socket_connect_timeout=s.connect_timeout_s,
            max_connections=s.max_connections,
            retry=Retry(NoBackoff(), 0),
        )
        # The Kubernetes manifests hand the shared Redis's URL (password from a Secret) to every pod in this variable.
        url = s.redis_url or os.environ.get(REDIS_URL_ENV) or None
        if url is None:
            self._embedded = EmbeddedRedis(s.max_bytes)
            # On the loop thread (blocks it once, briefly): the server's death signal follows the thread that starts it.
            sock = self._embedded.start()
            self._redis = Redis(unix_socket_path=sock, **common)
        else:
            self._redis = Redis.from_url(url, **common)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)
            self._embedded = None

    def key(self, content_hash: str, dtype: torch.dtype) -> str:
        # The dtype is part of the key (not of the content hash): one image has one identity for the prefix
        # cache, but an fp16 and a bf16 deployment sharing a Redis must not read each other's bytes.
        return f"{self.settings.namespace}:{_DTYPE_TAG[dtype]}:{content_hash}"

    def _available(self) -> bool:
        if self._redis is None:
            return False
        if time.monotonic() < self._down_until:
            self.metrics.cache_skipped.inc()
            return False
        return True

    def _failed(self, op: str, e: BaseException) -> None:
        self.metrics.cache_errors.inc()
        self._down_until = time.monotonic() + self.settings.retry_after_s
        log.warning(
            "embedding cache %s failed (%s: %s); serving without cache for %.1fs",
            op,
            type(e).__name__,
            e,
            self.settings.retry_after_s,
        )

    async def get_many(
        self, content_hashes: list[str], shape: tuple[int, ...], dtype: torch.dtype
    ) -> list[torch.Tensor | None]:
        """Cached embeddings in order, None for a miss (or for everything when Redis is unavailable)."""
        out: list[torch.Tensor | None] = [None] * len(content_hashes)
        if not content_hashes or not self._available():
            return out
        keys = [self.key(h, dtype) for h in content_hashes]
        try:
            values = await asyncio.wait_for(self._redis.mget(keys), self._deadline_s)
        except _FAILURES as e:
            self._failed("MGET", e)
            return out
        corrupt = []
        for i, v in enumerate(values):
            if v is None:
                continue
            try:
                out[i] = decode_embedding(v, shape, dtype)
            except CorruptEntry as e:
                self.metrics.cache_corrupt.inc()
                log.warning("rejected corrupt embedding cache entry %s: %s", keys[i], e)
                corrupt.append(keys[i])
        if corrupt:
            await self._delete(corrupt)
        return out

    async def _delete(self, keys: list[str]) -> None:
        try:
            await asyncio.wait_for(self._redis.delete(*keys), self._deadline_s)
        except _FAILURES as e:
            self._failed("DEL", e)

    async def get(self, content_hash: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        return (await self.get_many([content_hash], shape, dtype))[0]

    async def put(self, content_hash: str, embeds: torch.Tensor) -> bool:
        """Store one block's embedding with the TTL; False when skipped or failed (never raises)."""
        if not self._available():
            return False
        blob = encode_embedding(embeds)
        if len(blob) > self.settings.max_entry_bytes:
            return False
        try:
            await asyncio.wait_for(
                self._redis.set(self.key(content_hash, embeds.dtype), blob, ex=self.settings.ttl_s), self._deadline_s
            )
            return True
        except _FAILURES as e:
            self._failed("SET", e)
            return False
