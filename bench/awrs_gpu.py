"""AWRS's device work per decoding step on a GPU, beside the decode step it rides on (torch only).

At every step the AWRS processor does, on the device, for a batch of B rows over a vocabulary
of V tokens (``tether.samplers.candidates.rank_batch``), one of two things per row:
  * rows with exact weights (the default on llguidance constraints: JSON schemas, regexes,
    grammars, choices) bring their constraint's mask: the mask crosses to the device (one byte
    per token), and one pass draws the token from p restricted to it and computes log Z_A
    (``masked_draws``): ``masked_step``;
  * rows without a mask (estimated weights, LCD, greedy): log-softmax, Gumbel keys built from
    the top down with counter-based noise for the blocks and the k best blocks' tokens
    (``tether.samplers.gumbel.BlockKeys``: ``block_keys``), the top k: ``plain_step``;
then the one host copy per step (``host_copy``: ``[3, B, k]`` float64).
This script times exactly those calls (tether's own functions, no copy of them), whole and by
part, at B in {1, 8, 32, 64, 128, 256} and V in {49,152 (SmolLM2), 128,256 (Llama 3),
262,144 (Gemma 3)}, fp32 logits, and beside them a decode step of two dense models (bf16):

  * "1B": Llama 3.2 1B shapes: 16 layers, hidden 2048, 32 query / 8 KV heads of 64,
    MLP 8192, LM head [2048, V];
  * "8B": Llama 3.1 8B shapes: 32 layers, hidden 4096, 32 query / 8 KV heads of 128,
    MLP 14336, LM head [4096, V].

A decode step is timed as its matrix products for B tokens (QKV, output, gate-up, down per layer,
and the LM head); attention over the KV cache, norms and activations are left out, so the real
step is longer and the shares reported, ``awrs / (decode + awrs)`` for each kind of row, are
upper bounds on what AWRS adds. Times are wall-clock medians, with the device synchronized
before and after each call.

    python bench/awrs_gpu.py [--out bench/results/awrs_gpu.json]   # on a GPU, about 3 minutes
    python bench/awrs_gpu.py --smoke                                # tiny sizes on the CPU

Needs torch only (no vLLM, no grammar engine): the constraint checks themselves run on the
host and are measured by ``bench/awrs_vs_masking.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from tether.samplers.candidates import rank_batch  # noqa: E402
from tether.samplers.gumbel import BlockKeys  # noqa: E402

VOCABS = {"smollm2": 49_152, "llama3": 128_256, "gemma3": 262_144}
BATCHES = [1, 8, 32, 64, 128, 256]
# (layers, hidden, query heads, KV heads, head size, MLP width)
MODELS = {"1B": (16, 2048, 32, 8, 64, 8192), "8B": (32, 4096, 32, 8, 128, 14336)}
K = 8  # candidates per row brought to the host (the processor's default depth)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, reps: int) -> float:
    """Median wall-clock milliseconds of fn(), device synchronized around each call."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


class DecodeStep:
    """The matrix products of one decode step of a dense model for B tokens (bf16)."""

    def __init__(self, shape: tuple, vocab: int, batch: int, device: torch.device,
                 dtype: torch.dtype):
        layers, hidden, heads, kv_heads, head, mlp = shape
        w = lambda i, o: torch.randn(i, o, device=device, dtype=dtype) * 0.02  # noqa: E731
        # one layer's weights, applied `layers` times: same shapes, same work, less memory
        self.layers = layers
        self.qkv = w(hidden, (heads + 2 * kv_heads) * head)
        self.out = w(heads * head, hidden)
        self.gate_up = w(hidden, 2 * mlp)
        self.down = w(mlp, hidden)
        self.head = w(hidden, vocab)
        self.x = torch.randn(batch, hidden, device=device, dtype=dtype)
        self.q_width = heads * head
        self.mlp = mlp

    def __call__(self) -> torch.Tensor:
        x = self.x
        for _ in range(self.layers):
            q = (x @ self.qkv)[:, :self.q_width]
            x = x + q @ self.out
            g = x @ self.gate_up
            x = x + g[:, :self.mlp] @ self.down
        return x @ self.head


