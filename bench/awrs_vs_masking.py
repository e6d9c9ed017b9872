"""tether AWRS vs token masking (vLLM structured outputs with xgrammar and with guidance) and
genlm-control's AWRS, on JSONSchemaBench Github_easy schemas, in one run.

Every system gets the same model (the embedded SmolLM2-135M-Instruct), the same chat prompt per
schema, the same max_tokens and temperature, and all schemas in one batch (genlm-control runs
them one after another, each as one SMC run of --genlm-particles particles, so that each
schema has its own time). Each system runs
in its own subprocess, one after the other, so that engines do not share memory; genlm-control
runs in its own virtual environment (bench/.envs/genlm, made by ``--setup-genlm``).

Reported per system: refused schemas (rejected before generation), output tokens per second
(generated tokens over the wall time of compiling the schemas and generating, engine start and
model load excluded: every system's timer covers its schema compilation), the share of valid
outputs (parsed and validated with jsonschema and the schema draft's format checker, over all
schemas), finished outputs that are invalid, and for AWRS mean constraint checks and seconds in
the constraint per token.

The limit beside every row of tether and of the masking backends: right after a system runs,
plain vLLM (no constraint, no logits processor; the same model and engine settings as every
row: block size 32, prefix caching, eager mode, the engine core in the worker's own process)
decodes the same prompts, each forced to the token count that system produced for it
(``min_tokens`` = ``max_tokens`` = that count, ``ignore_eos``), timed the same way. ``time_over_reference`` is the system's wall time over
that reference's: 1.0 is decoding the same tokens with no constraint at all.

genlm-control runs SMC (``--genlm-particles``) on the first ``--genlm-schemas`` schemas; on the
same schemas, ``tether-smc`` runs tether's SMC with as many particles and the same ESS
threshold, so that the two AWRS-SMC implementations compare on the same work. The versions of
every system are printed and stored.

    .venv/bin/python bench/awrs_vs_masking.py                 # 100 schemas, all systems
    .venv/bin/python bench/awrs_vs_masking.py --schemas 30 --systems tether,xgrammar
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DATA_NOTE

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
GENLM_PY = ROOT / "bench" / ".envs" / "genlm" / "bin" / "python"
# tether and tether-smc run with exact step weights (the default on llguidance constraints);
# the -estimate systems with AWRS's estimated weights (the cost of exact weights: one mask per
# step instead of the estimator's second check)
# tether-canonical: tether on tether.Canonical(schema) (outputs spelled with the tokenizer's
# own encodings where the schema constrains the spelling; the cost of that filter)
SYSTEMS = ("tether", "tether-estimate", "tether-lcd", "tether-canonical", "xgrammar", "guidance",
           "tether-smc", "tether-smc-estimate", "genlm")
SUBSET_SYSTEMS = ("tether-smc", "tether-smc-estimate", "genlm")  # run on the first --genlm-schemas schemas
REFERENCED = ("tether", "tether-estimate", "tether-lcd", "tether-canonical", "xgrammar",
              "guidance")  # rows with a reference run
# engine settings every vLLM engine here shares (tether's defaults on the CPU)
VLLM_SETTINGS = {"max_model_len": 4096, "gpu_memory_utilization": 0.5, "enforce_eager": True,
                 "block_size": 32, "enable_prefix_caching": True}


def prompt_for(schema: dict) -> str:
    return ("Write a JSON object that matches this JSON Schema. Keep it short.\n"
            + json.dumps(schema))


def load_schemas(n: int) -> list[tuple[str, dict]]:
    from common import schema_files

    paths = schema_files("Github_easy", n)
    return [(p.stem, json.loads(p.read_text())) for p in paths]


def chat_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                        add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


# -- workers (each runs in its own process) ----------------------------------------------------

def same_process_layout() -> None:
    """Plain vLLM engines here run the way ``tether.LLM`` runs its own: the engine core in
    this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), the same KV space. With vLLM's
    default, a separate engine-core process polls the worker without sleeping and takes one
    of two cores from the model: the reference of 50 schemas x 128 tokens took 16.4-16.8 s
    that way and 9.2-10.6 s in-process."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def run_tether(job: dict, sampler: str, particles: int = 1, weights: str = "auto",
               canonical: bool = False) -> dict:
    from tether import Canonical, ConstraintError
    from tether.decode.llm import LLM

    llm = LLM(job["model"], max_model_len=4096)
    prompts, specs, names, refused = [], [], [], {}
    t0 = time.perf_counter()  # compilation is timed, as for every system
    for name, schema in job["schemas"]:
        spec = Canonical(schema) if canonical else schema
        try:
            llm.constraint(spec)
        except ConstraintError as e:
            refused[name] = str(e)[:200]
            continue
        prompts.append(prompt_for(schema))
        specs.append(spec)
        names.append(name)
    extra = {} if particles == 1 else {"particles": particles,
                                       "ess_threshold": job["genlm_ess_threshold"]}
    results = llm.generate(prompts, specs, max_tokens=job["max_tokens"],
                           temperature=job["temperature"], seed=job["seed"], sampler=sampler,
                           weights=weights, **extra)
    wall = time.perf_counter() - t0
    outputs = {}
    for n, r in zip(names, results):
        population = r.particles or [r]
        outputs[n] = {"text": r.text, "finish": r.finish_reason, "tokens": len(r.token_ids),
                      # as genlm's: the final particles' tokens, inherited prefixes included
                      "particle_tokens": sum(len(p.token_ids) for p in population),
                      "checks": sum(p.stats.get("checks", 0) for p in population),
                      "constraint_s": sum(p.stats.get("constraint_s", 0.0) for p in population)}
    llm.close()
    return {"wall_s": wall, "refused": refused, "outputs": outputs,
            "info": {"particles": particles}}


