r"""Online TCA selection of one layer's KV tokens, from the kernels in ``tether.kernels.tca``.

For each sequence and KV head: token scores s from the sequence's last ``w`` queries (the
observation window; the paper uses w = 1): s_t = (1 / w) sum_j mean_{h in group}
softmax_t(scale q_{j,h} K^T), each query j seeing the keys up to its own position, so s
still sums to 1. Selection blocks of ``block`` tokens scored by h (see the kernels'
docstring); blocks ranked by h get keep counts from the head's calibrated profile
(``budgets.counts_for_blocks``); the top tokens of every block are kept, with the first
``sinks`` and the last ``window`` tokens always. Those always-kept tokens are left out of h
and of the keep counts (their scores count as 0), as calibration leaves them out. Everything
stays on the tensors' device; the one host read is the largest kept count (the width of the
index table).
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


def pooled_scores(queries: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor,
                  seq_lens: torch.Tensor, scale: float | None = None,
                  impl: str = "auto") -> torch.Tensor:
    """Token scores ``[S, Hkv, W]`` of the last ``w`` queries ``queries [S, w, H, D]`` of each
    sequence (query j at position ``seq_len - w + j``, causal), averaged over the queries.

    Kernel (a) scores all ``S * w`` queries in one launch: each query is a row with its
    sequence's block table and its own length."""
    S, w, H, D = queries.shape
    Hkv = key_cache.shape[2]
    if seq_lens.device.type == "cpu" and int(seq_lens.min()) < w:  # no device sync
        raise ValueError(f"an observation window of {w} queries needs sequences of at least "
                         f"{w} tokens; the shortest has {int(seq_lens.min())}")
    lens = seq_lens.to(queries.device).to(torch.long)
    back = torch.arange(w - 1, -1, -1, device=queries.device)
    rows_len = (lens[:, None] - back[None, :]).reshape(S * w)
    logits = tca.paged_scores(queries.reshape(S * w, H, D), key_cache,
                              block_table.repeat_interleave(w, dim=0), rows_len, scale,
                              impl=impl)
    return tca.token_scores(logits, Hkv).view(S, w, Hkv, -1).mean(dim=1)


def select(queries: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor,
           seq_lens: torch.Tensor, profiles: list[list[int]], *, block: int, sinks: int,
           window: int, alpha: float = 0.5, scale: float | None = None,
           impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Selected positions of one layer: ``(indices [S, Hkv, K], counts [S, Hkv], mask
    [S, Hkv, W])`` for the last queries ``queries [S, w, H, D]`` (or the last query alone,
    ``[S, H, D]``) over the paged keys.

    ``profiles``: one keep-count profile per KV head (``Budgets.profiles[layer]``).
    """
    if queries.dim() == 3:
        queries = queries[:, None]
    S = queries.shape[0]
    device = queries.device
    Hkv = key_cache.shape[2]
    if len(profiles) != Hkv:
        raise ValueError(f"{len(profiles)} head profiles for {Hkv} KV heads")
    scores = pooled_scores(queries, key_cache, block_table, seq_lens, scale, impl)
    W = scores.shape[-1]
    lengths = seq_lens.to(device).repeat_interleave(Hkv)
    # sinks and window are kept anyway: they neither rank blocks nor use up keep counts
    pos = torch.arange(W, device=device)[None, :]
    always = (pos < sinks) | (pos >= lengths[:, None] - window)
    flat = scores.reshape(S * Hkv, W).masked_fill(always, 0.0)
    h = tca.block_stats(flat, block, alpha, impl=impl)
    heads = torch.arange(Hkv, device=device).repeat(S)
    table = profile_table(profiles, device)
    calibrated = torch.tensor([len(p) for p in profiles], device=device)
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
