r"""Where vLLM's attention backends put each K and V element of a page (vLLM 0.32.x).

The CPU_ATTN cache of a layer is ``[num_blocks, H_kv, block_size, 2 * D]``, K and V being the
two halves of each (block, head) page along the token axis, but inside a half the elements are
packed by ISA (fp32 "vec": K transposed; bf16 AMX: VNNI tiles). Rather than reading the C++
code, ``probe_offsets`` writes patterns with vLLM's own cache-write op into a one-block scratch
cache and inverts them: code c = index of (kind, token, head, dim) among the 2 * bs * H * D
elements, written in base 16, one digit (plus 1, exact in every float dtype) per pass. Each
storage element of the scratch then decodes to the code written there; the layout is usable
only if that is a bijection and every head's page has the same map, the offset map
``off[kind, t, d]`` (see ``tether.attention.compact``).

GPU caches (FLASH_ATTN, TRITON_ATTN) are plain views ``[num_blocks, H_kv, block_size, 2 * D]``
split along the last axis; the probe is then a self-check of that. The GPU path is written but
untested (no GPU where this was written).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from tether.attention.budgets import plan
from tether.attention.compact import PagedLayer, compact_layer, plain_offsets
from tether.decode.engine import check_vllm_version

CPU = "CPU_ATTN"
GPU = ("FLASH_ATTN", "TRITON_ATTN")
DIGIT = 16  # a digit plus 1 is in [1, 16]: exact in fp32, fp16 and bf16


class LayoutError(RuntimeError):
    """A KV page layout TCA cannot move tokens in."""


def kv_views(kv_cache: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The K and V views ``[num_blocks, H_kv, block_size, D]`` of one layer's cache, as the
    backend's own forward splits it."""
    nb, H, bs, two_d = kv_cache.shape
    if backend == CPU:  # CPUAttentionBackendImpl.forward
        key, value = kv_cache.view(nb, H, 2 * bs, two_d // 2).chunk(2, dim=2)
        return key, value
    if backend in GPU:  # do_kv_cache_update: (B, H, N, 2D) -> (B, N, H, D) twice
        key, value = kv_cache.transpose(1, 2).split(two_d // 2, dim=-1)
        return key.transpose(1, 2), value.transpose(1, 2)
    raise LayoutError(f"TCA knows the KV layout of {CPU} and {', '.join(GPU)}, not {backend}")


def write_kv(backend: str, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor, isa: str | None = None) -> None:
    """Write ``key``/``value`` ``[tokens, H_kv, D]`` into the slots ``slot_mapping`` of
    ``kv_cache`` with the backend's own op (CPU: ``isa`` as vLLM picks it by default)."""
    from vllm import _custom_ops as ops

    k_view, v_view = kv_views(kv_cache, backend)
    if backend == CPU:
        ops.cpu_attn_reshape_and_cache(key, value, k_view, v_view, slot_mapping,
                                       isa or cpu_isa(kv_cache.dtype, kv_cache.shape[2],
                                                      kv_cache.shape[3] // 2))
    else:
        one = torch.ones((), dtype=torch.float32, device=kv_cache.device)
        ops.reshape_and_cache_flash(key, value, k_view.transpose(1, 2), v_view.transpose(1, 2),
                                    slot_mapping, "auto", one, one)


def cpu_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    """The ISA vLLM's CPU backend picks for this cache (``_get_attn_isa``)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_size, "auto")


def probe_offsets(backend: str, dtype: torch.dtype, num_kv_heads: int, head_size: int,
                  block_size: int, isa: str | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """The offset map ``off [2, block_size, head_size]`` (int64) of the backend's pages (module
    docstring); ``LayoutError`` naming dtype and ISA unless the layout is a bijection."""
    check_vllm_version()
    if backend == CPU and isa is None:
        isa = cpu_isa(dtype, block_size, head_size)
    H, bs, D = num_kv_heads, block_size, head_size
    where = f"{backend} KV cache in {dtype} (ISA {isa}, block {bs}, head size {D})"
    scratch = torch.zeros(1, H, bs, 2 * D, dtype=dtype, device=device)
    flat = scratch.view(-1)
    n = flat.numel()
    code = torch.arange(n, device=device).view(2, bs, H, D)  # kind, token, head, dim
    slots = torch.arange(bs, device=device)
    decoded = torch.zeros(n, dtype=torch.long, device=device)
    place = 1
    while place < n:
        digit = code // place % DIGIT + 1
        scratch.zero_()
        write_kv(backend, digit[0].to(dtype), digit[1].to(dtype), scratch, slots, isa)
        got = flat.float()
        if ((got < 1) | (got > DIGIT) | (got != got.round())).any():
            raise LayoutError(f"{where}: the cache-write op does not copy every element of a "
                              f"page exactly once (values other than those written)")
        decoded += (got.long() - 1) * place
        place *= DIGIT
    if not torch.equal(decoded.sort().values, torch.arange(n, device=device)):
        raise LayoutError(f"{where}: the page layout is not a bijection of (token, dim)")
    where_is = torch.empty_like(decoded)
    where_is[decoded] = torch.arange(n, device=device)
    key, value = kv_views(scratch, backend)
    start = torch.tensor([key.storage_offset(), value.storage_offset()], device=device)
    heads = torch.arange(H, device=device) * key.stride(1)
    off = where_is.view(2, bs, H, D) - start[:, None, None, None] - heads[None, None, :, None]
    if not (off == off[:, :, :1]).all():
        raise LayoutError(f"{where}: the KV heads' pages do not share one layout")
    off = off[:, :, 0].contiguous()
    if backend in GPU and not torch.equal(off, plain_offsets(key, value)):
        raise LayoutError(f"{where}: not the plain rows this code was written for")
    return off


def paged_layer(kv_cache: torch.Tensor, backend: str, off: torch.Tensor) -> PagedLayer:
    """One layer's cache as ``compact`` addresses it, with the map from ``probe_offsets``."""
    key, value = kv_views(kv_cache, backend)
    return PagedLayer.of(key, value, off)


@lru_cache(maxsize=None)
def _cpu_offsets(dtype: torch.dtype, num_kv_heads: int, head_size: int,
                 block_size: int) -> torch.Tensor:
    return probe_offsets(CPU, dtype, num_kv_heads, head_size, block_size)


def compact_request(order, kv_caches: list[torch.Tensor], queries: torch.Tensor, settings,
                    positions: torch.Tensor | None = None) -> torch.Tensor:
    """The engine's compactor (``tether.decode.tca.COMPACTOR``), on vLLM's CPU_ATTN caches.

    ``order``: a ``CompactionOrder`` (the request holds ``[P_old, L)`` in ``order.block_ids``,
    logical blocks ``P_old / bs`` on); ``kv_caches[l]``: layer ``l``'s cache; ``queries
    [layers, m, H_q, D]``: the request's last ``m <= w`` rotated queries; ``settings``: the
    engine's ``TCASettings``; ``positions [layers, H_kv, n]``: what the previous compaction of
    this request returned (None before the first).

    Every layer keeps ``K = L - P_new`` of the ``n = L - P_old`` held tokens per KV head:
    ``budgets.plan(budgets, n, K / n)`` scales the layer's calibrated profiles and sizes the
    recent window (widened to the ``m`` observed queries and narrowed to leave room for the
    sinks), ``compact_layer`` scores, selects a common count and moves the survivors into
    ``[P_new, L)``. Returns the kept tokens' logical positions ``[layers, H_kv, K]`` (int32).
    """
    budgets = settings.budgets
    L, P_old, P_new = order.length, order.start_old, order.start_new
    held, count = L - P_old, L - P_new
    profiles, window = plan(budgets, held, count / held)
    window = min(max(window, queries.shape[1]), count - budgets.sinks)
    first = kv_caches[0]
    off = _cpu_offsets(first.dtype, settings.num_kv_heads, settings.head_size,
                       settings.block_size).to(first.device)
    block_ids = torch.tensor(order.block_ids, dtype=torch.long)
    kept = []
    for layer, cache in enumerate(kv_caches):
        kept.append(compact_layer(
            paged_layer(cache, CPU, off), block_ids, P_old, P_new, L, queries[layer],
            profiles[layer], block=budgets.block, sinks=budgets.sinks, window=window,
            scale=settings.scale, positions=None if positions is None else positions[layer]))
    return torch.stack(kept).to(torch.int32)