def run_vllm(job: dict, backend: str) -> dict:
    same_process_layout()
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from tether.models import resolve

    llm = LLM(model=resolve(job["model"]), seed=job["seed"], **VLLM_SETTINGS,
              structured_outputs_config={"backend": backend})
    tok = llm.get_tokenizer()
    engine = llm.llm_engine
    refused, names = {}, {}
    t0 = time.perf_counter()  # vLLM compiles each grammar once its request is added
    for i, (name, schema) in enumerate(job["schemas"]):
        params = SamplingParams(max_tokens=job["max_tokens"], temperature=job["temperature"],
                                structured_outputs=StructuredOutputsParams(json=schema))
        try:
            engine.add_request(str(i), {"prompt_token_ids": chat_ids(tok, prompt_for(schema))},
                               params)
            names[str(i)] = name
        except Exception as e:  # vLLM refuses the schema
            refused[name] = f"{type(e).__name__}: {str(e)[:200]}"
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                outputs[names[out.request_id]] = {"text": c.text, "tokens": len(c.token_ids),
                                                  "finish": c.finish_reason}
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "refused": refused, "outputs": outputs}


def run_reference(job: dict) -> dict:
    """Plain vLLM, no constraint: each schema's prompt decoded to ``job["forced"][name]`` tokens."""
    same_process_layout()
    from vllm import LLM, SamplingParams

    from tether.models import resolve

    llm = LLM(model=resolve(job["model"]), seed=job["seed"], **VLLM_SETTINGS)
    tok = llm.get_tokenizer()
    engine = llm.llm_engine
    names = {}
    t0 = time.perf_counter()
    for i, (name, schema) in enumerate(job["schemas"]):
        count = job["forced"].get(name)
        if not count:
            continue
        params = SamplingParams(max_tokens=count, min_tokens=count, ignore_eos=True,
                                temperature=job["temperature"])
        engine.add_request(str(i), {"prompt_token_ids": chat_ids(tok, prompt_for(schema))},
                           params)
        names[str(i)] = name
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[names[out.request_id]] = {"tokens": len(out.outputs[0].token_ids)}
    wall = time.perf_counter() - t0
    wrong = {n: (o["tokens"], job["forced"][n]) for n, o in outputs.items()
             if o["tokens"] != job["forced"][n]}
    if wrong or len(outputs) != len(names):
        raise RuntimeError(f"the reference did not decode the forced token counts: {wrong}")
    return {"wall_s": wall, "tokens": sum(o["tokens"] for o in outputs.values())}


