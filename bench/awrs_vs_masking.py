"""tether AWRS vs token masking (vLLM structured outputs with xgrammar and with guidance) and
genlm-control's AWRS, on JSONSchemaBench Github_easy schemas, in one run.

Every system gets the same model (the embedded SmolLM2-135M-Instruct), the same chat prompt per
schema, the same max_tokens and temperature, and all schemas in one batch (genlm-control runs
them one after another: it has no batched path on its transformers backend). Each system runs
in its own subprocess, one after the other, so that engines do not share memory; genlm-control
runs in its own virtual environment (bench/.envs/genlm, made by ``--setup-genlm``).

Reported per system: refused schemas (rejected before generation), output tokens per second
(generated tokens over the wall time of generation, engine start excluded), the share of valid
outputs (parsed and validated with jsonschema, over all schemas), finished outputs that are
invalid, and for AWRS mean constraint checks and seconds in the constraint per token.

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

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "jsonschemabench" / "Github_easy"
RESULTS = ROOT / "bench" / "results"
GENLM_PY = ROOT / "bench" / ".envs" / "genlm" / "bin" / "python"
SYSTEMS = ("tether", "tether-lcd", "xgrammar", "guidance", "genlm")


def prompt_for(schema: dict) -> str:
    return ("Write a JSON object that matches this JSON Schema. Keep it short.\n"
            + json.dumps(schema))


def load_schemas(n: int) -> list[tuple[str, dict]]:
    paths = sorted(DATA.glob("*.json"))[:n]
    return [(p.stem, json.loads(p.read_text())) for p in paths]


def chat_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                        add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


# -- workers (each runs in its own process) ----------------------------------------------------

def run_tether(job: dict, sampler: str) -> dict:
    from tether import ConstraintError
    from tether.decode.llm import LLM

    llm = LLM(job["model"], max_model_len=4096)
    prompts, specs, names, refused = [], [], [], {}
    for name, schema in job["schemas"]:
        try:
            llm.constraint(schema)
        except ConstraintError as e:
            refused[name] = str(e)[:200]
            continue
        prompts.append(prompt_for(schema))
        specs.append(schema)
        names.append(name)
    t0 = time.perf_counter()
    results = llm.generate(prompts, specs, max_tokens=job["max_tokens"],
                           temperature=job["temperature"], seed=job["seed"], sampler=sampler)
    wall = time.perf_counter() - t0
    outputs = {n: {"text": r.text, "tokens": len(r.token_ids), "finish": r.finish_reason,
                   "checks": r.stats.get("checks", 0),
                   "constraint_s": r.stats.get("constraint_s", 0.0)}
               for n, r in zip(names, results)}
    llm.close()
    return {"wall_s": wall, "refused": refused, "outputs": outputs}


def run_vllm(job: dict, backend: str) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from tether.models import resolve

    llm = LLM(model=resolve(job["model"]), max_model_len=4096, gpu_memory_utilization=0.5,
              enforce_eager=True, seed=job["seed"],
              structured_outputs_config={"backend": backend})
    tok = llm.get_tokenizer()
    engine = llm.llm_engine
    refused, names = {}, {}
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
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                outputs[names[out.request_id]] = {"text": c.text, "tokens": len(c.token_ids),
                                                  "finish": c.finish_reason}
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "refused": refused, "outputs": outputs}


def run_genlm(job: dict) -> dict:
    """genlm-control's AWRS with its transformers backend, on the CPU, schema after schema."""
    import asyncio

    from genlm.control import AWRS, EOS, JsonSchema, PromptedLLM

    llm = PromptedLLM.from_name(job["model_path"], backend="hf", eos_byte_strings=[b"<|im_end|>"],
                                temperature=job["temperature"])
    refused, outputs = {}, {}
    total = 0.0
    for name, schema in job["schemas"]:
        try:
            condition = JsonSchema(schema).coerce(llm, f=b"".join)
        except Exception as e:
            refused[name] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        llm.prompt_ids = chat_ids(llm.model.tokenizer, prompt_for(schema))
        sampler = AWRS(llm, condition, seed=job["seed"])
        t0 = time.perf_counter()
        seqs = asyncio.run(sampler.smc(n_particles=1, ess_threshold=0.0,
                                       max_tokens=job["max_tokens"]))
        total += time.perf_counter() - t0
        ctx = seqs.contexts[0]
        data = b"".join(t.byte_string for t in ctx if hasattr(t, "byte_string"))
        ended = len(ctx) > 0 and ctx[-1] is EOS
        outputs[name] = {"text": data.decode("utf-8", errors="replace"), "tokens": len(ctx),
                         "finish": "stop" if ended else "length"}
    return {"wall_s": total, "refused": refused, "outputs": outputs}


# -- the orchestrator --------------------------------------------------------------------------

def score(schemas: list[tuple[str, dict]], result: dict) -> dict:
    import jsonschema

    valid = invalid_finished = finished = tokens = checks = 0
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
            validator = jsonschema.validators.validator_for(schema)(
                schema, format_checker=jsonschema.FormatChecker())
            ok = validator.is_valid(json.loads(out["text"]))
        except Exception:
            ok = False
        if out["finish"] == "stop":
            finished += 1
            invalid_finished += not ok
        valid += ok
    n = len(schemas)
    row = {"schemas": n, "refused": len(result["refused"]), "finished": finished,
           "valid": valid, "valid_share": valid / n, "invalid_finished": invalid_finished,
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
    subprocess.run([sys.executable, "-m", "venv", str(GENLM_PY.parent.parent)], check=True)
    subprocess.run([str(GENLM_PY), "-m", "pip", "install", "torch==2.13.0", "genlm-control"],
                   check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemas", type=int, default=100)
    ap.add_argument("--genlm-schemas", type=int, default=10,
                    help="genlm-control runs at about 1 tok/s here: time it on a prefix")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--systems", default="tether,xgrammar,guidance,genlm")
    ap.add_argument("--out", default=str(RESULTS / "awrs_vs_masking.json"))
    ap.add_argument("--setup-genlm", action="store_true")
    ap.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        job = json.loads(Path(args.job).read_text())
        if args.worker == "tether":
            result = run_tether(job, "awrs")
        elif args.worker == "tether-lcd":
            result = run_tether(job, "lcd")
        elif args.worker == "genlm":
            result = run_genlm(job)
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
            "temperature": args.temperature, "seed": args.seed}
    table = {}
    for system in args.systems.split(","):
        subset = schemas[: args.genlm_schemas] if system == "genlm" else schemas
        print(f"== {system} on {len(subset)} schemas", flush=True)
        result = run_system(system, dict(base, schemas=subset))
        table[system] = score(subset, result)
        table[system]["refused_names"] = sorted(result["refused"])
        table[system]["outputs"] = result["outputs"]
        print(json.dumps({k: v for k, v in table[system].items() if k != "outputs"}), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": {k: v for k, v in base.items()
                                                     if k != "model_path"} | {
        "schemas": args.schemas, "genlm_schemas": args.genlm_schemas}, "systems": table},
        indent=2))
    print(markdown(table))


def markdown(table: dict) -> str:
    lines = ["| system | schemas | refused | valid | invalid finished | tok/s | checks/token | "
             "constraint µs/token |", "|---|---|---|---|---|---|---|---|"]
    for name, r in table.items():
        lines.append(f"| {name} | {r['schemas']} | {r['refused']} | {r['valid_share']:.0%} | "
                     f"{r['invalid_finished']} | {r['tok_per_s']:.1f} | "
                     f"{r.get('checks_per_token', float('nan')):.2f} | "
                     f"{r.get('constraint_us_per_token', float('nan')):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
