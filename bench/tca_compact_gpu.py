"""One TCA compaction of a long request's KV on a GPU, and decoding after it (torch + Triton).

For one layer of one request of L tokens (32k, 64k, 128k; GQA of an 8B model: 32 query and 8
KV heads of 128, bf16; vLLM's GPU page layout ``[num_blocks, H_kv, 16, 2 * 128]``, blocks
shuffled), side by side in one run:
- the compaction of ``tether.attention.compact.compact_layer``: read the keys, score them with
  the last 128 queries, keep K = L - P_new slots per head (profiles of 8 calibrated SmolLM2
  heads, scaled by ``budgets.plan`` to a fraction f of the context), move K and V into
  [P_new, L); and its three parts;
- decode attention of one query after it, over the shifted window [P_new, L), against dense
  attention over [0, L): tether's paged Triton kernel for both, and torch's SDPA (flash) over
  contiguous keys and values for both (the dense kernel the engine's backend runs);
- break-even: decode steps after which the compaction has paid for itself in attention time.
It checks that the moved tokens are each head's kept tokens and that attention over the shifted
window is attention over them. No vLLM: the layout is vLLM's, written here directly.

    python bench/tca_compact_gpu.py [--out bench/results/tca_compact_gpu.json]
    python bench/tca_compact_gpu.py --smoke    # tiny sizes on the CPU: checks the script
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUDGETS = ROOT / "bench" / "results" / "tca_budgets_smollm2.json"


def timed(fn, reps: int) -> float:
    """Median milliseconds of fn(), after warm-up (on a GPU: ``tca_kernels.timed``)."""
    if torch.cuda.is_available():
        from tca_kernels import timed as cuda_timed

        return cuda_timed(fn, reps)
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def layer_budgets(kv_heads: int, block: int, window: int):
    """An 8B-shaped layer's budgets: ``kv_heads`` calibrated SmolLM2 heads (layers 12 on)."""
    from tether.attention.budgets import Budgets

    real = Budgets.load(BUDGETS)
    heads = [p for layer in real.profiles[12:] for p in layer][:kv_heads]
    profiles = [[[min(c, block) for c in p] for p in heads]]
    return Budgets(model="8 SmolLM2 heads", num_layers=1, num_kv_heads=kv_heads, tau=real.tau,
                   block=block, sinks=real.sinks, window=window, tokens=real.tokens,
                   profiles=profiles, observe=real.observe)