def _genlm_particle(ctx, log_weight: float, max_tokens: int) -> dict:
    """One genlm-control SMC particle as text, finish reason and token count.

    What a particle holds (genlm-control 0.4.1, genlm/control/sampler/smc.py SequenceModel.step):
    a list of units, each a ``genlm.backend.tokenization.Token`` (a ``bytes`` subclass carrying
    ``token_id``) or the ``EOS`` marker. A particle ends in one of three ways:
    - it sampled EOS before the budget: context ends with EOS, finite weight ("stop");
    - it reached ``max_tokens``: SMC appends EOS itself at the last step, weighted by the EOS
      probability, which is -inf when the document is incomplete ("length");
    - AWRS rejected every token it tried: the step returns one of the rejected tokens with weight
      -inf and the particle is finished with that token appended ("dead"). That last unit is not
      part of the constrained sample, so it is cut off the text and kept under ``rejected``.
    ``tokens`` counts the particle's SMC steps (units, EOS included, the rejected one too), each
    of which cost one language-model evaluation.
    """
    import math

    from genlm.control.constant import EndOfSequence

    units = list(ctx)
    ended = bool(units) and isinstance(units[-1], EndOfSequence)
    alive = math.isfinite(log_weight)  # SMC maps NaN to -inf; +inf is refused
    rejected = None
    if ended and len(units) >= max_tokens:
        finish, body = "length", units[:-1]
    elif alive and ended:
        finish, body = "stop", units[:-1]
    elif not alive:
        finish, body = "dead", units[:-1]
        last = units[-1]
        rejected = ("EOS" if isinstance(last, EndOfSequence)
                    else bytes(last).decode("utf-8", errors="replace"))
    else:  # cannot happen in genlm-control 0.4.1: every finished particle ends with EOS or died
        finish, body = "unfinished", units
    for unit in body:
        if not isinstance(unit, bytes):
            raise TypeError(f"unexpected unit {unit!r} in a genlm-control context")
    data = b"".join(bytes(u) for u in body)
    try:
        text, utf8 = data.decode("utf-8"), True
    except UnicodeDecodeError:
        text, utf8 = data.decode("utf-8", errors="replace"), False
    out = {"text": text, "tokens": len(units), "finish": finish, "log_weight": float(log_weight),
           "complete": bool(ended and alive), "utf8": utf8}
    if rejected is not None:
        out["rejected"] = rejected
    return out


