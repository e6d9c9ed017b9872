r"""TCA-Attention kernels (You et al., 2025), each beside a torch reference of the same computation.

The KV cache is vLLM's paged layout: ``key_cache``/``value_cache`` are
``[num_pages, page_size, num_kv_heads, head_dim]`` and a sequence's ``block_table`` row lists
the pages that hold its tokens, so logical position t of sequence s lives at
``cache[block_table[s, t // page_size], t % page_size]``. Query heads map to KV heads in
groups (GQA): query head h reads KV head ``h // (num_heads // num_kv_heads)``.

Three steps, one kernel each:

(a) ``paged_scores``: the logits of one query per (sequence, head) against every key of the
    sequence, ``z_t = scale * <q, k_t>`` (positions past the sequence's length are -inf).
    Softmax over t gives the token scores s_t; a KV head's scores are the mean over its
    query heads (``token_scores``).
(b) ``block_stats`` and ``block_topk``: the scores are cut into selection blocks of ``B``
    tokens. Per block, the redundancy score

        h = (1 - alpha) * sum(s) + alpha * (1 - sum(s^2) / sum(s)^2),

    the block's mass plus how evenly it is spread (the second term is 1 - 1/n_eff, with n_eff
    the block's effective number of tokens; 0 for an empty block). Blocks are ranked by h and
    given keep counts from the head's budget (``tether.attention.select``); ``block_topk`` keeps
    the top-count tokens of each block (ties go to the earlier position), plus the first
    ``sinks`` tokens and the last ``window`` tokens of the sequence, always.
(c) ``sparse_paged_attention``: attention of queries over their sequence's selected tokens in
    the paged cache, with a running (online) softmax; a query at position p ignores selected
    positions after p (causal, for chunked prefill). One program per (query, KV head, chunk
    of 256 selected tokens): the group's query heads share every K and V load, the chunks
    run in parallel (flash-decoding) and are merged by their log-sum-exp.

Every function takes ``impl``: ``"torch"`` (the reference), ``"triton"`` (the kernel; on CPU
tensors it runs in Triton's interpreter, which is how the tests check it without a GPU), or
``"auto"`` (the kernel on CUDA tensors, the reference otherwise). Triton's interpreter
must be switched on before triton is imported (``TRITON_INTERPRET=1`` in the environment). Kernels read fp32, fp16 or
bf16 and accumulate in fp32.
"""

from __future__ import annotations

import math
import os

import torch

try:  # Triton is a dependency; the references work without it all the same
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def _kernel(fn):
    return triton.jit(fn) if triton is not None else fn


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _use_triton(impl: str, tensor: torch.Tensor) -> bool:
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', not {impl!r}")
    if impl == "triton":
        if triton is None:  # pragma: no cover
            raise RuntimeError("impl='triton' needs the triton package")
        if not tensor.is_cuda and not _interpreting():
            raise RuntimeError("the Triton kernels run on CUDA tensors, or on CPU tensors in "
                               "Triton's interpreter (TRITON_INTERPRET=1 set before triton is "
                               "imported)")
        return True
    return impl == "auto" and tensor.is_cuda and triton is not None


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _check_cache(key_cache: torch.Tensor, block_table: torch.Tensor) -> None:
    if key_cache.dim() != 4:
        raise ValueError("key_cache must be [num_pages, page_size, num_kv_heads, head_dim]")
    page = key_cache.shape[1]
    if page & (page - 1):
        raise ValueError(f"page_size must be a power of two, not {page}")
    if key_cache.stride(-1) != 1:
        raise ValueError("key_cache's head dimension must be contiguous")
    if block_table.dim() != 2:
        raise ValueError("block_table must be [num_seqs, max_pages]")


# ---------------------------------------------------------------------------------------------
# (a) scores of one query per head against the paged keys


