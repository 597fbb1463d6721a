"""KVCacheSpec: Gemma 3 layer layouts mapped to page groups, slots and sizes."""

from types import SimpleNamespace

import pytest

from cluster.contracts.model_info import FULL_ATTENTION, SLIDING_ATTENTION
from model_workers.native.kv_cache.spec import KVCacheSpec


def gemma_layers(n_layers: int, pattern: int = 6) -> tuple[str, ...]:
    return tuple(FULL_ATTENTION if (i + 1) % pattern == 0 else SLIDING_ATTENTION for i in range(n_layers))


def test_gemma3_270m_layout_has_no_padding():
    spec = KVCacheSpec(gemma_layers(18), page_size=16, sliding_window=512, num_kv_heads=1, head_dim=256, dtype_bytes=4)
    assert spec.global_layers == (5, 11, 17)
    assert len(spec.local_layers) == 15
    assert spec.layers_per_page == 3
    assert spec.num_local_groups == 5 and spec.num_groups == 6
    assert spec.padding_layer_slots == 0
    assert spec.page_bytes == 3 * 2 * 16 * 1 * 256 * 4
    assert spec.bytes_per_token_global == 3 * 2 * 256 * 4
    assert spec.bytes_per_token_local == 15 * 2 * 256 * 4
    assert [spec.layer_slot(i) for i in (5, 11, 17)] == [(0, 0), (0, 1), (0, 2)]
    assert [spec.layer_slot(i) for i in (0, 1, 2, 3, 4, 6)] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert spec.layer_slot(16) == (5, 2)


def test_every_layer_has_one_distinct_slot_and_groups_list_them():
    spec = KVCacheSpec(gemma_layers(34), page_size=16, sliding_window=1024, num_kv_heads=4, head_dim=256, dtype_bytes=2)
    assert spec.layers_per_page == 5 and spec.num_local_groups == 6  # 29 local layers in chunks of 5
    assert spec.padding_layer_slots == 1
    slots = [spec.layer_slot(i) for i in range(34)]
    assert len(set(slots)) == 34
    for g in range(spec.num_groups):
        for slot, layer in enumerate(spec.group_layers(g)):
            assert spec.layer_slot(layer) == (g, slot)
    assert len(spec.group_layers(6)) == 4


def test_all_sliding_model_uses_local_count_per_page():
    spec = KVCacheSpec(
        (SLIDING_ATTENTION,) * 4, page_size=4, sliding_window=8, num_kv_heads=1, head_dim=2, dtype_bytes=4
    )
    assert spec.global_layers == () and spec.layers_per_page == 4 and spec.num_local_groups == 1


def test_from_text_config_and_budget():
    cfg = SimpleNamespace(
        layer_types=list(gemma_layers(6, pattern=3)),
        sliding_window=16,
        num_key_value_heads=2,
        head_dim=16,
        hidden_size=64,
        num_attention_heads=4,
    )
    spec = KVCacheSpec.from_text_config(cfg, page_size=4, dtype_bytes=4)
    assert spec.global_layers == (2, 5) and spec.num_local_groups == 2
    assert spec.page_bytes == 2 * 2 * 4 * 2 * 16 * 4
    assert spec.num_pages_for_budget(10 * spec.page_bytes + 1) == 10


def test_rejects_bad_layer_types():
    with pytest.raises(ValueError):
        KVCacheSpec(("full", "local"), page_size=4, sliding_window=8, num_kv_heads=1, head_dim=2, dtype_bytes=4)


def test_peak_local_pages_matches_a_brute_force_walk():
    spec = KVCacheSpec(gemma_layers(6), page_size=4, sliding_window=16, num_kv_heads=1, head_dim=2, dtype_bytes=4)
    for seq_len in (1, 5, 16, 19, 20, 21, 37, 100):
        for chunk in (1, 3, 8, 32):
            brute = 0
            for c in range(0, seq_len, chunk):
                k = min(chunk, seq_len - c)
                brute = max(brute, (c + k - 1) // 4 - spec.first_needed_local_block(c) + 1)
            # The spec's figure is the peak over *any* chunk start, so >= this particular walk, and tight for k=1.
            assert spec.peak_local_pages(seq_len, chunk) >= brute
            if chunk == 1:
                assert spec.peak_local_pages(seq_len, 1) == brute
    assert spec.peak_local_pages(2000, 1) == 16 // 4 + 2