def run_genlm(job: dict) -> dict:
    """genlm-control's AWRS inside its SMC, with its transformers backend on the CPU.

    Used the way its README does JSON schemas (PromptedLLM with the chat-template prompt_ids and
    the chat model's end-of-turn token as EOS, ``JsonSchema(schema).coerce(llm, f=b"".join)``,
    ``AWRS(llm, condition).smc(n_particles, ess_threshold=0.5, max_tokens)``), and its output read
    the way ``Sequences.decoded_posterior`` reads it: among the particles that ended with EOS with
    a nonzero weight and decode as UTF-8, one is drawn in proportion to its weight. Where no
    particle completed, the output says so (finish "dead" or "length", ``complete`` false) and
    shows the particle that got furthest.

    Timed per schema, like the other systems' generation: building the constraint (JsonSchema and
    its coercion to the model's byte tokens: genlm-control's "compilation"), prefilling the
    prompt, and SMC. Schemas run one after another (per-schema times); the model load is timed
    apart and excluded.
    """
    import asyncio
    import importlib.metadata

    import numpy as np
    import torch
    from genlm.control import AWRS, JsonSchema, PromptedLLM

    if job.get("genlm_threads"):
        torch.set_num_threads(int(job["genlm_threads"]))
    n_particles = int(job.get("genlm_particles", 4))
    ess_threshold = float(job.get("genlm_ess_threshold", 0.5))
    cache_prompt = bool(job.get("genlm_cache_prompt", True))
    max_tokens = job["max_tokens"]

    t0 = time.perf_counter()
    # SmolLM2-Instruct ends a turn with <|im_end|>, its tokenizer's eos_token (id 2), which is
    # also what vLLM stops on (generation_config.json eos_token_id).
    base = PromptedLLM.from_name(job["model_path"], backend="hf",
                                 eos_byte_strings=[b"<|im_end|>"],
                                 temperature=job["temperature"])
    load_s = time.perf_counter() - t0
    tokenizer = base.model.tokenizer
    rng = np.random.default_rng(job["seed"])

    async def one(name: str, schema: dict, refused: dict) -> dict | None:
        # No cross-schema reuse of the backend's logprob/KV trie (it would also grow without end).
        base.model.clear_cache()
        t_start = time.perf_counter()
        try:
            llm = base.spawn(prompt_ids=chat_ids(tokenizer, prompt_for(schema)))
            condition = JsonSchema(schema).coerce(llm, f=b"".join)
            sampler = AWRS(llm, condition, seed=job["seed"])
        except Exception as e:  # genlm-control rejects the schema (invalid, unsupported)
            refused[name] = f"{type(e).__name__}: {str(e)[:200]}"
            return None
        compile_s = time.perf_counter() - t_start
        try:
            if cache_prompt:
                # genlm-backend's AsyncTransformer.cache_kv: later queries run only the tokens
                # past the prompt, instead of prefilling the prompt again at every step.
                base.model.cache_kv(llm.prompt_ids)
            seqs = await sampler.smc(n_particles=n_particles, ess_threshold=ess_threshold,
                                     max_tokens=max_tokens)
        except Exception as e:  # a failure inside generation: an output that counts as invalid
            base.model.reset_async_queries()
            return {"text": "", "tokens": 0, "finish": "error", "complete": False,
                    "error": f"{type(e).__name__}: {str(e)[:200]}", "compile_s": compile_s,
                    "wall_s": time.perf_counter() - t_start}
        wall = time.perf_counter() - t_start
        parts = [_genlm_particle(c, float(w), max_tokens)
                 for c, w in zip(seqs.contexts, seqs.log_weights)]
        done = [i for i, p in enumerate(parts) if p["complete"] and p["utf8"]]
        if done:
            lw = np.array([parts[i]["log_weight"] for i in done])
            probs = np.exp(lw - lw.max())
            pick = done[int(rng.choice(len(done), p=probs / probs.sum()))]
        else:  # nothing complete: show the particle that got furthest, marked as such
            pick = max(range(len(parts)), key=lambda i: parts[i]["tokens"])
        out = dict(parts[pick])
        out.update(wall_s=wall, compile_s=compile_s, n_complete=len(done),
                   particle_tokens=sum(p["tokens"] for p in parts),
                   particles=[{k: p[k] for k in ("finish", "tokens", "log_weight", "text",
                                                 "rejected") if k in p}
                              for p in parts])
        return out

    async def main() -> dict:
        np.random.seed(job["seed"])  # SMC's multinomial resampling draws from numpy's global RNG
        torch.manual_seed(job["seed"])
        refused, outputs, total = {}, {}, 0.0
        for name, schema in job["schemas"]:
            t_start = time.perf_counter()
            out = await one(name, schema, refused)
            total += time.perf_counter() - t_start  # refused schemas' compile time counts too
            if out is None:
                continue
            outputs[name] = out
            print(f"genlm {name}: {out['finish']} {out['tokens']} tok {out['wall_s']:.1f}s "
                  f"{out['text'][:80]!r}", flush=True)
        return {"wall_s": total, "refused": refused, "outputs": outputs}

    result = asyncio.run(main())
    result["info"] = {"genlm_control": importlib.metadata.version("genlm-control"),
                      "genlm_backend": importlib.metadata.version("genlm-backend"),
                      "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                      "load_s": load_s, "particles": n_particles,
                      "ess_threshold": ess_threshold, "cache_prompt": cache_prompt,
                      "max_tokens": max_tokens}
    return result


