"""TCA-Attention quality against full attention, StreamingLLM and SnapKV at equal KV budgets.

Protocol (the one kvpress evaluates presses with): the context is prefilled with full
attention, then its KV cache is cut to the budget, then the continuation runs on the cut cache.
- TCA (ours, transformers with the attention routed through ``tether.attention``): one
  calibration (``tether calibrate``, tau 0.9, blocks of 128, on the first 2,048 tokens of
  WikiText-2 validation, which the evaluation windows skip); every layer keeps the budget's
  share, its heads split it in their calibrated proportions (``scale_profiles``); token
  scores pooled over the context's last 128 queries; 4 sinks and a recent window of 3/4 of
  the budget (at least 128 tokens) always kept (``budgets.plan``; ``--observe``,
  ``--recent``, ``--window``). ``tca_tau`` is the calibrated budget itself (tau 0.9),
  whatever share that keeps;
- StreamingLLM (4 sinks + recent window) and SnapKV (observation window 64, kvpress's
  default, and 128, TCA's; kernel 5): NVIDIA's kvpress
  0.5.5, in its own environment (bench/.envs/kvpress: it pins transformers < 5.3), same model
  files, same token ids; each environment computes its own full-attention reference. Each
  press's own ``compress`` runs on the one full prefill of a task (``kvpress_worker``).
Measures, for contexts of 2k, 4k and 8k tokens from ``../shared/data/wikitext-2/valid.txt``:
- fidelity: KL(full || method) of the next-token distributions over a 64-token continuation,
  and the continuation's perplexity;
- retrieval: a 5-digit pass key hidden at several depths of WikiText filler, then "What is the
  pass key?", greedy; accuracy (reported where full attention finds it);
- KV kept: the measured share of cached tokens, KV MiB and attention MFLOP per generated token.

    .venv/bin/python bench/tca_quality.py [--setup-kvpress] [--lengths 2048,4096,8192]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import DATA_NOTE, shared_data

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
KVPRESS_PY = ROOT / "bench" / ".envs" / "kvpress" / "bin" / "python"
CALIBRATION_TOKENS = 2048
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


# --------------------------------------------------------------------------- tasks (main env)

def build_tasks(tokenizer, lengths: list[int], windows: int, depths: int, cont: int,
                seed: int) -> list[dict]:
    ids = tokenizer(shared_data("wikitext-2", "valid.txt").read_text(encoding="utf-8")).input_ids
    rng = random.Random(seed)
    tasks = []
    for L in lengths:
        span = len(ids) - CALIBRATION_TOKENS - L - cont
        for w in range(windows):
            o = CALIBRATION_TOKENS + (w + 1) * span // (windows + 1)
            tasks.append({"kind": "fidelity", "length": L, "context": ids[o:o + L],
                          "continuation": ids[o + L:o + L + cont]})
        question = tokenizer(QUESTION, add_special_tokens=False).input_ids
        for d in range(depths):
            key = str(rng.randrange(10000, 100000))
            needle = tokenizer(NEEDLE.format(key=key), add_special_tokens=False).input_ids
            o = CALIBRATION_TOKENS + rng.randrange(span)
            filler = ids[o:o + L - len(needle)]
            at = int(len(filler) * (d + 0.5) / depths)
            tasks.append({"kind": "passkey", "length": L, "depth": (d + 0.5) / depths,
                          "context": filler[:at] + needle + filler[at:],
                          "continuation": question, "key": key})
    return tasks


# ------------------------------------------------------------------ shared by both envs' workers

def continuation_logprobs(model, cache, context_len: int, cont: list[int]) -> torch.Tensor:
    """log-softmax [len(cont) - 1, V] predicting cont[1:] after the (cut) cached context."""
    ids = torch.tensor([cont[:-1]])
    pos = torch.arange(context_len, context_len + ids.shape[1])[None]
    logits = model(input_ids=ids, past_key_values=cache, position_ids=pos).logits[0]
    return torch.log_softmax(logits.float(), -1)


def greedy(model, cache, context_len: int, prompt: list[int], tokens: int = 8) -> list[int]:
    ids = torch.tensor([prompt])
    pos = torch.arange(context_len, context_len + ids.shape[1])[None]
    out = []
    for _ in range(tokens):
        nxt = int(model(input_ids=ids, past_key_values=cache, position_ids=pos).logits[0, -1]
                  .argmax())
        out.append(nxt)
        ids, pos = torch.tensor([[nxt]]), pos[:, -1:] + 1
    return out


def crop(cache, lengths: list[int]) -> None:
    """Drop what a continuation appended to each layer of the cache."""
    for layer, n in zip(cache.layers, lengths):
        layer.keys, layer.values = layer.keys[:, :, :n], layer.values[:, :, :n]


def score(task: dict, full: torch.Tensor | None, lp: torch.Tensor | None, answer: list[int],
          tokenizer) -> dict:
    if task["kind"] == "passkey":
        text = tokenizer.decode(answer)
        return {"hit": task["key"] in text, "answer": text}
    target = torch.tensor(task["continuation"][1:])
    nll = -lp.gather(1, target[:, None]).squeeze(1)
    kl = (full.exp() * (full - lp)).sum(-1)
    return {"nll": float(nll.mean()), "kl": float(kl.mean())}


def cache_lengths(cache) -> list[int]:
    return [layer.keys.shape[2] for layer in cache.layers]


def run_task(model, tokenizer, task: dict, variants, make_cache, during_prefill=None) -> list[dict]:
    """Full attention, then each variant, on one task.

    The full prefill runs under ``during_prefill`` (a probe that selects tokens, or nothing).
    ``variants``: (name, budget, prefill) with ``prefill(ctx, full_cache, lengths)`` returning
    (cache, context manager for the continuation, kept share); ``lengths`` are the full
    cache's per-layer lengths after the context, to crop it back to.
    """
    import contextlib

    ctx, cont = task["context"], task["continuation"]
    rows = []
    with torch.no_grad():
        cache = make_cache()
        with during_prefill or contextlib.nullcontext():
            model(input_ids=torch.tensor([ctx]), past_key_values=cache)
        lengths = cache_lengths(cache)
        if task["kind"] == "fidelity":
            full = continuation_logprobs(model, cache, len(ctx), cont)
            answer = []
        else:
            full, answer = None, greedy(model, cache, len(ctx), cont)
        rows.append({"method": "full", "budget": 1.0, "kept": 1.0,
                     **score(task, full, full, answer, tokenizer)})
        for name, budget, prefill in variants:
            cut, context, kept = prefill(ctx, cache, lengths)
            with context:
                if task["kind"] == "fidelity":
                    lp, answer = continuation_logprobs(model, cut, len(ctx), cont), []
                else:
                    lp, answer = None, greedy(model, cut, len(ctx), cont)
            rows.append({"method": name, "budget": budget, "kept": kept,
                         **score(task, full, lp, answer, tokenizer)})
    return rows


# ------------------------------------------------------------------------ kvpress env worker

def kvpress_worker(job: dict) -> list[dict]:
    """StreamingLLM and SnapKV from kvpress at every budget, from one full prefill per task.

    A press compresses each layer's cache in a hook after that layer's attention, from the
    layer's inputs (hidden states, keys, values) of the full-attention prefill: later layers
    never see the cut. So calling every press's own ``compress`` in one such hook, on one
    prefill, gives each press exactly the cache its context manager would have left.
    """
    import contextlib

    from kvpress import SnapKVPress, StreamingLLMPress
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    presses = []
    for budget in job["budgets"]:
        presses.append(("streaming_llm", budget, StreamingLLMPress(1 - budget, n_sink=4)))
        presses.append(("snapkv", budget, SnapKVPress(1 - budget, window_size=64)))
        presses.append(("snapkv_w128", budget, SnapKVPress(1 - budget, window_size=128)))
    cut: dict = {}

    def compress_all(module, args, kwargs, output):
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        for name, budget, press in presses:
            keys, values = press.compress(module, kwargs["hidden_states"], layer.keys,
                                          layer.values, output[1], kwargs)
            cut.setdefault((name, budget), {})[module.layer_idx] = (keys, values)

    class Capture:
        def __enter__(self):
            self.handles = [layer.self_attn.register_forward_hook(compress_all, with_kwargs=True)
                            for layer in model.model.layers]

        def __exit__(self, *exc):
            for h in self.handles:
                h.remove()

    out = []
    for t, task in enumerate(job["tasks"]):
        cut.clear()
        variants = []
        for name, budget, _ in presses:
            def prefill(ctx, full_cache, lengths, key=(name, budget)):
                cache = DynamicCache(config=model.config)
                for i in range(len(model.model.layers)):
                    cache.update(*cut[key][i], i)
                kept = sum(cache_lengths(cache)) / (len(cache.layers) * len(ctx))
                return cache, contextlib.nullcontext(), kept
            variants.append((name, budget, prefill))
        rows = run_task(model, tokenizer, task, variants,
                        lambda: DynamicCache(config=model.config), during_prefill=Capture())
        out.extend({"task": t, "env": "kvpress", **r} for r in rows)
        print(f"kvpress task {t + 1}/{len(job['tasks'])}", file=sys.stderr, flush=True)
    return out


# --------------------------------------------------------------------------- tether (main env)

def tether_rows(model_name: str, tasks: list[dict], budget_file: Path,
                budgets_list: list[float], recent: float | None) -> list[dict]:
    from transformers import DynamicCache

    from tether.attention.budgets import Budgets, plan
    from tether.attention.hf import Probe, kv_shape, load_model
    from tether.attention.select import dense_to_paged, select

    model, tokenizer = load_model(model_name)
    layers, kv_heads = kv_shape(model.config)
    budgets = Budgets.load(budget_file, num_layers=layers, num_kv_heads=kv_heads,
                           model=model_name)

    def select_layer(queries, keys, scaling, profiles, window):
        L = keys.shape[2]
        cache, table = dense_to_paged(keys, page=64)
        _, _, mask = select(queries, cache, table, torch.tensor([L]), profiles, block=budgets.block,
                            sinks=budgets.sinks, window=window, scale=scaling)
        return mask[:, :, :L]

    class Selector(Probe):
        """Selects, from each layer's last context queries, the tokens every budget keeps."""

        def __init__(self, plans, windows):
            super().__init__(budgets.observe)
            self.plans, self.windows = plans, windows  # name -> per-layer profiles, window
            self.masks = {name: {} for name in plans}

        def on_last_queries(self, layer, queries, keys, scaling, visible):
            for name, profiles in self.plans.items():
                self.masks[name][layer] = select_layer(queries, keys, scaling, profiles[layer],
                                                       self.windows[name])

    out = []
    for t, task in enumerate(tasks):
        L = len(task["context"])
        # every layer gets the budget share, its heads split it in calibrated proportions,
        # and ``plan`` sizes the recent window
        plans, windows = {}, {}
        for b in budgets_list:
            plans[f"tca@{b}"], windows[f"tca@{b}"] = plan(
                budgets, L, b, **({"recent": recent} if recent is not None else {}))
        plans["tca@tau"], windows["tca@tau"] = budgets.profiles, budgets.window
        selector = Selector(plans, windows)
        variants = []
        for name in plans:
            # one full prefill serves every budget: the cache is cropped back to the context
            # and the budget's selection is hidden from the continuation by the keep masks
            def prefill(ctx, full_cache, lengths, name=name):
                crop(full_cache, lengths)
                probe = Probe()
                probe.record, probe.keep = False, selector.masks[name]
                kept = float(torch.stack([m.float().mean() for m in probe.keep.values()]).mean())
                return full_cache, probe, kept
            budget = float(name.split("@")[1]) if name != "tca@tau" else None
            variants.append((name.split("@")[0] if budget is not None else "tca_tau", budget,
                             prefill))
        rows = run_task(model, tokenizer, task, variants,
                        lambda: DynamicCache(config=model.config), during_prefill=selector)
        out.extend({"task": t, "env": "tether", **r} for r in rows)
        print(f"tether task {t + 1}/{len(tasks)}", file=sys.stderr, flush=True)
    return out


