"""Router simulator: prefix hit rate and modeled TTFT of five routing policies on one multi-turn workload.

No model, no Ray: N decoder replicas of Gemma 3 27B (TP=8 on 80 GB GPUs) with the global-layer KV capacity
computed from the model config, each an LRU prefix cache of global pages and a FIFO server whose prefill time
comes from a FLOP model. The same arrival trace (conversations x turns, prompts growing to 32K-128K tokens,
some with images) is replayed under each router:

- round_robin, p2c (power of two choices on queue length: Ray Serve's default),
- text_tree: what Ray Serve LLM's PrefixCacheAffinityRouter does by default (a prefix tree on the prompt text,
  images dropped, updated on routing, no eviction knowledge, longest match wins, then the shorter queue),
- ours: router/policy.py with router/kv_index.py fed by KvEvents and loads that arrive `--lag-s` late,
  router/load_view.py counting recent sends, session affinity, page hashes from cluster/contracts/prefix_hash.py,
- oracle: exact caches and exact queues at decision time, minimum modeled TTFT.

    python benchmarks/router_sim.py [--quick] [--conversations 2000] [--replicas 8] [--load 0.8]
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from cluster.contracts.messages import ImageSpan, KvEvent, ReplicaLoad
from cluster.contracts.prefix_hash import page_hashes
from router.admission import KvGeometry
from router.kv_index import KvIndex
from router.load_view import LoadView
from router.policy import Candidate, PolicyConfig, RouteQuery, choose_replica

IMAGE_TOKEN = 262144  # Gemma 3's image soft token: identical for every image


@dataclass(frozen=True)
class Replica27B:
    """Gemma 3 27B on one TP=8 replica of 80 GB GPUs."""

    layers: int = 62
    global_every: int = 6
    kv_heads: int = 16
    head_dim: int = 128
    q_dim: int = 32 * 128
    window: int = 1024
    dtype_bytes: int = 2
    params: float = 27e9
    weights_bytes: float = 54e9
    gpus: int = 8
    gpu_bytes: float = 80e9
    mem_util: float = 0.9
    activation_bytes_per_gpu: float = 2e9
    max_num_seqs: int = 64  # each running sequence keeps one window in every local layer
    peak_flops_per_gpu: float = 989e12  # H100 bf16 dense
    mfu: float = 0.3
    decode_s_per_token: float = 0.0004  # marginal cost of one more sequence in a batched decode step

    @property
    def geometry(self) -> KvGeometry:
        return KvGeometry.from_model(
            self.layers, self.global_every, self.window, self.kv_heads, self.head_dim, self.dtype_bytes
        )

    def global_kv_tokens(self) -> int:
        g = self.geometry
        budget = self.gpus * (self.gpu_bytes * self.mem_util - self.activation_bytes_per_gpu) - self.weights_bytes
        local = self.max_num_seqs * g.num_local_layers * g.sliding_window * g.kv_bytes_per_token_layer
        return int((budget - local) // (g.num_global_layers * g.kv_bytes_per_token_layer))

    def prefill_s(self, new: int, cached: int) -> float:
        g = self.geometry
        ctx_global = new * (cached + new / 2)
        ctx_local = new * min(self.window, cached + new)
        flops = 2 * self.params * new + 4 * self.q_dim * (
            g.num_global_layers * ctx_global + g.num_local_layers * ctx_local
        )
        return flops / (self.gpus * self.peak_flops_per_gpu * self.mfu)

    def prefill_tokens_per_s(self) -> float:
        return self.gpus * self.peak_flops_per_gpu * self.mfu / (2 * self.params)


@dataclass
class Conversation:
    cid: int
    hashes: list[int]  # pages of the whole conversation (prompts + answers), images mixed in
    text_hashes: list[int]  # the same pages hashed without image content (what a text-only tree sees)
    prompt_ends: list[int]  # prompt length of each turn
    outputs: list[int]  # answer length of each turn
    start: float


def make_workload(
    n_conv: int, page: int, seed: int, image_frac: float = 0.3, shared_doc_frac: float = 0.3, turns: int = 8
) -> list[Conversation]:
    rng = np.random.default_rng(seed)
    systems = [rng.integers(1, 262_000, int(rng.integers(1024, 2048))) for _ in range(4)]
    templates = [rng.integers(1, 262_000, 64) for _ in range(8)]  # "What is shown in this image? ..." prompts
    # Two popular shared documents (a handbook, a code base) that many conversations start from: hot prefixes.
    shared_docs = [rng.integers(1, 262_000, 24_576) for _ in range(2)]
    convs = []
    for cid in range(n_conv):
        total = int(rng.integers(32_768, 131_072))
        parts = [systems[cid % 4]]
        images: list[ImageSpan] = []
        has_image = rng.random() < image_frac
        if has_image:
            for _ in range(int(rng.integers(1, 3))):
                images.append(ImageSpan(sum(map(len, parts)), 256, f"img-{cid}-{len(images)}"))
                parts.append(np.full(256, IMAGE_TOKEN))
            parts.append(templates[int(rng.integers(0, 8))])
        elif rng.random() < shared_doc_frac:
            parts.append(shared_docs[int(rng.integers(0, 2))])
        prefix = sum(map(len, parts))
        outputs = [int(x) for x in rng.integers(100, 600, turns)]
        rest = total - prefix - sum(outputs[:-1])
        # A text conversation opens with a long document; an image one with just the images and a template question.
        weights = [0.0] + [1 / (turns - 1)] * (turns - 1) if has_image else [0.4] + [0.6 / (turns - 1)] * (turns - 1)
        prompt_ends, pos = [], prefix
        for k in range(turns):
            user = int(rest * weights[k])
            parts.append(rng.integers(1, 262_000, user))
            pos += user
            prompt_ends.append(pos)
            parts.append(rng.integers(1, 262_000, outputs[k]))
            pos += outputs[k]
        tokens = np.concatenate(parts).tolist()
        convs.append(
            Conversation(cid, page_hashes(tokens, page, images), page_hashes(tokens, page), prompt_ends, outputs, 0.0)
        )
    return convs


class ReplicaSim:
    """One replica: an LRU of global pages and a FIFO server (prefill, then its decode steps)."""

    def __init__(self, rid: str, capacity_pages: int) -> None:
        self.rid, self.capacity = rid, capacity_pages
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.free_at = 0.0
        self.busy_s = 0.0
        self.jobs: deque[tuple[float, float, float, float, int, int]] = (
            deque()
        )  # assign, start, pf_end, end, tok, pages

    def cached_prefix(self, hashes: list[int]) -> int:
        n = 0
        while n < len(hashes) and hashes[n] in self.cache:
            n += 1
        return n

    def store(self, hashes: list[int]) -> tuple[list[int], list[int]]:
        stored, evicted = [], []
        for h in hashes:
            if h in self.cache:
                self.cache.move_to_end(h)
            else:
                self.cache[h] = None
                stored.append(h)
                if len(self.cache) > self.capacity:
                    evicted.append(self.cache.popitem(last=False)[0])
        return stored, evicted

    def load_at(self, t: float, page: int) -> ReplicaLoad:
        while self.jobs and self.jobs[0][3] < t - 60:
            self.jobs.popleft()
        waiting = running = pending = used = 0
        for assign, start, pf_end, end, tokens, pages in self.jobs:
            if assign <= t < end:
                waiting += t < start
                running += start <= t
                pending += tokens if t < pf_end else 0
                used += pages
        return ReplicaLoad(self.rid, running, waiting, max(self.capacity - used, 0), self.capacity, page, pending)

    def queue_len(self, t: float) -> int:
        return sum(1 for j in self.jobs if j[0] <= t < j[3])


class Router:
    def __init__(self, name: str, replicas: list[ReplicaSim], page: int, seed: int) -> None:
        self.name, self.replicas, self.page = name, replicas, page
        self.rng = random.Random(seed)
        self.rr = 0

    def choose(self, conv: Conversation, n_pages: int, prompt: int, turn: int, now: float) -> int:
        raise NotImplementedError

    def on_events(self, now: float) -> None:
        """Deliver whatever this router would have received by `now`."""


class RoundRobin(Router):
    def choose(self, conv, n_pages, prompt, turn, now):
        self.rr += 1
        return self.rr % len(self.replicas)


class PowerOfTwo(Router):
    def choose(self, conv, n_pages, prompt, turn, now):
        i, j = self.rng.sample(range(len(self.replicas)), 2)
        return i if self.replicas[i].queue_len(now) <= self.replicas[j].queue_len(now) else j


class TextTree(Router):
    """Ray Serve LLM's PrefixCacheAffinityRouter defaults: imbalanced_threshold=inf, match_rate_threshold=0.1."""

    def __init__(self, *a) -> None:
        super().__init__(*a)
        self.tree = KvIndex(max_pages=10**12)

    def choose(self, conv, n_pages, prompt, turn, now):
        ids = [str(i) for i in range(len(self.replicas))]
        matched = self.tree.longest_prefix(conv.text_hashes[:n_pages], ids)
        best = max(matched.values(), default=0)
        if best * self.page / prompt < 0.1:
            sizes = {r: self.tree.pages_of(r) for r in ids}
            chosen = [int(r) for r in ids if sizes[r] == min(sizes.values())]
        else:
            chosen = [int(r) for r, m in matched.items() if m == best]
        i = min(chosen, key=lambda k: (self.replicas[k].queue_len(now), self.rng.random()))
        self.tree.add(str(i), conv.text_hashes[:n_pages])
        return i