def paged_scores_reference(q: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Logits [S, H, max_pages * page_size] of q [S, H, D]; -inf past each sequence's end."""
    S, H, _ = q.shape
    pages, page, Hkv, _ = key_cache.shape
    group = H // Hkv
    width = block_table.shape[1] * page
    out = torch.full((S, H, width), float("-inf"), dtype=torch.float32, device=q.device)
    for s in range(S):
        n = int(seq_lens[s])
        pos = torch.arange(n, device=q.device)
        keys = key_cache[block_table[s, pos // page].long(), pos % page].float()  # [n, Hkv, D]
        keys = keys.repeat_interleave(group, dim=1)  # [n, H, D]
        out[s, :, :n] = scale * torch.einsum("hd,nhd->hn", q[s].float(), keys)
    return out


@_kernel
def _paged_scores_kernel(q_ptr, k_ptr, bt_ptr, len_ptr, out_ptr,
                         stride_qs, stride_qh, stride_kp, stride_kt, stride_kh,
                         stride_bs, stride_os, stride_oh, scale,
                         GROUP: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    s = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    seq_len = tl.load(len_ptr + s)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + s * stride_qs + h * stride_qh + d, mask=dmask, other=0.0).to(tl.float32)
    t = tl.arange(0, PAGE)
    pos = b * PAGE + t
    valid = pos < seq_len
    page = tl.maximum(tl.load(bt_ptr + s * stride_bs + b), 0).to(tl.int64)
    kvh = h // GROUP
    k = tl.load(k_ptr + page * stride_kp + t[:, None] * stride_kt + kvh * stride_kh + d[None, :],
                mask=valid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    z = tl.sum(k * q[None, :], axis=1) * scale
    z = tl.where(valid, z, float("-inf"))
    tl.store(out_ptr + s * stride_os + h * stride_oh + pos, z)


def paged_scores(q: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float | None = None,
                 impl: str = "auto") -> torch.Tensor:
    """(a) Logits ``[S, H, max_pages * page_size]`` (fp32) of the queries ``q [S, H, D]``
    against every key of their sequence; -inf past ``seq_lens``."""
    _check_cache(key_cache, block_table)
    S, H, D = q.shape
    Hkv = key_cache.shape[2]
    if H % Hkv:
        raise ValueError(f"{H} query heads do not split into groups over {Hkv} KV heads")
    scale = D ** -0.5 if scale is None else scale
    if not _use_triton(impl, q):
        return paged_scores_reference(q, key_cache, block_table, seq_lens, scale)
    page = key_cache.shape[1]
    q = q.contiguous()
    out = torch.empty(S, H, block_table.shape[1] * page, dtype=torch.float32, device=q.device)
    _paged_scores_kernel[(S, H, block_table.shape[1])](
        q, key_cache, block_table, seq_lens.to(torch.int32), out,
        q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_table.stride(0), out.stride(0), out.stride(1), float(scale),
        GROUP=H // Hkv, PAGE=page, HEAD_DIM=D, BLOCK_D=_pow2(D))
    return out


def token_scores(logits: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Softmax of ``paged_scores``'s logits over positions, averaged over each KV head's group
    of query heads: ``[S, num_kv_heads, width]``, zero past each sequence's end."""
    S, H, W = logits.shape
    probs = torch.softmax(logits, dim=-1)
    return probs.view(S, num_kv_heads, H // num_kv_heads, W).mean(dim=2)


# ---------------------------------------------------------------------------------------------
# (b) per-block reduction and top-k selection


def block_stats_reference(scores: torch.Tensor, block: int, alpha: float = 0.5) -> torch.Tensor:
    """h per selection block: ``[R, ceil(W / block)]`` for scores ``[R, W]``."""
    R, W = scores.shape
    nb = -(-W // block)
    s = torch.nn.functional.pad(scores.float(), (0, nb * block - W)).view(R, nb, block)
    total = s.sum(-1)
    spread = torch.where(total > 0, 1 - (s * s).sum(-1) / (total * total).clamp_min(1e-30),
                         torch.zeros_like(total))
    return (1 - alpha) * total + alpha * spread


@_kernel
def _block_stats_kernel(s_ptr, h_ptr, width, stride_sr, stride_hr, alpha,
                        BLOCK: tl.constexpr):
    r = tl.program_id(0)
    b = tl.program_id(1)
    pos = b * BLOCK + tl.arange(0, BLOCK)
    s = tl.load(s_ptr + r * stride_sr + pos, mask=pos < width, other=0.0).to(tl.float32)
    total = tl.sum(s, axis=0)
    squares = tl.sum(s * s, axis=0)
    spread = tl.where(total > 0, 1.0 - squares / tl.maximum(total * total, 1e-30), 0.0)
    tl.store(h_ptr + r * stride_hr + b, (1.0 - alpha) * total + alpha * spread)


def block_stats(scores: torch.Tensor, block: int, alpha: float = 0.5,
                impl: str = "auto") -> torch.Tensor:
    """(b) The redundancy score h of every selection block of ``block`` tokens (a power of
    two): ``[R, ceil(W / block)]`` for token scores ``[R, W]``."""
    if block & (block - 1):
        raise ValueError(f"the selection block must be a power of two, not {block}")
    if not _use_triton(impl, scores):
        return block_stats_reference(scores, block, alpha)
    R, W = scores.shape
    scores = scores.contiguous()
    nb = -(-W // block)
    out = torch.empty(R, nb, dtype=torch.float32, device=scores.device)
    _block_stats_kernel[(R, nb)](scores, out, W, scores.stride(0), out.stride(0), float(alpha),
                                 BLOCK=block)
    return out


def block_topk_reference(scores: torch.Tensor, keep: torch.Tensor, lengths: torch.Tensor,
                         block: int, sinks: int = 0, window: int = 0) -> torch.Tensor:
    """Keep mask ``[R, W]`` (bool): the ``keep[r, b]`` best tokens of each block, earlier
    positions first among ties, plus sinks and the recent window, within ``lengths[r]``."""
    R, W = scores.shape
    nb = keep.shape[1]
    pos = torch.arange(W, device=scores.device)
    valid = pos[None, :] < lengths[:, None]
    s = torch.where(valid, scores.float(), torch.full_like(scores, -1.0, dtype=torch.float32))
    s = torch.nn.functional.pad(s, (0, nb * block - W), value=-1.0).view(R, nb, block)
    # stable descending sort: rank of each token in its block, ties broken by position
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(block, device=s.device).expand_as(order))
    kept = (rank < keep[:, :, None]).view(R, nb * block)[:, :W]
    kept |= pos[None, :] < sinks
    kept |= pos[None, :] >= (lengths[:, None] - window)
    return kept & valid


@_kernel
def _block_topk_kernel(s_ptr, keep_ptr, len_ptr, out_ptr, width,
                       stride_sr, stride_kr, stride_or, sinks, window,
                       BLOCK: tl.constexpr):
    r = tl.program_id(0)
    b = tl.program_id(1)
    length = tl.load(len_ptr + r)
    i = tl.arange(0, BLOCK)
    pos = b * BLOCK + i
    valid = pos < length
    s = tl.load(s_ptr + r * stride_sr + pos, mask=valid & (pos < width), other=-1.0)
    s = tl.where(valid, s.to(tl.float32), -1.0)
    count = tl.load(keep_ptr + r * stride_kr + b)
    # rank_i = #{j : s_j > s_i, or s_j == s_i and j < i}
    si = s[:, None]
    sj = s[None, :]
    beats = (sj > si) | ((sj == si) & (i[None, :] < i[:, None]))
    rank = tl.sum(beats.to(tl.int32), axis=1)
    kept = (rank < count) | (pos < sinks) | (pos >= length - window)
    kept = kept & valid
    tl.store(out_ptr + r * stride_or + pos, kept.to(tl.int8), mask=pos < width)


def block_topk(scores: torch.Tensor, keep: torch.Tensor, lengths: torch.Tensor, block: int,
               sinks: int = 0, window: int = 0, impl: str = "auto") -> torch.Tensor:
    """(b) Keep mask ``[R, W]`` (bool) of the selected tokens: in block b of row r the
    ``keep[r, b]`` highest-scoring tokens (earlier first among equal scores), and always the
    first ``sinks`` and the last ``window`` tokens of the row's ``lengths[r]``."""
    if block & (block - 1):
        raise ValueError(f"the selection block must be a power of two, not {block}")
    if not _use_triton(impl, scores):
        return block_topk_reference(scores, keep, lengths, block, sinks, window)
    R, W = scores.shape
    scores = scores.contiguous()
    keep = keep.to(torch.int32).contiguous()
    out = torch.empty(R, W, dtype=torch.int8, device=scores.device)
    _block_topk_kernel[(R, keep.shape[1])](
        scores, keep, lengths.to(torch.int32), out, W, scores.stride(0), keep.stride(0),
        out.stride(0), int(sinks), int(window), BLOCK=block)
    return out.bool()


def compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the True entries of each row of ``mask [R, W]``, ascending, padded with
    0: ``(indices [R, max_count] int32, counts [R] int32)``. Device ops only."""
    R, W = mask.shape
    counts = mask.sum(dim=1)
    pos = torch.arange(W, device=mask.device).expand(R, W)
    keyed = torch.where(mask, pos, pos + W)  # selected first, each group in order
    width = max(int(counts.max()) if R else 0, 1)
    idx = keyed.sort(dim=1).values[:, :width]
    idx = torch.where(idx < W, idx, torch.zeros_like(idx))
    return idx.to(torch.int32), counts.to(torch.int32)


# ---------------------------------------------------------------------------------------------
# (c) attention of the queries over the selected tokens


def sparse_paged_attention_reference(q, key_cache, value_cache, block_table, indices, counts,
                                     query_seq, query_pos, scale):
    N, H, D = q.shape
    page, Hkv = key_cache.shape[1], key_cache.shape[2]
    group = H // Hkv
    out = torch.zeros(N, H, D, dtype=torch.float32, device=q.device)
    for n in range(N):
        s = int(query_seq[n])
        for h in range(H):
            g = h // group
            pos = indices[s, g, :int(counts[s, g])].long()
            pos = pos[pos <= int(query_pos[n])]
            if pos.numel() == 0:
                continue
            pages = block_table[s, pos // page].long()
            k = key_cache[pages, pos % page, g].float()
            v = value_cache[pages, pos % page, g].float()
            w = torch.softmax(scale * (k @ q[n, h].float()), dim=0)
            out[n, h] = w @ v
    return out.to(q.dtype)


@_kernel
def _sparse_attention_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, idx_ptr, cnt_ptr, qseq_ptr, qpos_ptr,
                             o_ptr, m_ptr, l_ptr, stride_qn, stride_qh, stride_kp, stride_kt,
                             stride_kh, stride_bs, stride_is, stride_ih, stride_cs, stride_on,
                             stride_oh, stride_os, stride_mn, stride_mh, scale,
                             GROUP: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                             CHUNK: tl.constexpr, IEEE: tl.constexpr):
    # one program: query n, KV head g (all GROUP query heads reading it: K and V are loaded
    # once for the group), and the split-th chunk of CHUNK selected tokens (flash-decoding)
    n = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    s = tl.load(qseq_ptr + n)
    qpos = tl.load(qpos_ptr + n)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    r = tl.arange(0, BLOCK_G)
    rmask = r < GROUP
    heads = g * GROUP + r
    q = tl.load(q_ptr + n * stride_qn + heads[:, None] * stride_qh + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    count = tl.load(cnt_ptr + s * stride_cs + g)
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, count)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        jmask = j < hi
        pos = tl.load(idx_ptr + s * stride_is + g * stride_ih + j, mask=jmask, other=0)
        jmask = jmask & (pos <= qpos)
        page = tl.load(bt_ptr + s * stride_bs + pos // PAGE, mask=jmask, other=0).to(tl.int64)
        off = page * stride_kp + (pos % PAGE) * stride_kt + g * stride_kh
        kv_mask = jmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            z = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            z = tl.dot(q, tl.trans(k))
        z = tl.where(jmask[None, :], z * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(z - m_safe[:, None])
        correction = tl.exp(m_i - m_safe)
        v = tl.load(v_ptr + off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        l_i = l_i * correction + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * correction[:, None] + pv
        m_i = m_new
    o_off = n * stride_on + heads[:, None] * stride_oh + split * stride_os + d[None, :]
    tl.store(o_ptr + o_off, acc, mask=rmask[:, None] & dmask[None, :])
    ml_off = n * stride_mn + heads * stride_mh + split
    tl.store(m_ptr + ml_off, m_i, mask=rmask)
    tl.store(l_ptr + ml_off, l_i, mask=rmask)


SPLIT_CHUNK = 256  # selected tokens per program of the sparse attention kernel


def sparse_paged_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_table: torch.Tensor, indices: torch.Tensor,
                           counts: torch.Tensor, query_seq: torch.Tensor | None = None,
                           query_pos: torch.Tensor | None = None, scale: float | None = None,
                           impl: str = "auto") -> torch.Tensor:
    """(c) softmax(scale q K_sel^T) V_sel for queries ``q [N, H, D]``.

    ``indices [S, Hkv, K]`` / ``counts [S, Hkv]``: the selected positions of each sequence
    and KV head (``compact`` of ``block_topk``). ``query_seq [N]``: each query's sequence
    (default: query n is sequence n). ``query_pos [N]``: its position; selected positions
    after it are ignored (default: none are). Output ``[N, H, D]`` in q's dtype; a query with
    nothing to attend to gets zeros.
    """
    _check_cache(key_cache, block_table)
    if value_cache.shape != key_cache.shape or value_cache.stride() != key_cache.stride():
        raise ValueError("value_cache must have key_cache's shape and strides")
    N, H, D = q.shape
    Hkv = key_cache.shape[2]
    if H % Hkv:
        raise ValueError(f"{H} query heads do not split into groups over {Hkv} KV heads")
    if query_seq is None:
        query_seq = torch.arange(N, device=q.device)
    if query_pos is None:
        query_pos = torch.full((N,), 2 ** 30, device=q.device)
    scale = D ** -0.5 if scale is None else scale
    if not _use_triton(impl, q):
        return sparse_paged_attention_reference(q, key_cache, value_cache, block_table, indices,
                                                counts, query_seq, query_pos, scale)
    q = q.contiguous()
    indices = indices.to(torch.int32).contiguous()
    counts = counts.to(torch.int32).contiguous()
    group = H // Hkv
    splits = max(1, -(-indices.shape[-1] // SPLIT_CHUNK))
    part_o = torch.empty(N, H, splits, D, dtype=torch.float32, device=q.device)
    part_m = torch.full((N, H, splits), float("-inf"), dtype=torch.float32, device=q.device)
    part_l = torch.zeros(N, H, splits, dtype=torch.float32, device=q.device)
    _sparse_attention_kernel[(N, Hkv, splits)](
        q, key_cache, value_cache, block_table, indices, counts, query_seq.to(torch.int32),
        query_pos.to(torch.int32), part_o, part_m, part_l, q.stride(0), q.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_table.stride(0),
        indices.stride(0), indices.stride(1), counts.stride(0), part_o.stride(0),
        part_o.stride(1), part_o.stride(2), part_m.stride(0), part_m.stride(1), float(scale),
        GROUP=group, PAGE=key_cache.shape[1], HEAD_DIM=D, BLOCK_D=max(16, _pow2(D)),
        BLOCK_G=max(16, _pow2(group)), BLOCK_N=64, CHUNK=SPLIT_CHUNK,
        IEEE=q.dtype == torch.float32)
    # combine the splits: out = sum_i e^{m_i - M} o_i / sum_i e^{m_i - M} l_i
    top = part_m.amax(dim=-1, keepdim=True)
    weight = torch.exp(part_m - torch.where(top == float("-inf"), 0.0, top))
    total = (weight * part_l).sum(-1, keepdim=True).clamp_min(1e-30)
    return ((weight[..., None] * part_o).sum(2) / total).to(q.dtype)
