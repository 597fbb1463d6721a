"""The step channel's wire format: a `StepDeltas` as two frames, an HMAC-SHA256 tag and the pickled batch.

Pickle carries `TokenDelta` objects whole, so fields added to them later travel without changes here. The tag is
checked before unpickling: the ingress's socket listens on a TCP port, and only a peer that was handed the key (in
a `StepChannelRef`, through Ray) can make it unpickle anything.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle

from cluster.contracts.messages import StepDeltas


class BadFrame(ValueError):
    """A message that is not a step batch signed with the channel's key."""


def encode_step(batch: StepDeltas, key: bytes) -> list[bytes]:
    payload = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
    return [hmac.new(key, payload, hashlib.sha256).digest(), payload]


def decode_step(frames: list[bytes], key: bytes) -> StepDeltas:
    if len(frames) != 2:
        raise BadFrame(f"expected 2 frames, got {len(frames)}")
    tag, payload = frames
    if not hmac.compare_digest(tag, hmac.new(key, payload, hashlib.sha256).digest()):
        raise BadFrame("bad HMAC tag")
    batch = pickle.loads(payload)
    if not isinstance(batch, StepDeltas):
        raise BadFrame(f"expected StepDeltas, got {type(batch).__name__}")
    return batch
