r"""Compaction of one request's KV in a paged cache whose pages may be packed (pure torch).

Addresses. A layer's cache is seen through its K and V views ``[num_blocks, H_kv, block_size,
D]`` (vLLM's), but inside a (block, head) page an element need not sit where the view says:
vLLM's CPU cache stores K transposed (fp32, "vec") or in VNNI tiles (bf16, AMX). An offset map
``off [2, block_size, D]`` (found by ``tether.decode.tca_layout``) says where: element
(token t, dim d) of the K (kind 0) or V (kind 1) page of block b and KV head h is element

    start[kind] + b * block_stride + h * head_stride + off[kind, t, d]

of the cache's storage, with ``start`` the views' storage offsets and the strides theirs.

Slots. A request's logical positions are 0..L-1; logical block i (slots [i bs, (i+1) bs)) is
``block_ids[i - P_old / bs]``. Before a compaction the request holds the slots [P_old, L),
after it [P_new, L) (both block-aligned, P_old <= P_new < L): every KV head keeps K = L - P_new
of its held slots, chosen by TCA (``select.select_common_count``), moved in ascending order of
slot into [P_new, L). Tokens only move right (slot j-th kept -> P_new + j >= its old slot), and
all are gathered before any is written, so no source is overwritten before it is read. Keys
keep their RoPE: positions stay logical, only the attention read window moves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tether.attention.select import dense_pooled_scores, select_common_count


@dataclass(frozen=True)
class PagedLayer:
    """One layer's cache: its storage as one flat tensor, and where each element lives."""

    storage: torch.Tensor  # 1-D: every element of the cache's storage
    start: tuple[int, int]  # storage offsets of the K and V views
    block_stride: int
    head_stride: int
    num_kv_heads: int
    off: torch.Tensor  # [2, block_size, D] int64, on the cache's device

    @classmethod
    def of(cls, key: torch.Tensor, value: torch.Tensor,
           off: torch.Tensor | None = None) -> "PagedLayer":
        """From the K and V views ``[num_blocks, H_kv, block_size, D]`` of one cache and its
        offset map (None: the views' pages are plain rows, ``plain_offsets``)."""
        off = plain_offsets(key, value) if off is None else off
        if key.shape != value.shape or key.stride() != value.stride() or key.dim() != 4:
            raise ValueError("key and value must be views [num_blocks, H_kv, block_size, D] "
                             "of one cache with the same strides")
        if key.untyped_storage().data_ptr() != value.untyped_storage().data_ptr():
            raise ValueError("key and value must be views of one cache")
        if tuple(off.shape) != (2, key.shape[2], key.shape[3]):
            raise ValueError(f"an offset map [2, block_size, D] = [2, {key.shape[2]}, "
                             f"{key.shape[3]}] is needed, not {list(off.shape)}")
        storage = torch.empty(0, dtype=key.dtype, device=key.device)
        storage.set_(key.untyped_storage())
        return cls(storage, (key.storage_offset(), value.storage_offset()), key.stride(0),
                   key.stride(1), key.shape[1], off.to(key.device, torch.long))

    @property
    def block_size(self) -> int:
        return self.off.shape[1]

    def index(self, block_ids: torch.Tensor, first_block: int, slots: torch.Tensor,
              kinds: slice = slice(None)) -> torch.Tensor:
        """Storage indices ``[2, H_kv, n, D]`` of K and V (``kinds``: of K alone, ``slice(0,
        1)``) of the slots ``[H_kv, n]`` (logical, each row for its head), ``block_ids[i]``
        being logical block ``first_block + i``."""
        bs = self.block_size
        blocks = block_ids.to(self.storage.device, torch.long)[slots // bs - first_block]
        heads = torch.arange(self.num_kv_heads, device=self.storage.device)[:, None]
        page = blocks * self.block_stride + heads * self.head_stride  # [H, n]
        start = torch.tensor(self.start[kinds], device=self.storage.device)[:, None, None, None]
        return start + page[None, :, :, None] + self.off[kinds][:, slots % bs]


def plain_offsets(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The offset map of views whose pages hold plain rows: what their strides say."""
    t = torch.arange(key.shape[2], device=key.device)[:, None]
    d = torch.arange(key.shape[3], device=key.device)[None, :]
    return torch.stack([t * view.stride(2) + d * view.stride(3) for view in (key, value)])


def held_slots(layer: PagedLayer, first: int, end: int) -> torch.Tensor:
    """The slots [first, end) for every head: ``[H_kv, end - first]``."""
    slots = torch.arange(first, end, device=layer.storage.device)
    return slots.expand(layer.num_kv_heads, -1)


def read_kv(layer: PagedLayer, block_ids: torch.Tensor, P_old: int, L: int,
            kinds: slice = slice(None)) -> torch.Tensor:
    """K and V (``kinds``, as ``PagedLayer.index``) of the held slots [P_old, L):
    ``[2, H_kv, L - P_old, D]``, unpacked."""
    _check_window(layer, block_ids, P_old, L)
    slots = held_slots(layer, P_old, L)
    return layer.storage[layer.index(block_ids, P_old // layer.block_size, slots, kinds)]


def move_kept(layer: PagedLayer, block_ids: torch.Tensor, P_old: int, P_new: int, L: int,
              kept: torch.Tensor) -> None:
    """Move each head's kept slots ``kept [H_kv, L - P_new]`` (ascending, in [P_old, L)),
    K and V, into the slots [P_new, L): gather all, then scatter."""
    _check_window(layer, block_ids, P_old, L)
    if P_new % layer.block_size or not P_old <= P_new < L:
        raise ValueError(f"P_new = {P_new} must be block-aligned in [{P_old}, {L})")
    if tuple(kept.shape) != (layer.num_kv_heads, L - P_new):
        raise ValueError(f"kept slots [{layer.num_kv_heads}, {L - P_new}] are needed, not "
                         f"{list(kept.shape)}")
    kept = kept.to(layer.storage.device, torch.long)
    if (kept[:, 1:] <= kept[:, :-1]).any() or kept.min() < P_old or kept.max() >= L:
        raise ValueError(f"kept slots must be strictly ascending within [{P_old}, {L})")
    first = P_old // layer.block_size
    data = layer.storage[layer.index(block_ids, first, kept)]
    layer.storage[layer.index(block_ids, first, held_slots(layer, P_new, L))] = data


def compact_layer(layer: PagedLayer, block_ids: torch.Tensor, P_old: int, P_new: int, L: int,
                  queries: torch.Tensor, profiles: list[list[int]], *, block: int, sinks: int,
                  window: int, scale: float, alpha: float = 0.5,
                  positions: torch.Tensor | None = None) -> torch.Tensor:
    """Compact one layer of one request: score the held keys [P_old, L) with its last ``w``
    queries ``queries [w, H_q, D]`` (``dense_pooled_scores``), keep K = L - P_new slots per
    head (``select_common_count`` with the layer's ``profiles``, as ``budgets.plan`` scales
    them for a context of L - P_old tokens and a fraction K / (L - P_old), and its
    ``window``), and move them into [P_new, L) (``move_kept``).

    ``positions [H_kv, m]``: the logical positions of the tokens in the slots
    [P_old, P_old + m) (what the previous compaction returned; the slots after them hold their
    own tokens); None before the first compaction. Returns the logical positions of the kept
    tokens, now in the slots [P_new, L): ``[H_kv, K]``, ascending."""
    if queries.shape[0] > window:
        raise ValueError(f"the window ({window}) must cover the {queries.shape[0]} observed "
                         f"queries, so that they stay the last tokens")
    if positions is not None and positions.shape[1] > L - P_old:
        raise ValueError(f"positions of {positions.shape[1]} slots; {L - P_old} are held")
    keys = read_kv(layer, block_ids, P_old, L, kinds=slice(0, 1))[0]
    scores = dense_pooled_scores(queries.to(keys.device), keys, scale)
    kept = select_common_count(scores, L - P_new, profiles, block=block, sinks=sinks,
                               window=window, alpha=alpha) + P_old
    move_kept(layer, block_ids, P_old, P_new, L, kept)
    if positions is None:
        positions = torch.empty(layer.num_kv_heads, 0, dtype=torch.long, device=kept.device)
    positions = positions.to(kept.device, torch.long)
    tail = held_slots(layer, P_old + positions.shape[1], L)
    return torch.cat([positions, tail], dim=1).gather(1, kept - P_old)


def _check_window(layer: PagedLayer, block_ids: torch.Tensor, P_old: int, L: int) -> None:
    bs = layer.block_size
    if P_old % bs or not 0 <= P_old < L:
        raise ValueError(f"P_old = {P_old} must be block-aligned (block {bs}) in [0, {L})")
    if len(block_ids) != -(-L // bs) - P_old // bs:
        raise ValueError(f"{len(block_ids)} block ids for the logical blocks {P_old // bs} to "
                         f"{-(-L // bs) - 1}")