class Oracle(Router):
    def __init__(self, *a, hw: Replica27B) -> None:
        super().__init__(*a)
        self.hw = hw

    def choose(self, conv, n_pages, prompt, turn, now):
        def ttft(k):
            r = self.replicas[k]
            cached = min(r.cached_prefix(conv.hashes[:n_pages]) * self.page, prompt)
            return max(r.free_at - now, 0) + self.hw.prefill_s(prompt - cached, cached), self.rng.random()

        return min(range(len(self.replicas)), key=ttft)


class Ours(Router):
    def __init__(self, *a, cfg: PolicyConfig, lag_s: float, period_s: float, index_pages: int) -> None:
        super().__init__(*a)
        self.cfg, self.lag_s, self.period_s = cfg, lag_s, period_s
        self.index = KvIndex(max_pages=index_pages)
        self.loads = LoadView(inflight_ttl_s=lag_s + 2 * period_s, report_lag_s=lag_s)
        self.sticky: OrderedDict[int, str] = OrderedDict()
        self.pending: list[tuple[float, int, KvEvent]] = []
        self.seq = 0
        self.last_snapshot = -1.0

    def publish(self, stamp: float, event: KvEvent) -> None:
        self.seq += 1
        heapq.heappush(self.pending, (stamp + self.lag_s, self.seq, event))

    def on_events(self, now):
        while self.pending and self.pending[0][0] <= now:
            self.index.apply(heapq.heappop(self.pending)[2])
        snap = (now - self.lag_s) // self.period_s * self.period_s
        if snap > self.last_snapshot and snap >= 0:
            self.last_snapshot = snap
            for r in self.replicas:
                self.loads.report(r.load_at(snap, self.page), now=snap + self.lag_s)

    def choose(self, conv, n_pages, prompt, turn, now):
        ids = [r.rid for r in self.replicas]
        hashes = conv.hashes[:n_pages]
        matched = self.index.longest_prefix(hashes, ids)
        cands = [Candidate(r, matched.get(r, 0), self.loads.get(r, now)) for r in ids]
        q = RouteQuery(prompt, n_pages, conv.outputs[turn], str(conv.cid), self.sticky.get(conv.cid), hashes[0])
        d = choose_replica(q, cands, self.cfg)
        self.sticky[conv.cid] = d.replica_id
        self.sticky.move_to_end(conv.cid)
        if len(self.sticky) > 100_000:
            self.sticky.popitem(last=False)
        self.index.add(d.replica_id, hashes)  # predict: the replica stores these pages as it prefills
        new_pages = n_pages - matched.get(d.replica_id, 0) + conv.outputs[turn] // self.page
        self.loads.on_send(d.replica_id, prompt - d.cached_tokens, new_pages, now)
        return ids.index(d.replica_id)


