"""TCA Triton kernels against their torch references.

On a GPU the kernels run compiled. Without one they run in Triton's interpreter, which must be
switched on before triton is first imported: the parent pytest process (where vLLM has long
imported triton) runs this file again in a child process with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
RUNNABLE = ON_GPU or INTERPRETING
DEVICE = "cuda" if ON_GPU else "cpu"
needs_kernels = pytest.mark.skipif(not RUNNABLE, reason="run by test_kernels_in_interpreter")


@pytest.mark.skipif(RUNNABLE, reason="the kernels run in this process")
def test_kernels_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           __file__], env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-4000:], proc.stderr[-2000:])
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert " passed" in proc.stdout and " skipped" in proc.stdout  # this launcher skipped there


def _paged(S, Hkv, D, page, lengths, dtype, seed):
    """A shuffled paged cache holding ``lengths`` tokens per sequence, and its block table."""
    g = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // page) for n in lengths]
    max_pages = max(per_seq) + 1  # one unused column: entries past a sequence's end
    total = sum(per_seq) + 3  # spare pages nobody owns
    kc = torch.randn(total, page, Hkv, D, generator=g).to(dtype)
    vc = torch.randn(total, page, Hkv, D, generator=g).to(dtype)
    order = torch.randperm(total, generator=g)
    table = torch.full((S, max_pages), -1, dtype=torch.int32)
    used = 0
    for s, n in enumerate(per_seq):
        table[s, :n] = order[used:used + n].int()
        used += n
    return kc.to(DEVICE), vc.to(DEVICE), table.to(DEVICE), torch.tensor(lengths).to(DEVICE)


CASES = [  # S, H, Hkv, D, page, lengths
    (2, 4, 2, 16, 8, [19, 30]),
    (3, 6, 3, 24, 16, [5, 40, 33]),
    (1, 2, 1, 32, 4, [13]),
    (2, 4, 1, 16, 16, [700, 90]),  # several chunks of selected tokens per program
]
TOL = {torch.float32: 1e-3, torch.float16: 1e-2}


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_paged_scores(case, dtype):
    from tether.kernels import tca

    S, H, Hkv, D, page, lengths = case
    kc, _, table, lens = _paged(S, Hkv, D, page, lengths, dtype, seed=1)
    q = torch.randn(S, H, D, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
    ref = tca.paged_scores(q, kc, table, lens, impl="torch")
    out = tca.paged_scores(q, kc, table, lens, impl="triton")
    assert torch.equal(ref.isinf(), out.isinf())
    finite = ref.isfinite()
    assert int(finite.sum()) == sum(lengths) * H
    torch.testing.assert_close(out[finite], ref[finite], atol=TOL[dtype], rtol=TOL[dtype])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_block_stats_and_topk(dtype):
    from tether.kernels import tca

    g = torch.Generator().manual_seed(3)
    R, W, block = 5, 70, 16
    lengths = torch.tensor([70, 64, 1, 33, 50])
    scores = torch.rand(R, W, generator=g)
    scores[scores < 0.3] = 0.0  # exact zeros and ties
    scores[1, 10:20] = 0.25
    scores = (scores * (torch.arange(W)[None, :] < lengths[:, None])).to(dtype)
    s, lens = scores.to(DEVICE), lengths.to(DEVICE)
    h_ref = tca.block_stats(s, block, 0.5, impl="torch")
    h_out = tca.block_stats(s, block, 0.5, impl="triton")
    torch.testing.assert_close(h_out, h_ref, atol=1e-5, rtol=1e-5)
    keep = torch.randint(0, block + 1, h_ref.shape, generator=g).to(DEVICE)
    for sinks, window in [(0, 0), (2, 5)]:
        ref = tca.block_topk(s, keep, lens, block, sinks, window, impl="torch")
        out = tca.block_topk(s, keep, lens, block, sinks, window, impl="triton")
        assert torch.equal(out, ref)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_sparse_paged_attention(case, dtype):
    from tether.kernels import tca

    S, H, Hkv, D, page, lengths = case
    kc, vc, table, lens = _paged(S, Hkv, D, page, lengths, dtype, seed=4)
    g = torch.Generator().manual_seed(5)
    width = max(lengths)
    mask = torch.rand(S * Hkv, width, generator=g) < 0.5
    mask &= torch.arange(width)[None, :] < torch.tensor(lengths).repeat_interleave(Hkv)[:, None]
    idx, cnt = tca.compact(mask.to(DEVICE))
    idx, cnt = idx.view(S, Hkv, -1), cnt.view(S, Hkv)
    # decoding: one query per sequence; chunked prefill: three queries of sequence 0 at
    # positions that cut through its selection
    q = torch.randn(S, H, D, generator=g).to(dtype).to(DEVICE)
    ref = tca.sparse_paged_attention(q, kc, vc, table, idx, cnt, impl="torch")
    out = tca.sparse_paged_attention(q, kc, vc, table, idx, cnt, impl="triton")
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    qc = torch.randn(3, H, D, generator=g).to(dtype).to(DEVICE)
    seq = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    pos = torch.tensor([0, lengths[0] // 2, lengths[0] - 1], device=DEVICE)
    ref = tca.sparse_paged_attention(qc, kc, vc, table, idx, cnt, seq, pos, impl="torch")
    out = tca.sparse_paged_attention(qc, kc, vc, table, idx, cnt, seq, pos, impl="triton")
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@needs_kernels
def test_select_kernels_match_reference():
    from tether.attention.select import select

    S, H, Hkv, D, page = 2, 6, 3, 16, 8
    lengths = [45, 64]
    kc, _, table, lens = _paged(S, Hkv, D, page, lengths, torch.float32, seed=6)
    q = torch.randn(S, H, D, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    profiles = [[8, 4, 2, 1], [16, 1], [2, 2, 2, 2]]
    kw = dict(block=16, sinks=2, window=4)
    i_ref, c_ref, m_ref = select(q, kc, table, lens, profiles, impl="torch", **kw)
    i_out, c_out, m_out = select(q, kc, table, lens, profiles, impl="triton", **kw)
    assert torch.equal(m_out, m_ref) and torch.equal(c_out, c_ref)
    assert torch.equal(i_out, i_ref)
