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

Inside the engine (``tether.attention.compact``), one request's held keys of a layer are
scored densely (``dense_pooled_scores``) and every KV head keeps the same number of tokens
(``select_common_count``: TCA's picks, trimmed or padded by priority), so that all heads'
survivors fill the same slots.
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
    heads = torch.arange(Hkv, device=device).repeat(S)
    mask = tca_mask(scores.reshape(S * Hkv, W), lengths, heads, profiles, block=block,
                    sinks=sinks, window=window, alpha=alpha, impl=impl)
    indices, counts = tca.compact(mask)
    return indices.view(S, Hkv, -1), counts.view(S, Hkv), mask.view(S, Hkv, W)


def tca_mask(scores: torch.Tensor, lengths: torch.Tensor, heads: torch.Tensor,
             profiles: list[list[int]], *, block: int, sinks: int, window: int,
             alpha: float = 0.5, impl: str = "auto") -> torch.Tensor:
    """TCA's keep mask ``[R, W]`` of token scores ``[R, W]`` (row r: a sequence of
    ``lengths[r]`` tokens seen by KV head ``heads[r]``, whose profile is ``profiles[heads[r]]``):
    blocks ranked by h get the profile's keep counts, the top tokens of each block are kept,
    plus the first ``sinks`` and the last ``window`` tokens (see the module docstring)."""
    device = scores.device
    # sinks and window are kept anyway: they neither rank blocks nor use up keep counts
    pos = torch.arange(scores.shape[1], device=device)[None, :]
    always = (pos < sinks) | (pos >= lengths[:, None] - window)
    flat = scores.masked_fill(always, 0.0)
    h = tca.block_stats(flat, block, alpha, impl=impl)
    table = profile_table(profiles, device)
    calibrated = torch.tensor([len(p) for p in profiles], device=device)
    keep = keep_counts(h, lengths, table, heads, block, calibrated)
    return tca.block_topk(flat, keep, lengths, block, sinks, window, impl=impl)


def dense_pooled_scores(queries: torch.Tensor, keys: torch.Tensor, scale: float,
                        chunk: int = 1 << 24) -> torch.Tensor:
    r"""Pooled token scores ``[H_kv, n]`` (fp32) of one layer's last ``w`` queries
    ``queries [w, H_q, D]`` (rotated) against its held keys ``keys [H_kv, n, D]`` (in slot
    order): query j sits at slot n - w + j and sees the slots up to its own, so

        s_{g,t} = 1 / (w G) sum_j sum_{h in group g} softmax_t(z_{j,h,t}),
        z_{j,h,t} = scale <q_{j,h}, k_{g,t}> for t <= n - w + j, -inf after,

    with G = H_q / H_kv query heads per KV head; each row sums to 1. The same scores as
    ``pooled_scores`` on one sequence, without a Python loop over tokens: queries go
    ``chunk // (H_q n)`` at a time so that the fp32 logits stay under ``chunk`` elements."""
    w, Hq, D = queries.shape
    Hkv, n, _ = keys.shape
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads do not split into groups over {Hkv} KV heads")
    if not 0 < w <= n:
        raise ValueError(f"{w} observation queries need between 1 and {n} held keys")
    G = Hq // Hkv
    q = queries.float().view(w, Hkv, G, D)
    k = keys.float()
    slots = torch.arange(n, device=keys.device)
    total = torch.zeros(Hkv, n, dtype=torch.float32, device=keys.device)
    step = max(1, chunk // (Hq * n))
    for lo in range(0, w, step):
        z = torch.einsum("cgrd,gnd->cgrn", q[lo:lo + step], k) * scale
        seen = n - w + torch.arange(lo, min(lo + step, w), device=keys.device)
        z.masked_fill_((slots[None, :] > seen[:, None])[:, None, None, :], float("-inf"))
        total += torch.softmax(z, dim=-1).sum(dim=(0, 2))
    return total / (w * G)


def select_common_count(scores: torch.Tensor, count: int, profiles: list[list[int]], *,
                        block: int, sinks: int, window: int, alpha: float = 0.5,
                        impl: str = "auto") -> torch.Tensor:
    """Exactly ``count`` slots per KV head, ascending: ``[H_kv, count]`` (int64) for token
    scores ``[H_kv, n]`` of held slots (``dense_pooled_scores``).

    Every slot gets a tier: 0 for the first ``sinks`` and the last ``window`` slots, 1 for
    TCA's own picks (``tca_mask``: the head's profile, already scaled to the budget by
    ``budgets.plan``, decides how many), 2 for the rest. Slots are ranked by (tier, -score,
    slot) and the first ``count`` are kept: a head whose TCA picks fall short of ``count`` is
    padded with its best other slots, one whose picks exceed it drops its lowest-scored picks.
    When ``count`` equals the size of TCA's own selection, this is that selection. Tier 0 is
    never trimmed: ``count`` must hold it."""
    H, n = scores.shape
    if len(profiles) != H:
        raise ValueError(f"{len(profiles)} head profiles for {H} KV heads")
    if not min(n, sinks + window) <= count <= n:
        raise ValueError(f"a common count of {count} must hold the {min(n, sinks + window)} "
                         f"sink and window slots and at most the {n} held slots")
    device = scores.device
    lengths = torch.full((H,), n, device=device)
    heads = torch.arange(H, device=device)
    picked = tca_mask(scores, lengths, heads, profiles, block=block, sinks=sinks,
                      window=window, alpha=alpha, impl=impl)
    slot = torch.arange(n, device=device)
    always = (slot < sinks) | (slot >= n - window)
    tier = torch.where(always, 0, torch.where(picked, 1, 2)).expand(H, n)
    by_score = scores.float().sort(dim=1, descending=True, stable=True).indices
    by_tier = tier.gather(1, by_score).sort(dim=1, stable=True).indices
    ranked = by_score.gather(1, by_tier)
    return ranked[:, :count].sort(dim=1).values


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