# -- the orchestrator --------------------------------------------------------------------------

def score(schemas: list[tuple[str, dict]], result: dict) -> dict:
    import jsonschema

    valid = invalid_finished = finished = tokens = checks = 0
    finish_counts: dict[str, int] = {}
    constraint_s = 0.0
    for name, schema in schemas:
        out = result["outputs"].get(name)
        if out is None:
            continue
        tokens += out["tokens"]
        checks += out.get("checks", 0)
        constraint_s += out.get("constraint_s", 0.0)
        ok = False
        try:
            cls = jsonschema.validators.validator_for(schema)
            validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
            ok = validator.is_valid(json.loads(out["text"]))
        except Exception:
            ok = False
        finish_counts[out["finish"]] = finish_counts.get(out["finish"], 0) + 1
        if out["finish"] == "stop":
            finished += 1
            invalid_finished += not ok
        valid += ok
    n = len(schemas)
    row = {"schemas": n, "refused": len(result["refused"]), "finished": finished,
           "valid": valid, "valid_share": valid / n, "invalid_finished": invalid_finished,
           "finish_reasons": finish_counts,
           "tokens": tokens, "wall_s": result["wall_s"],
           "tok_per_s": tokens / result["wall_s"] if result["wall_s"] else 0.0}
    if checks:
        row["checks_per_token"] = checks / tokens
        row["constraint_us_per_token"] = 1e6 * constraint_s / tokens
    return row


