r"""Online TCA selection of one layer's KV tokens, from the kernels in ``tether.kernels.tca``.

For each sequence and KV head: token scores s from the last query (the mean over the head's
group of query heads of softmax(scale q K^T)); selection blocks of ``block`` tokens scored by
h (see the kernels' docstring); blocks ranked by h get keep counts from the head's calibrated
profile (``budgets.counts_for_blocks``); the top tokens of every block are kept, with the
first ``sinks`` and the last ``window`` tokens always. Everything stays on the tensors'
device; the one host read is the largest kept count (the width of the index table).
"""

from __future__ import annotations

import torch

from tether.kernels import tca


def profile_table(profiles: list[list[int]], device: torch.device | str) -> torch.Tensor:
    """The layer's profiles, one row per KV head, padded with each row's last count."""
    width = max(len(p) for p in profiles)
    rows = [p + [p[-1]] * (width - len(p)) for p in profiles]
    return torch.tensor(rows, dtype=torch.int32, device=device)


def keep_counts(h: torch.Tensor, lengths: torch.Tensor, profiles: torch.Tensor,
                heads: torch.Tensor, block: int, lengths_calibrated: torch.Tensor) -> torch.Tensor:
    """Keep count of every block ``[R, nb]``: the block ranked r-th by h in row r (of
    ``ceil(lengths[r] / block)`` blocks) gets ``profiles[heads[r], r * n / nb]`` with n the
    number of counts the row's profile was calibrated with."""
    R, nb = h.shape
    nblocks = (lengths + block - 1) // block
    live = torch.arange(nb, device=h.device)[None, :] < nblocks[:, None]
    order = torch.where(live, h, torch.full_like(h, float("-inf"))).argsort(dim=1,
                                                                            descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(nb, device=h.device).expand(R, nb))
    n = lengths_calibrated[heads].to(torch.long)
    col = (rank * n[:, None] // nblocks.clamp_min(1)[:, None]).clamp_max(n[:, None] - 1)
    return profiles[heads].gather(1, col.clamp_min(0)).to(torch.int32)


def select(q_last: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor,
           seq_lens: torch.Tensor, profiles: list[list[int]], *, block: int, sinks: int,
           window: int, alpha: float = 0.5, scale: float | None = None,
           impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Selected positions of one layer: ``(indices [S, Hkv, K], counts [S, Hkv], mask
    [S, Hkv, W])`` for the last queries ``q_last [S, H, D]`` over the paged keys.

    ``profiles``: one keep-count profile per KV head (``Budgets.profiles[layer]``).
    """
    S = q_last.shape[0]
    Hkv = key_cache.shape[2]
    if len(profiles) != Hkv:
        raise ValueError(f"{len(profiles)} head profiles for {Hkv} KV heads")
    logits = tca.paged_scores(q_last, key_cache, block_table, seq_lens, scale, impl=impl)
    scores = tca.token_scores(logits, Hkv)  # [S, Hkv, W]
    W = scores.shape[-1]
    flat = scores.reshape(S * Hkv, W)
    lengths = seq_lens.to(q_last.device).repeat_interleave(Hkv)
    h = tca.block_stats(flat, block, alpha, impl=impl)
    heads = torch.arange(Hkv, device=q_last.device).repeat(S)
    table = profile_table(profiles, q_last.device)
    calibrated = torch.tensor([len(p) for p in profiles], device=q_last.device)
    keep = keep_counts(h, lengths, table, heads, block, calibrated)
    mask = tca.block_topk(flat, keep, lengths, block, sinks, window, impl=impl)
    indices, counts = tca.compact(mask)
    return indices.view(S, Hkv, -1), counts.view(S, Hkv), mask.view(S, Hkv, W)


def dense_to_paged(keys: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``[B, Hkv, L, D]`` (transformers' layout) as a paged cache ``[B * P, page, Hkv,
    D]`` with its block table ``[B, P]`` (pages in order): the same selection code serves a
    dense cache."""
    B, Hkv, L, D = keys.shape
    P = -(-L // page)
    padded = torch.nn.functional.pad(keys, (0, 0, 0, P * page - L))
    cache = padded.permute(0, 2, 1, 3).reshape(B * P, page, Hkv, D).contiguous()
    table = torch.arange(B * P, dtype=torch.int32, device=keys.device).view(B, P)
    return cache, table
