"""Speed of the TCA kernels on a GPU, one decoding step over a long paged KV cache.

Side by side in one run, for S sequences of L tokens (GQA, fp16, vLLM's paged layout):
- selection: (a) paged scores, (b) block stats + top-k, compaction (``tether.attention.select``);
- sparse attention (c) over 10/20/40/60% of the tokens, against the same kernel over all of
  them and against torch's SDPA (its flash kernel) over contiguous keys and values, the dense
  peer.
Needs CUDA (the kernels' correctness is in tests/test_tca_kernels.py, on CPU too).

    python bench/tca_kernels.py [--seqs 4 --context 32768] [--out bench/results/tca_kernels.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, reps: int = 20) -> float:
    """Median milliseconds of fn() on the GPU, after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    from tether.attention.select import select
    from tether.kernels import tca

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/tca_kernels.py needs a CUDA GPU")
    dev, dtype = "cuda", torch.float16
    S, L, H, Hkv, D, page = (args.seqs, args.context, args.heads, args.kv_heads, args.head_dim,
                             args.page)
    g = torch.Generator(device=dev).manual_seed(0)
    pages = S * L // page
    kc = torch.randn(pages, page, Hkv, D, device=dev, dtype=dtype, generator=g)
    vc = torch.randn(pages, page, Hkv, D, device=dev, dtype=dtype, generator=g)
    table = torch.randperm(pages, device=dev, generator=g).int().view(S, L // page)
    lens = torch.full((S,), L, device=dev)
    q = torch.randn(S, H, D, device=dev, dtype=dtype, generator=g)
    k_dense = kc[table.long()].view(S, L, Hkv, D).transpose(1, 2).contiguous()
    v_dense = vc[table.long()].view(S, L, Hkv, D).transpose(1, 2).contiguous()

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None], k_dense, v_dense, enable_gqa=True)

    row = {"config": {k: v for k, v in vars(args).items() if k != "out"},
           "device": torch.cuda.get_device_name()}
    row["sdpa_dense_ms"] = timed(sdpa)
    everything = torch.ones(S * Hkv, L, dtype=torch.bool, device=dev)
    idx, cnt = tca.compact(everything)
    idx, cnt = idx.view(S, Hkv, -1), cnt.view(S, Hkv)
    row["tether_dense_ms"] = timed(lambda: tca.sparse_paged_attention(q, kc, vc, table, idx, cnt))
    profiles = [[args.block // 4] * (L // args.block)] * Hkv
    row["selection_ms"] = timed(lambda: select(q, kc, table, lens, profiles, block=args.block,
                                               sinks=4, window=64))
    row["sparse"] = {}
    for frac in (0.1, 0.2, 0.4, 0.6):
        mask = torch.rand(S * Hkv, L, device=dev, generator=g) < frac
        i, c = tca.compact(mask)
        i, c = i.view(S, Hkv, -1), c.view(S, Hkv)
        ms = timed(lambda: tca.sparse_paged_attention(q, kc, vc, table, i, c))
        row["sparse"][str(frac)] = {"ms": ms, "vs_sdpa": row["sdpa_dense_ms"] / ms,
                                    "vs_tether_dense": row["tether_dense_ms"] / ms}
    print(json.dumps(row, indent=1))
    print("| kept | sparse attention ms | speed-up vs SDPA dense | vs our dense |")
    print("|---|---|---|---|")
    for frac, r in row["sparse"].items():
        print(f"| {float(frac):.0%} | {r['ms']:.3f} | {r['vs_sdpa']:.2f}x | "
              f"{r['vs_tether_dense']:.2f}x |")
    print(f"selection {row['selection_ms']:.3f} ms; SDPA dense {row['sdpa_dense_ms']:.3f} ms; "
          f"our dense {row['tether_dense_ms']:.3f} ms")
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