def run_system(system: str, job: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        python = str(GENLM_PY) if system == "genlm" else sys.executable
        if system == "genlm" and not GENLM_PY.exists():
            raise SystemExit("genlm-control is not installed; run with --setup-genlm first")
        cmd = [python, str(Path(__file__).resolve()), "--worker", system, "--job", str(job_path),
               "--out", str(out_path)]
        env = dict(os.environ, PYTHONPATH=str(ROOT) if system != "genlm" else "")
        subprocess.run(cmd, check=True, env=env)
        return json.loads(out_path.read_text())


def setup_genlm() -> None:
    # Versions this harness was checked against (genlm-control's API moves between releases:
    # 0.4 made tokens `Token` objects and forces EOS at max_tokens).
    subprocess.run([sys.executable, "-m", "venv", str(GENLM_PY.parent.parent)], check=True)
    subprocess.run([str(GENLM_PY), "-m", "pip", "install", "torch==2.13.0",
                    "genlm-control==0.4.1", "genlm-backend==0.3.1", "transformers==5.24.0"],
                   check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, epilog=DATA_NOTE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemas", type=int, default=100)
    ap.add_argument("--genlm-schemas", type=int, default=10,
                    help="genlm-control is slow on the CPU: time it on a prefix")
    ap.add_argument("--genlm-particles", type=int, default=4,
                    help="SMC particles per schema for genlm-control")
    ap.add_argument("--genlm-ess-threshold", type=float, default=0.5,
                    help="genlm-control resamples when ESS falls below this share of particles")
    ap.add_argument("--genlm-no-cache-prompt", action="store_true",
                    help="do not KV-cache the prompt (genlm-backend's cache_kv) for genlm-control")
    ap.add_argument("--genlm-threads", type=int, default=0,
                    help="torch threads for genlm-control (0: torch's default)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--systems", default="tether,tether-lcd,xgrammar,guidance,tether-smc,genlm")
    ap.add_argument("--out", default=str(RESULTS / "awrs_vs_masking.json"))
    ap.add_argument("--setup-genlm", action="store_true")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the unconstrained reference run after each system")
    ap.add_argument("--worker", choices=SYSTEMS + ("reference",), help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        job = json.loads(Path(args.job).read_text())
        if args.worker == "tether":
            result = run_tether(job, "awrs")
        elif args.worker == "tether-lcd":
            result = run_tether(job, "lcd")
        elif args.worker == "tether-canonical":
            result = run_tether(job, "awrs", canonical=True)
        elif args.worker == "tether-estimate":
            result = run_tether(job, "awrs", weights="estimate")
        elif args.worker == "tether-smc":
            result = run_tether(job, "awrs", particles=job["genlm_particles"])
        elif args.worker == "tether-smc-estimate":
            result = run_tether(job, "awrs", particles=job["genlm_particles"],
                                weights="estimate")
        elif args.worker == "genlm":
            result = run_genlm(job)
        elif args.worker == "reference":
            result = run_reference(job)
        else:
            result = run_vllm(job, args.worker)
        Path(args.out).write_text(json.dumps(result))
        return
    if args.setup_genlm:
        setup_genlm()
        return

    from tether.models import resolve

    schemas = load_schemas(args.schemas)
    base = {"model": "smollm2", "model_path": resolve("smollm2"), "max_tokens": args.max_tokens,
            "temperature": args.temperature, "seed": args.seed,
            "genlm_particles": args.genlm_particles,
            "genlm_ess_threshold": args.genlm_ess_threshold,
            "genlm_cache_prompt": not args.genlm_no_cache_prompt,
            "genlm_threads": args.genlm_threads}
    table = {}
    for system in args.systems.split(","):
        subset = schemas[: args.genlm_schemas] if system in SUBSET_SYSTEMS else schemas
        print(f"== {system} on {len(subset)} schemas", flush=True)
        result = run_system(system, dict(base, schemas=subset))
        table[system] = score(subset, result)
        table[system]["refused_names"] = sorted(result["refused"])
        table[system]["outputs"] = result["outputs"]
        if "info" in result:
            table[system]["info"] = result["info"]
        if system in REFERENCED and not args.no_reference:
            forced = {n: o["tokens"] for n, o in result["outputs"].items() if o["tokens"]}
            print(f"== unconstrained reference for {system}", flush=True)
            ref = run_system("reference", dict(base, schemas=subset, forced=forced))
            table[system]["reference"] = ref
            table[system]["time_over_reference"] = table[system]["wall_s"] / ref["wall_s"]
        print(json.dumps({k: v for k, v in table[system].items() if k != "outputs"}), flush=True)
    from common import cpu_name, versions

    peers = versions("vllm-cpu", "vllm", "xgrammar", "llguidance", "torch")
    if "genlm" in table:
        peers["genlm-control"] = table["genlm"]["info"]["genlm_control"]
    print("versions:", json.dumps(peers))
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": {k: v for k, v in base.items()
                                                     if k != "model_path"} | {
        "schemas": args.schemas, "genlm_schemas": args.genlm_schemas}, "versions": peers,
        "machine": {"cpu": cpu_name(), "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "systems": table}, indent=2))
    print(markdown(table))


def markdown(table: dict) -> str:
    lines = ["| system | schemas | refused | valid | invalid finished | tok/s | time / reference "
             "| checks/token | constraint µs/token |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in table.items():
        lines.append(f"| {name} | {r['schemas']} | {r['refused']} | {r['valid_share']:.0%} | "
                     f"{r['invalid_finished']} | {r['tok_per_s']:.1f} | "
                     f"{r.get('time_over_reference', float('nan')):.2f} | "
                     f"{r.get('checks_per_token', float('nan')):.2f} | "
                     f"{r.get('constraint_us_per_token', float('nan')):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
