"""vLLM's KV-cache events -> the router's `KvEvent`: subscribe to vLLM's ZMQ publisher, re-key its blocks.

vLLM publishes `BlockStored` / `BlockRemoved` / `AllBlocksCleared` (vllm/distributed/kv_events.py) for every
KV-cache group of its hybrid manager. The router only tracks global-layer pages (a sliding-window page says nothing
about whether a long prefix is still there), so only the full-attention group is kept; when a model has several
full-attention groups (same hashes, other layers) the lowest-numbered one stands for all.

vLLM's block hashes are not ours: the router keys pages with `cluster.contracts.prefix_hash.page_hashes` (blake2b chain over
token ids + image content hashes). Each `BlockStored` carries what is needed to recompute our key: the blocks'
token ids, the parent block's vLLM hash (whose key we computed when it was stored, so the chain continues), and per
block the `(mm_identifier, offset-in-block)` of every image overlapping it. The engine passes our image content
hashes as vLLM's multimodal UUIDs, so `mm_identifier` *is* our content hash and the image mixing matches too.
A block whose parent we never saw (stored before we subscribed) cannot be re-keyed and is skipped, with its
descendants in that event.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable

from cluster.contracts.messages import ImageSpan, KvEvent
from cluster.contracts.prefix_hash import ROOT_HASH, page_hashes

log = logging.getLogger(__name__)


class KvEventTranslator:
    """Keeps the vLLM-hash -> our-hash map of live global-layer blocks and turns vLLM events into `KvEvent`s."""

    def __init__(self, replica_id: str, page_size: int, global_group: int, image_length: Callable[[str], int]):
        self.replica_id = replica_id
        self.page_size = page_size
        self.global_group = global_group
        self._image_length = image_length
        self._ours: dict[object, int] = {}
        self.skipped_blocks = 0

    def translate(self, events: Iterable[object]) -> KvEvent | None:
        from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

        stored: list[int] = []
        removed: list[int] = []
        cleared = False
        for ev in events:
            if isinstance(ev, AllBlocksCleared):
                self._ours.clear()
                stored, removed, cleared = [], [], True
            elif isinstance(ev, BlockStored) and self._is_global(ev.group_idx):
                stored.extend(self._store(ev))
            elif isinstance(ev, BlockRemoved) and self._is_global(ev.group_idx):
                removed.extend(h for h in (self._ours.pop(b, None) for b in ev.block_hashes) if h is not None)
        if not (stored or removed or cleared):
            return None
        return KvEvent(self.replica_id, tuple(stored), tuple(removed), cleared)

    def _is_global(self, group_idx: int | None) -> bool:
        return group_idx is None or group_idx == self.global_group

    def _store(self, ev) -> list[int]:
        if ev.block_size != self.page_size:
            raise ValueError(f"vLLM block size {ev.block_size} != router page size {self.page_size}")
        if ev.parent_block_hash is None:
            parent = ROOT_HASH
        elif ev.parent_block_hash in self._ours:
            parent = self._ours[ev.parent_block_hash]
        else:
            self.skipped_blocks += len(ev.block_hashes)
            return []
        out = []
        extra = ev.extra_keys or [None] * len(ev.block_hashes)
        for i, vhash in enumerate(ev.block_hashes):
            tokens = ev.token_ids[i * self.page_size : (i + 1) * self.page_size]
            images = self._images(extra[i])
            parent = page_hashes(tokens, self.page_size, images, parent=parent)[0]
            self._ours[vhash] = parent
            out.append(parent)
        return out

    def _images(self, keys) -> tuple[ImageSpan, ...]:
        """Image spans relative to the block from vLLM's untagged extra keys: `(mm_identifier, start - block_start)`
        pairs (LoRA names and cache salts are bare strings and ignored)."""
        if not keys:
            return ()
        spans = []
        for k in keys:
            if isinstance(k, (tuple, list)) and len(k) == 2 and isinstance(k[1], int):
                ident = str(k[0])
                spans.append(ImageSpan(offset=k[1], length=self._image_length(ident), content_hash=ident))
        return tuple(spans)


class ZmqKvEventSubscriber:
    """A daemon thread on a ZMQ SUB socket that queues vLLM's decoded event batches (the engine drains them).

    The SUB socket *binds* (on 127.0.0.1 only) and vLLM's publisher connects to `self.endpoint`: vLLM binds only
    wildcard endpoints (`tcp://*:port`, every interface) and connects to a concrete address, so binding here keeps
    the events off the network and lets port 0 pick a free port without a race.
    """

    def __init__(self, port: int = 0):
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        self._decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.setsockopt(zmq.RCVTIMEO, 200)  # wake up regularly to notice close()
        self._sock.bind(f"tcp://127.0.0.1:{port or '*'}")
        self.endpoint = self._sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._events: deque = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="g3serve-vllm-kv-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import zmq

        while not self._stop.is_set():
            try:
                _topic, _seq, payload = self._sock.recv_multipart()
            except zmq.Again:
                continue
            except zmq.ZMQError:
                return
            try:
                self._events.extend(self._decoder.decode(payload).events)
            except Exception:  # a malformed batch must not kill the subscriber
                log.exception("undecodable vLLM KV event batch")

    def drain(self) -> list[object]:
        out = []
        while self._events:
            out.append(self._events.popleft())
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close(linger=0)
        self._ctx.term()