def run_context(L: int, f: float, a, dev: str, dtype: torch.dtype) -> dict:
    from tether.attention.budgets import plan
    from tether.attention.compact import PagedLayer, compact_layer, move_kept, read_kv
    from tether.attention.select import dense_pooled_scores, select_common_count
    from tether.kernels import tca

    H, Hkv, D, bs, w = a.heads, a.kv_heads, a.head_dim, a.page, a.observe
    g = torch.Generator(device=dev).manual_seed(L)
    nblocks = -(-L // bs)
    cache = torch.randn(nblocks + 8, Hkv, bs, 2 * D, device=dev, dtype=dtype, generator=g)
    key, value = cache[..., :D], cache[..., D:]  # FLASH_ATTN / TRITON_ATTN's split
    table = torch.randperm(nblocks + 8, device=dev, generator=g)[:nblocks]
    layer = PagedLayer.of(key, value)
    pos = torch.arange(L, device=dev)
    k_dense = key[table[pos // bs], :, pos % bs].transpose(0, 1).contiguous()  # [Hkv, L, D]
    v_dense = value[table[pos // bs], :, pos % bs].transpose(0, 1).contiguous()
    queries = torch.randn(w, H, D, device=dev, dtype=dtype, generator=g)
    q = torch.randn(1, H, D, device=dev, dtype=dtype, generator=g)
    scale = D ** -0.5
    K_target = max(a.sinks + a.window + 1, math.ceil(f * L))
    P_new = (L - K_target) // bs * bs
    K = L - P_new
    profiles, window = plan(layer_budgets(Hkv, a.block, a.window), L, K / L)
    sel = dict(block=a.block, sinks=a.sinks, window=window, scale=scale)
    row = {"context": L, "fraction": f, "kept": K, "P_new": P_new, "window": window}

    # correctness first, on the untouched cache
    kept = compact_layer(layer, table, 0, P_new, L, queries, profiles[0], **sel)
    moved = read_kv(layer, table[P_new // bs:], P_new, L)
    kept_k = torch.stack([k_dense[h, kept[h]] for h in range(Hkv)])
    kept_v = torch.stack([v_dense[h, kept[h]] for h in range(Hkv)])
    assert torch.equal(moved[0], kept_k) and torch.equal(moved[1], kept_v)

    def sdpa(k, v):
        return torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None], k[None], v[None], scale=scale, enable_gqa=True)[:, :, 0]

    kc, vc = key.transpose(1, 2), value.transpose(1, 2)  # [pages, page, Hkv, D]
    everything = torch.arange(L, device=dev, dtype=torch.int32).expand(1, Hkv, L)
    window_idx = torch.arange(K, device=dev, dtype=torch.int32).expand(1, Hkv, K)
    shifted = table[None, P_new // bs:].int().contiguous()

    def ours(idx, tab, n):
        return tca.sparse_paged_attention(q, kc, vc, tab, idx,
                                          torch.full((1, Hkv), n, device=dev), scale=scale)

    got = ours(window_idx, shifted, K).float()
    want = sdpa(kept_k, kept_v).float()
    row["max_error_vs_kept_attention"] = float((got - want).abs().max())
    assert row["max_error_vs_kept_attention"] < (1e-4 if dtype == torch.float32 else 2e-2)

    full = table[None].int().contiguous()
    row["ms"] = ms = {
        "compaction": timed(lambda: compact_layer(layer, table, 0, P_new, L, queries,
                                                  profiles[0], **sel), a.reps_compaction),
        "read_and_score": timed(lambda: dense_pooled_scores(
            queries, read_kv(layer, table, 0, L, kinds=slice(0, 1))[0], scale),
            a.reps_compaction),
    }
    scores = dense_pooled_scores(queries, k_dense, scale)
    ms["select"] = timed(lambda: select_common_count(scores, K, profiles[0], block=a.block,
                                                     sinks=a.sinks, window=window),
                         a.reps_compaction)
    choice = select_common_count(scores, K, profiles[0], block=a.block, sinks=a.sinks,
                                 window=window)
    ms["move"] = timed(lambda: move_kept(layer, table, 0, P_new, L, choice), a.reps_compaction)
    ms["sdpa_dense"] = timed(lambda: sdpa(k_dense, v_dense), a.reps)
    ms["sdpa_window"] = timed(lambda: sdpa(kept_k, kept_v), a.reps)
    ms["ours_dense"] = timed(lambda: ours(everything, full, L), a.reps)
    ms["ours_window"] = timed(lambda: ours(window_idx, shifted, K), a.reps)
    saved = ms["sdpa_dense"] - ms["sdpa_window"]
    row["ratios"] = {
        "attention_speedup_sdpa": ms["sdpa_dense"] / ms["sdpa_window"],
        "attention_speedup_ours": ms["ours_dense"] / ms["ours_window"],
        "compaction_in_dense_decode_steps": ms["compaction"] / ms["sdpa_dense"],
        "break_even_steps_sdpa": ms["compaction"] / saved if saved > 0 else None,
    }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes on the CPU, fp32 (checks the script; no results file)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 65536, 131072])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page", type=int, default=16, help="vLLM block size")
    ap.add_argument("--block", type=int, default=128, help="TCA selection block")
    ap.add_argument("--observe", type=int, default=128, help="stored queries scored")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=128, help="smallest recent window")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--reps-compaction", type=int, default=5)
    ap.add_argument("--out", default=None,
                    help="results file (default bench/results/tca_compact_gpu.json on a GPU)")
    a = ap.parse_args()
    if a.smoke:
        a.contexts, a.heads, a.kv_heads, a.head_dim = [512, 1024], 4, 2, 32
        a.block, a.observe, a.window, a.reps, a.reps_compaction = 32, 16, 16, 3, 2
        dev, dtype = "cpu", torch.float32
    elif torch.cuda.is_available():
        dev, dtype = "cuda", torch.bfloat16
        a.out = a.out or str(ROOT / "bench" / "results" / "tca_compact_gpu.json")
    else:
        raise SystemExit("bench/tca_compact_gpu.py needs a CUDA GPU (or --smoke on the CPU)")
    import triton

    result = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
              "dtype": str(dtype), "torch": torch.__version__, "triton": triton.__version__,
              "config": {k: v for k, v in vars(a).items() if k != "out"}, "rows": []}
    print("| context | kept | compaction ms (score / select / move) | SDPA dense / window ms "
          "| ours dense / window ms | attention speed-up SDPA | break-even steps |")
    print("|---|---|---|---|---|---|---|")
    for L in a.contexts:
        for f in a.fractions:
            r = run_context(L, f, a, dev, dtype)
            result["rows"].append(r)
            ms, x = r["ms"], r["ratios"]
            even = x["break_even_steps_sdpa"]
            print(f"| {L} | {r['kept']} ({f:.0%}) | {ms['compaction']:.2f} "
                  f"({ms['read_and_score']:.2f} / {ms['select']:.2f} / {ms['move']:.2f}) | "
                  f"{ms['sdpa_dense']:.3f} / {ms['sdpa_window']:.3f} | {ms['ours_dense']:.3f} / "
                  f"{ms['ours_window']:.3f} | {x['attention_speedup_sdpa']:.2f}x | "
                  f"{'-' if even is None else f'{even:.0f}'} |", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
