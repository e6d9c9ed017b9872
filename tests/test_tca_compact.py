"""TCA compaction inside vLLM's CPU KV cache: layout probe, unpacking, moving, selection.

Real vLLM ops on real tensors (its cache-write op and its CPU attention op), no engine.
"""

from __future__ import annotations

import pytest
import torch

from tether.attention.compact import PagedLayer, compact_layer, move_kept, read_kv
from tether.attention.select import (dense_pooled_scores, dense_to_paged, pooled_scores, select,
                                     select_common_count, tca_mask)
from tether.decode import tca_layout
from tether.decode.tca_layout import (CPU, LayoutError, cpu_isa, kv_views, paged_layer,
                                      probe_offsets, write_kv)

H_KV, H_Q, D, BS = 2, 4, 64, 32
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2 ** -8}  # bf16 outputs: one ulp below 1


def _cache(dtype, blocks=12, head_size=D, heads=H_KV):
    return torch.zeros(blocks, heads, BS, 2 * head_size, dtype=dtype)


def _slots(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """vLLM's slot mapping of logical positions under a block table row."""
    return table[positions // BS].long() * BS + positions % BS


def _write(cache, table, k, v, first=0):
    """Tokens ``k``, ``v`` [n, H_kv, D] at logical positions first.. with vLLM's own op."""
    pos = torch.arange(first, first + k.shape[0])
    write_kv(CPU, k.to(cache.dtype), v.to(cache.dtype), cache, _slots(table, pos))


def _layer(cache):
    _, H, bs, two_d = cache.shape
    return paged_layer(cache, CPU, probe_offsets(CPU, cache.dtype, H, two_d // 2, bs))


def _vllm_decode(cache, table_row, seq_len, q, scale):
    """vLLM's CPU attention of one decode query ``q [H_q, D]`` over the first ``seq_len``
    slots of the block table row (the request's read window)."""
    from vllm import _custom_ops as ops

    key, value = kv_views(cache, CPU)
    seq_lens = torch.tensor([seq_len], dtype=torch.int32)
    start = torch.tensor([0, 1], dtype=torch.int32)
    isa = cpu_isa(cache.dtype, BS, D)
    meta = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=H_Q, num_kv_heads=H_KV, head_dim=D, seq_lens=seq_lens,
        dtype=cache.dtype, query_start_loc=start, causal=True, sliding_window_size=-1, isa=isa,
        enable_kv_split=False)
    out = torch.empty(1, H_Q, D, dtype=cache.dtype)
    ops.cpu_attention_with_kv_cache(
        query=q[None].to(cache.dtype), key_cache=key, value_cache=value, output=out,
        query_start_loc=start, seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None,
        sliding_window=-1, block_table=table_row[None].to(torch.int32).contiguous(),
        softcap=0.0, scheduler_metadata=meta, s_aux=None)
    return out[0].float()


def _reference_decode(q, k, v, kept, scale):
    """Attention of ``q [H_q, D]`` over each KV head's tokens ``kept [H_kv, K]`` of ``k``,
    ``v`` [n, H_kv, D] (fp32)."""
    out = torch.empty(H_Q, D)
    for h in range(H_Q):
        g = h // (H_Q // H_KV)
        keys, values = k[kept[g], g].float(), v[kept[g], g].float()
        out[h] = torch.softmax(scale * keys @ q[h].float(), dim=0) @ values
    return out


def _random_kv(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, H_KV, D, generator=g).to(dtype)
    v = torch.randn(n, H_KV, D, generator=g).to(dtype)
    return k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_size", [64, 80])  # vLLM picks ISA "vec" for 64, "vec16" for 80
def test_probe_is_a_bijection_and_unpacking_returns_what_was_written(dtype, head_size):
    off = probe_offsets(CPU, dtype, H_KV, head_size, BS)
    key, value = kv_views(_cache(dtype, 1, head_size), CPU)
    page = torch.cat([off[0].flatten() + key.storage_offset(),
                      off[1].flatten() + value.storage_offset()])
    assert torch.equal(page.sort().values, torch.arange(2 * BS * head_size))
    cache = _cache(dtype, 8, head_size)
    table = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    k = torch.randn(200, H_KV, head_size, generator=g).to(dtype)
    v = torch.randn(200, H_KV, head_size, generator=g).to(dtype)
    write_kv(CPU, k, v, cache, _slots(table, torch.arange(200)))
    layer = paged_layer(cache, CPU, off)
    assert torch.equal(read_kv(layer, table[:7], 0, 200), torch.stack([k, v]).transpose(1, 2))
    # a window starting at block 2 reads its own tokens through table[2:]
    assert torch.equal(read_kv(layer, table[2:7], 64, 200)[0], k[64:].transpose(0, 1))
    # the packing is not the view's plain rows (else no map would be needed)
    assert not torch.equal(cache.view(8, H_KV, 2 * BS, -1)[table[0], 0, :BS], k[:BS, 0])


def test_plain_pages_are_addressed_as_their_views_say():
    """The GPU backends' layout (rows of [num_blocks, H_kv, block, 2 D] split along the last
    axis), written through the views and read back through the plain offset map."""
    cache = _cache(torch.float32, 8)
    key, value = kv_views(cache, "FLASH_ATTN")
    table = torch.randperm(8, generator=torch.Generator().manual_seed(11))
    k, v = _random_kv(200, torch.float32, 12)
    pos = torch.arange(200)
    key[table[pos // BS], :, pos % BS] = k
    value[table[pos // BS], :, pos % BS] = v
    layer = PagedLayer.of(key, value)
    assert torch.equal(read_kv(layer, table[2:7], 64, 200),
                       torch.stack([k[64:], v[64:]]).transpose(1, 2))


def test_probe_names_the_layout_it_refuses(monkeypatch):
    real = tca_layout.write_kv

    def overlapping(backend, key, value, kv_cache, slots, isa=None):
        real(backend, key, value, kv_cache, slots, isa)
        kv_cache.view(-1)[1] = kv_cache.view(-1)[0]  # two elements land in one place

    monkeypatch.setattr(tca_layout, "write_kv", overlapping)
    isa = cpu_isa(torch.bfloat16, BS, D)
    with pytest.raises(LayoutError, match=rf"torch.bfloat16 \(ISA {isa}, .*not a bijection"):
        probe_offsets(CPU, torch.bfloat16, H_KV, D, BS)
    with pytest.raises(LayoutError, match="not FLASH_INFER"):
        kv_views(_cache(torch.float32, 1), "FLASH_INFER")


def test_dense_scorer_equals_the_reference_pooled_scores():
    g = torch.Generator().manual_seed(2)
    w, n = 24, 150
    q = torch.randn(w, H_Q, D, generator=g)
    keys = torch.randn(H_KV, n, D, generator=g)
    cache, table = dense_to_paged(keys[None], page=16)
    want = pooled_scores(q[None], cache, table, torch.tensor([n]), 0.3, impl="torch")[0, :, :n]
    for chunk in (1, H_Q * n * 5, 1 << 24):  # one query at a time, five, all
        got = dense_pooled_scores(q, keys, 0.3, chunk=chunk)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(1), torch.ones(H_KV))
    with pytest.raises(ValueError, match="24 observation queries"):
        dense_pooled_scores(q, keys[:, :20], 0.3)


PROFILES = [[8, 4, 2, 1], [16, 2, 1, 0]]


def _scores(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(H_KV, n, generator=g), dim=1)


@pytest.mark.parametrize("count", [20, 28, 37, 70, 128])
def test_select_common_count_pads_and_trims_by_priority(count):
    n, sinks, window = 128, 4, 16
    scores = _scores(n, 3)
    kept = select_common_count(scores, count, PROFILES, block=32, sinks=sinks, window=window,
                               impl="torch")
    picked = tca_mask(scores, torch.full((H_KV,), n), torch.arange(H_KV), PROFILES, block=32,
                      sinks=sinks, window=window, impl="torch")
    slot = torch.arange(n)
    always = (slot < sinks) | (slot >= n - window)
    assert kept.shape == (H_KV, count)
    for h in range(H_KV):
        row = kept[h]
        assert (row[1:] > row[:-1]).all()
        mask = torch.zeros(n, dtype=torch.bool)
        mask[row] = True
        assert mask[always].all()
        tca_only = picked[h] & ~always
        s = scores[h]
        if count >= int(picked[h].sum()):  # padded: every TCA pick, then the best others
            assert mask[tca_only].all()
            rest = ~picked[h]
            if (mask & rest).any() and (~mask & rest).any():
                assert s[mask & rest].min() >= s[~mask & rest].max()
        else:  # trimmed: TCA picks only, the lowest-scored dropped
            assert not (mask & ~picked[h]).any()
            if (mask & tca_only).any():
                assert s[mask & tca_only].min() >= s[~mask & tca_only].max()
    assert picked.sum(1).tolist() == [15 + sinks + window, 19 + sinks + window]
    with pytest.raises(ValueError, match="hold the 20 sink and window slots"):
        select_common_count(scores, 19, PROFILES, block=32, sinks=sinks, window=window)


def test_select_common_count_is_part_1s_selection_at_its_own_budget():
    g = torch.Generator().manual_seed(4)
    w, n, sinks, window = 8, 128, 2, 8
    q = torch.randn(w, H_Q, D, generator=g)
    keys = torch.randn(H_KV, n, D, generator=g)
    profiles = [[8, 4, 2, 1]] * H_KV  # 15 picks per head over 4 blocks of 32
    cache, table = dense_to_paged(keys[None], page=16)
    _, counts, mask = select(q[None], cache, table, torch.tensor([n]), profiles, block=32,
                             sinks=sinks, window=window, scale=D ** -0.5, impl="torch")
    assert counts.tolist() == [[15 + sinks + window] * H_KV]
    kept = select_common_count(dense_pooled_scores(q, keys, D ** -0.5), int(counts[0, 0]),
                               profiles, block=32, sinks=sinks, window=window, impl="torch")
    for h in range(H_KV):
        assert kept[h].tolist() == mask[0, h, :n].nonzero().flatten().tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moved_tokens_are_what_vllms_attention_reads_in_the_shifted_window(dtype):
    """Per-head kept sets moved into [P_new, L); vLLM's CPU attention over the block table
    shifted by P_new / bs and seq_len - P_new equals attention over each head's kept set."""
    L, P_new = 211, 128
    cache = _cache(dtype)
    table = torch.randperm(12, generator=torch.Generator().manual_seed(5))
    k, v = _random_kv(L + 1, dtype, 6)
    _write(cache, table, k[:L], v[:L])
    layer = _layer(cache)
    g = torch.Generator().manual_seed(7)
    kept = torch.stack([torch.randperm(L, generator=g)[:L - P_new].sort().values
                        for _ in range(H_KV)])
    scale = D ** -0.5
    q = torch.randn(H_Q, D, generator=g).to(dtype)
    new = torch.cat([kept, torch.full((H_KV, 1), L)], dim=1)  # the decode token joins
    want = _reference_decode(q, k, v, new, scale)
    _write(cache, table, k[L:], v[L:], first=L)
    before = _vllm_decode(cache, table[P_new // BS:], L + 1 - P_new, q, scale)
    move_kept(layer, table[:7], 0, P_new, L, kept)
    moved = read_kv(layer, table[P_new // BS:7], P_new, L)
    for h in range(H_KV):
        assert torch.equal(moved[0, h], k[kept[h], h]) and torch.equal(moved[1, h],
                                                                        v[kept[h], h])
    got = _vllm_decode(cache, table[P_new // BS:], L + 1 - P_new, q, scale)
    torch.testing.assert_close(got, want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    assert (before - want).abs().max() > 100 * TOLERANCE[dtype]  # the move did matter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_compactions_in_a_row_stay_correct(dtype):
    """First compaction [0, 200) -> [96, 200); 60 tokens decoded; second [96, 260) ->
    [160, 260), reading through the blocks still held while the freed ones are reused.
    Each time: the kept positions are TCA's common-count choice over the original keys of
    the held tokens, the cache holds exactly those tokens in order, and vLLM's attention over
    the shifted window is attention over them."""
    sel = dict(block=32, sinks=4, window=32)
    profiles = [[8, 4, 2, 1], [32, 16, 1, 1]]
    scale = D ** -0.5
    cache = _cache(dtype)
    table = torch.randperm(12, generator=torch.Generator().manual_seed(8))[:9]
    k, v = _random_kv(261, dtype, 9)
    g = torch.Generator().manual_seed(10)
    _write(cache, table, k[:200], v[:200])
    layer = _layer(cache)
    positions, held = None, torch.arange(200).expand(H_KV, -1)
    for P_old, P_new, L in ((0, 96, 200), (96, 160, 260)):
        queries = torch.randn(16, H_Q, D, generator=g)
        positions = compact_layer(layer, table[P_old // BS:-(-L // BS)], P_old, P_new, L,
                                  queries, profiles, **sel, scale=scale, positions=positions)
        held_keys = torch.stack([k[held[h], h] for h in range(H_KV)])
        choice = select_common_count(dense_pooled_scores(queries, held_keys, scale),
                                     L - P_new, profiles, **sel)
        assert torch.equal(positions, held.gather(1, choice))
        moved = read_kv(layer, table[P_new // BS:-(-L // BS)], P_new, L)
        for h in range(H_KV):
            assert torch.equal(moved[0, h], k[positions[h], h])
            assert torch.equal(moved[1, h], v[positions[h], h])
        _write(cache, table, k[L:L + 1], v[L:L + 1], first=L)
        q = torch.randn(H_Q, D, generator=g).to(dtype)
        got = _vllm_decode(cache, table[P_new // BS:], L + 1 - P_new, q, scale)
        want = _reference_decode(q, k, v, torch.cat([positions, torch.full((H_KV, 1), L)], 1),
                                 scale)
        torch.testing.assert_close(got, want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
        if L < 260:  # the scheduler reuses the freed leading blocks; 59 more tokens decode
            cache[table[:P_new // BS]] = 7.0
            _write(cache, table, k[L + 1:260], v[L + 1:260], first=L + 1)
            held = torch.cat([positions, torch.arange(L, 260).expand(H_KV, -1)], dim=1)


def test_bad_orders_are_refused():
    layer = PagedLayer.of(*kv_views(_cache(torch.float32, 4), CPU),
                          probe_offsets(CPU, torch.float32, H_KV, D, BS))
    table = torch.arange(4)
    with pytest.raises(ValueError, match="P_old = 16 must be block-aligned"):
        read_kv(layer, table, 16, 100)
    with pytest.raises(ValueError, match="3 block ids for the logical blocks 0 to 3"):
        read_kv(layer, table[:3], 0, 100)
    kept = torch.arange(36).expand(H_KV, -1)
    with pytest.raises(ValueError, match="P_new = 60 must be block-aligned"):
        move_kept(layer, table, 0, 60, 100, kept)
    with pytest.raises(ValueError, match="strictly ascending"):
        move_kept(layer, table, 0, 64, 100, kept.flip(1))
    with pytest.raises(ValueError, match="window .8. must cover the 16 observed"):
        compact_layer(layer, table, 0, 64, 100, torch.zeros(16, H_Q, D), PROFILES, block=32,
                      sinks=4, window=8, scale=1.0)