# ------------------------------------------------------------------------------- reporting

def summarize(rows: list[dict], tasks: list[dict], config: dict) -> dict:
    """Mean KL, perplexity and pass-key accuracy per (length, method, budget), with KV kept."""
    groups: dict = {}
    for r in rows:
        task = tasks[r["task"]]
        name = r["method"] if r["method"] != "full" else f"full ({r['env']})"
        key = (task["length"], name, r["budget"])
        g = groups.setdefault(key, {"kl": [], "nll": [], "hit": [], "kept": []})
        g["kept"].append(r["kept"])
        if task["kind"] == "fidelity":
            g["kl"].append(r["kl"])
            g["nll"].append(r["nll"])
        else:
            g["hit"].append(r["hit"])
    table = []
    for (L, name, budget), g in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                         kv[0][2] or 0)):
        kept = sum(g["kept"]) / len(g["kept"])
        kv_bytes = 2 * config["layers"] * config["kv_heads"] * config["head_dim"] * 4 * L
        table.append({
            "length": L, "method": name, "budget": budget, "kept": kept,
            "kl": sum(g["kl"]) / len(g["kl"]) if g["kl"] else None,
            "ppl": math.exp(sum(g["nll"]) / len(g["nll"])) if g["nll"] else None,
            "passkey": sum(g["hit"]) / len(g["hit"]) if g["hit"] else None,
            "kv_mib": kept * kv_bytes / 2 ** 20,
            # q.k and p.v for every query head over the kept tokens, every layer
            "attn_mflop_per_token": 4 * config["layers"] * config["heads"] * config["head_dim"]
            * kept * L / 1e6,
        })
    return table


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in table})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for ax, L in zip(axes[0], lengths):
        for method in ("tca", "streaming_llm", "snapkv", "snapkv_w128"):
            pts = sorted((r["budget"], r["kl"]) for r in table
                         if r["length"] == L and r["method"] == method and r["kl"] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_yscale("log")
        ax.set_xlabel("KV budget (share of tokens kept)")
        ax.set_ylabel("KL(full || method), nats/token")
        ax.set_title(f"{L} tokens of context")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, epilog=DATA_NOTE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--budgets", default="0.1,0.2,0.4,0.6")
    ap.add_argument("--windows", type=int, default=2, help="fidelity windows per length")
    ap.add_argument("--depths", type=int, default=3, help="pass-key depths per length")
    ap.add_argument("--continuation", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=int, default=128, help="TCA's recent window (tokens)")
    ap.add_argument("--recent", type=float,
                    help="share of each budget TCA gives the recent window (default: plan's)")
    ap.add_argument("--observe", type=int,
                    help="last context queries whose scores TCA pools (default: calibrate's)")
    ap.add_argument("--skip-kvpress", action="store_true")
    ap.add_argument("--setup-kvpress", action="store_true",
                    help="create bench/.envs/kvpress with kvpress 0.5.5, then run")
    ap.add_argument("--out", default=str(RESULTS / "tca_quality.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:  # inside the kvpress environment
        job = json.loads(Path(args.worker).read_text())
        Path(job["out"]).write_text(json.dumps(kvpress_worker(job)))
        return
    if args.setup_kvpress:
        subprocess.run([sys.executable, "-m", "venv", str(KVPRESS_PY.parents[1])], check=True)
        subprocess.run([str(KVPRESS_PY), "-m", "pip", "install", "kvpress==0.5.5"], check=True)

    from transformers import AutoConfig, AutoTokenizer

    from tether.attention.calibrate import calibrate_to_file
    from tether.models import resolve

    torch.manual_seed(args.seed)
    path = resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    lengths = [int(x) for x in args.lengths.split(",")]
    budgets = [float(x) for x in args.budgets.split(",")]
    tasks = build_tasks(tokenizer, lengths, args.windows, args.depths, args.continuation,
                        args.seed)
    RESULTS.mkdir(parents=True, exist_ok=True)
    budget_file = Path(args.out).with_name(f"tca_budgets_{args.model}.json")
    t0 = time.perf_counter()
    calibrate_to_file(args.model, budget_file, tau=0.9, block=128,
                      text=shared_data("wikitext-2", "valid.txt").read_text(encoding="utf-8")[:200_000],
                      tokens=CALIBRATION_TOKENS, window=args.window,
                      **({"observe": args.observe} if args.observe else {}))
    timing = {"calibrate_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    rows = tether_rows(args.model, tasks, budget_file, budgets, args.recent)
    timing["tether_s"] = time.perf_counter() - t0
    if not args.skip_kvpress:
        if not KVPRESS_PY.exists():
            raise SystemExit("kvpress is not installed; run with --setup-kvpress")
        job_path, out_path = RESULTS / ".kvpress_job.json", RESULTS / ".kvpress_out.json"
        job_path.write_text(json.dumps({"model": path, "tasks": tasks, "budgets": budgets,
                                        "out": str(out_path)}))
        t0 = time.perf_counter()
        env = dict(os.environ, PYTHONPATH="")
        subprocess.run([str(KVPRESS_PY), str(Path(__file__).resolve()), "--worker",
                        str(job_path)], check=True, env=env)
        timing["kvpress_s"] = time.perf_counter() - t0
        rows += json.loads(out_path.read_text())
        job_path.unlink()
        out_path.unlink()
    cfg = AutoConfig.from_pretrained(path)
    config = {"layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
              "kv_heads": cfg.num_key_value_heads,
              "head_dim": cfg.hidden_size // cfg.num_attention_heads}
    table = summarize(rows, tasks, config)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "worker")}
    Path(args.out).write_text(json.dumps({"config": settings, "model": config, "timing": timing,
                                          "table": table, "rows": rows}, indent=1))
    plot(table, Path(args.out).with_suffix(".png"))
    print("| context | method | budget | kept | KL | ppl | pass key | KV MiB | attn MFLOP/token |")
    print("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in table:
        print(f"| {r['length']} | {r['method']} | {fmt(r['budget'], '.0%')} | "
              f"{r['kept']:.0%} | {fmt(r['kl'], '.4f')} | {fmt(r['ppl'], '.2f')} | "
              f"{fmt(r['passkey'], '.0%')} | {r['kv_mib']:.1f} | "
              f"{r['attn_mflop_per_token']:.1f} |")


if __name__ == "__main__":
    main()