def simulate(router: Router, convs: list[Conversation], hw: Replica27B, page: int, think_s: float, seed: int):
    rng = random.Random(seed)
    heap = [(c.start, c.cid, 0) for c in convs]
    heapq.heapify(heap)
    ttfts, prompt_tok, cached_tok = [], 0, 0
    while heap:
        now, cid, turn = heapq.heappop(heap)
        conv = convs[cid]
        prompt = conv.prompt_ends[turn]
        n_pages = prompt // page
        router.on_events(now)
        k = router.choose(conv, n_pages, prompt, turn, now)
        r = router.replicas[k]
        start = max(now, r.free_at)
        hit = r.cached_prefix(conv.hashes[:n_pages])
        cached = min(hit * page, prompt)
        pf = hw.prefill_s(prompt - cached, cached)
        end = start + pf + conv.outputs[turn] * hw.decode_s_per_token
        r.free_at, r.busy_s = end, r.busy_s + end - start
        total_pages = (prompt + conv.outputs[turn]) // page
        r.jobs.append((now, start, start + pf, end, prompt - cached, total_pages - hit))
        for stamp, pages in ((start + pf, conv.hashes[:n_pages]), (end, conv.hashes[n_pages:total_pages])):
            stored, evicted = r.store(pages)
            if isinstance(router, Ours) and (stored or evicted):
                router.publish(stamp, KvEvent(r.rid, stored=tuple(stored), removed=tuple(evicted)))
        ttfts.append(start + pf - now)
        prompt_tok += prompt
        cached_tok += cached
        if turn + 1 < len(conv.prompt_ends):
            heapq.heappush(heap, (end + rng.expovariate(1 / think_s), cid, turn + 1))
    busy = [r.busy_s for r in router.replicas]
    q = statistics.quantiles(ttfts, n=100)
    span = max(r.free_at for r in router.replicas) - min(c.start for c in convs)
    return {
        "util": sum(busy) / (len(busy) * span),
        "hit": cached_tok / prompt_tok,
        "p50": q[49],
        "p99": q[98],
        "imbalance": max(busy) / statistics.mean(busy),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="300 conversations (under a minute)")
    ap.add_argument("--conversations", type=int, default=2000)
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--load", type=float, default=0.8, help="utilization if nothing were cached")
    ap.add_argument("--think-s", type=float, default=None, help="mean think time between turns (60 s; 15 s quick)")
    ap.add_argument("--page-size", type=int, default=256, help="tokens per page (coarser than the engine's: speed)")
    ap.add_argument("--lag-s", type=float, default=0.5, help="KV event / load delay seen by our router")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n_conv = 300 if args.quick else args.conversations
    if args.think_s is None:  # a short run needs short pauses to reach a steady load
        args.think_s = 15.0 if args.quick else 60.0
    hw, page = Replica27B(), args.page_size
    kv_tokens = hw.global_kv_tokens()
    capacity = kv_tokens // page
    t0 = time.perf_counter()
    convs = make_workload(n_conv, page, args.seed)
    # Same offered load for every router: arrivals spread so that uncached work fills `load` of the replicas.
    work = sum(
        hw.prefill_s(p, 0) + o * hw.decode_s_per_token
        for c in convs
        for p, o in zip(c.prompt_ends, c.outputs, strict=True)
    )
    # Conversations last ~8 think times after they start: subtract that so the offered load is about `load`.
    horizon = max(work / (args.replicas * args.load) - 8 * args.think_s, 0.25 * work / (args.replicas * args.load))
    arr = random.Random(args.seed + 1)
    for c in convs:
        c.start = arr.uniform(0, horizon)
    tokens_per_s = hw.prefill_tokens_per_s()
    mean_out = statistics.mean(o for c in convs for o in c.outputs)
    cfg = PolicyConfig(
        decode_cost_tokens=mean_out * hw.decode_s_per_token * tokens_per_s,
        session_slack_tokens=8192,
        page_size=page,
    )
    print(
        f"Gemma 3 27B, TP={hw.gpus} x {hw.gpu_bytes / 1e9:.0f} GB: {hw.geometry.num_global_layers} global + "
        f"{hw.geometry.num_local_layers} local layers, global KV {kv_tokens:,} tokens/replica ({capacity:,} pages of "
        f"{page}), prefill ~{tokens_per_s:,.0f} tok/s/replica"
    )
    print(
        f"{n_conv} conversations x 8 turns over {horizon:,.0f} s, {args.replicas} replicas, uncached load "
        f"{args.load}, think {args.think_s:g} s, router lag {args.lag_s:g} s (workload built in "
        f"{time.perf_counter() - t0:.1f} s)"
    )

    def fresh():
        return [ReplicaSim(str(i), capacity) for i in range(args.replicas)]

    routers = {
        "round_robin": RoundRobin("round_robin", fresh(), page, args.seed),
        "p2c": PowerOfTwo("p2c", fresh(), page, args.seed),
        "text_tree": TextTree("text_tree", fresh(), page, args.seed),
        "ours": Ours(
            "ours", fresh(), page, args.seed, cfg=cfg, lag_s=args.lag_s, period_s=0.1, index_pages=4 * capacity * 8
        ),
        "oracle": Oracle("oracle", fresh(), page, args.seed, hw=hw),
    }
    res = {}
    print(
        f"\n{'router':<12} {'hit rate':>9} {'TTFT p50 s':>11} {'TTFT p99 s':>11} {'imbalance':>10} {'util':>5} {'sim s':>6}"
    )
    for name, router in routers.items():
        t = time.perf_counter()
        res[name] = m = simulate(router, convs, hw, page, args.think_s, args.seed + 2)
        print(
            f"{name:<12} {m['hit']:>9.3f} {m['p50']:>11.2f} {m['p99']:>11.2f} {m['imbalance']:>10.2f} {m['util']:>5.2f} "
            f"{time.perf_counter() - t:>6.1f}"
        )
    ours, oracle, p2c = res["ours"], res["oracle"], res["p2c"]
    print(
        f"RESULT ours_hit={ours['hit']:.3f} oracle_hit={oracle['hit']:.3f} hit_ratio={ours['hit'] / oracle['hit']:.3f} "
        f"p2c_ttft_p99_s={p2c['p99']:.2f} ours_ttft_p99_s={ours['p99']:.2f} p99_gain={p2c['p99'] / ours['p99']:.1f}"
    )


if __name__ == "__main__":
    main()