def awrs_parts(logits: torch.Tensor, seeds: list[int], steps: list[int]) -> dict:
    """Callables for AWRS's step, whole and by part, on one batch of logits."""
    logprobs = torch.log_softmax(logits, dim=-1)
    keys = BlockKeys(logprobs, seeds, steps)
    top_keys, top_idx = keys.top(K)
    rng = np.random.default_rng(0)
    masks = [rng.random(logits.shape[-1]) < 0.2 for _ in range(logits.shape[0])]

    def host_copy():
        return torch.stack([top_idx.to(torch.float64), top_keys.to(torch.float64),
                            top_keys.to(torch.float64)]).cpu().numpy()

    return {"log_softmax": lambda: torch.log_softmax(logits, dim=-1),
            "block_keys": lambda: BlockKeys(logprobs, seeds, steps).top(K),
            "host_copy": host_copy,
            "plain_step": lambda: rank_batch(logits, seeds, steps, K),
            "masked_step": lambda: rank_batch(logits, seeds, steps, K, masks=masks)}


def check(device: torch.device) -> None:
    """The timed calls are AWRS's: candidates in key order, seeded rows repeat themselves,
    masked rows draw allowed tokens."""
    logits = torch.randn(4, 1000, device=device)
    a = rank_batch(logits, [1, 2, 3, 4], [0, 0, 0, 0], K)
    b = rank_batch(logits, [1, 2, 3, 4], [0, 0, 0, 0], K)
    assert (a.tokens == b.tokens).all(), "seeded Gumbel ranking does not repeat itself"
    keys = a.keys.full().gather(-1, torch.as_tensor(a.tokens, device=device))
    assert (keys[:, :-1] >= keys[:, 1:]).all(), "candidates are not in key order"
    allowed = np.zeros(1000, dtype=bool)
    allowed[::7] = True
    m = rank_batch(logits, [1, 2, 3, 4], [0, 0, 0, 0], K, masks=[allowed] * 4)
    assert all(allowed[m.stream(i).masked()[0]] for i in range(4)), "masked draw not allowed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes, runs on the CPU: checks the script, measures nothing")
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions per figure")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    args = ap.parse_args()
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        vocabs, batches, reps = {"smollm2": 49_152}, [1, 8], 3
        models = {"1B": (2, 2048, 32, 8, 64, 8192)}
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/awrs_gpu.py needs a CUDA GPU (use --smoke on the CPU)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        vocabs, batches, reps, models = VOCABS, BATCHES, args.reps, MODELS
    check(device)
    rows = []
    for vname, vocab in vocabs.items():
        for batch in batches:
            logits = torch.randn(batch, vocab, device=device)
            seeds, steps = list(range(batch)), [7] * batch
            parts = {name: timed(fn, device, reps)
                     for name, fn in awrs_parts(logits, seeds, steps).items()}
            for mname, shape in models.items():
                step = DecodeStep(shape, vocab, batch, device, dtype)
                decode = timed(step, device, reps)
                del step
                row = {"vocab": vname, "V": vocab, "batch": batch, "model": mname,
                       "decode_matmul_ms": round(decode, 4),
                       **{f"{k}_ms": round(v, 4) for k, v in parts.items()},
                       **{f"{kind}_share": round(parts[f"{kind}_step"]
                                                 / (decode + parts[f"{kind}_step"]), 4)
                          for kind in ("masked", "plain")}}
                rows.append(row)
                print(f"V={vocab:>7} B={batch:>4} {mname}: decode {decode:8.3f} ms  "
                      f"masked {parts['masked_step']:7.3f} ms ({row['masked_share']:.1%})  "
                      f"plain {parts['plain_step']:7.3f} ms ({row['plain_share']:.1%}; "
                      f"keys {parts['block_keys']:.3f}, copy {parts['host_copy']:.3f})",
                      flush=True)
            del logits
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result = {"device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                         else platform.processor() or platform.machine()),
              "torch": torch.__version__, "smoke": args.smoke, "k": K,
              "note": "decode = matrix products only (upper bound on AWRS's share)",
              "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
