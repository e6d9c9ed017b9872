"""Where a constraint check's time goes: tether's checker beside llguidance's own calls, on the
same parser states.

The parser states are real: SmolLM2 (transformers, fp32, on the CPU) decodes each
JSONSchemaBench ``Github_easy`` schema's prompt (the prompt ``bench/awrs_vs_masking.py`` uses)
with AWRS itself (``tether.samplers.awrs.recursive_awrs`` over ``candidates.rank_batch``, seeded),
so each state comes with the candidates AWRS really checked there, accepted and rejected. Then,
on fresh copies of those states, it times (microseconds, medians and means):

* ``ll_validate``: llguidance's ``validate_tokens([t])`` alone, per checked token;
* ``check``: ``GrammarConstraint.allows`` per checked token (what AWRS calls), the first check
  of a state included (it asks llguidance once whether bytes are forced there);
* ``awrs_step``: AWRS's whole decision at a state (candidate stream, checks, the coin, under
  the budget deadline, as the processor runs it), device time excluded as the processor
  excludes it, per check and per token;
* ``advance``: ``GrammarConstraint.advance`` (matcher copy + consume), per token;
* ``ll_mask``: llguidance's ``compute_bitmask()`` per state (what a masking backend pays per
  token), and ``mask``: tether's ``GrammarConstraint.mask`` (bitmask to booleans, EOS rule).

    python bench/constraint_checks.py [--schemas 20] [--max-tokens 48] [--out bench/results/constraint_checks.json]

Reads ../shared/data/jsonschemabench/Github_easy beside the checkout (a missing input stops it
with an error naming it). One process; states are decoded first, then timed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from awrs_vs_masking import chat_ids, load_schemas, prompt_for  # noqa: E402
from common import DATA_NOTE, cpu_name, versions  # noqa: E402

CANDIDATES = 8


def us(seconds: list[float]) -> dict:
    """Median and mean microseconds of a list of durations in seconds."""
    if not seconds:
        return {"n": 0}
    return {"n": len(seconds), "median_us": round(statistics.median(seconds) * 1e6, 2),
            "mean_us": round(statistics.fmean(seconds) * 1e6, 2)}


def fresh(state):
    """An untouched copy of a grammar state (no cached forced mask, no end check)."""
    from tether.constraints.grammar import GrammarState

    return GrammarState(state.matcher.deep_copy(), state.data)


def decode_states(model, tokenizer, constraint, prompt_ids: list[int], max_tokens: int,
                  seed: int) -> list[dict]:
    """Decode with AWRS, keeping each step's state, log-probabilities and checked tokens."""
    from tether.samplers import awrs
    from tether.samplers.candidates import rank_batch

    steps = []
    state = constraint.start()
    ids = torch.tensor([prompt_ids])
    past = None
    for step in range(max_tokens):
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
        past = out.past_key_values
        logprobs = torch.log_softmax(out.logits[0, -1].float(), -1)[None]
        checked = []

        def accept(t, state=state, checked=checked):
            ok = constraint.allows(state, t)
            checked.append(t)
            return ok

        result = awrs.recursive_awrs(rank_batch(logprobs, [seed], [step], CANDIDATES).stream(0),
                                     accept)
        steps.append({"state": state, "logprobs": logprobs, "checked": checked,
                      "token": result.token, "step": step})
        if result.token is None or result.token in constraint.eos_token_ids:
            break
        state = constraint.advance(state, result.token, check=False)
        ids = torch.tensor([[result.token]])
    return steps


def time_states(constraint, steps: list[dict], seed: int) -> dict:
    from tether.constraints import budget
    from tether.samplers import awrs
    from tether.samplers.candidates import rank_batch

    t = {k: [] for k in ("ll_validate", "check", "check_accepted", "check_rejected",
                         "awrs_step", "awrs_per_check", "advance", "ll_mask", "mask")}
    clock = time.perf_counter
    for s in steps:
        eos = constraint.eos_token_ids
        plain = [tok for tok in s["checked"] if tok not in eos]
        m = fresh(s["state"]).matcher
        for tok in plain:
            t0 = clock(); m.validate_tokens([tok]); t["ll_validate"].append(clock() - t0)
        st = fresh(s["state"])
        for tok in s["checked"]:
            t0 = clock(); ok = constraint.allows(st, tok); dt = clock() - t0
            t["check"].append(dt)
            t["check_accepted" if ok else "check_rejected"].append(dt)
        st = fresh(s["state"])
        stream = rank_batch(s["logprobs"], [seed], [s["step"]], CANDIDATES).stream(0)
        t0 = clock()
        with budget.deadline(0.5):
            def accept(tok, st=st):
                budget.check()
                if tok in eos:
                    return constraint.is_complete(st)
                return constraint.allows(st, tok)
            result = awrs.recursive_awrs(stream, accept)
        dt = clock() - t0 - stream.device_seconds
        t["awrs_step"].append(dt)
        t["awrs_per_check"].extend([dt / max(1, result.checks)] * max(1, result.checks))
        if s["token"] is not None and s["token"] not in eos:
            st = fresh(s["state"])
            t0 = clock(); constraint.advance(st, s["token"], check=False)
            t["advance"].append(clock() - t0)
        m = fresh(s["state"]).matcher
        t0 = clock(); m.compute_bitmask(); t["ll_mask"].append(clock() - t0)
        st = fresh(s["state"])
        t0 = clock(); constraint.mask(st); t["mask"].append(clock() - t0)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__ + "\n" + DATA_NOTE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemas", type=int, default=20, help="first N Github_easy schemas")
    ap.add_argument("--max-tokens", type=int, default=48, help="decoded tokens per schema")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results JSON here")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tether import ConstraintError
    from tether.constraints import compile_constraint
    from tether.models import resolve

    torch.manual_seed(args.seed)
    path = resolve("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    timings: dict[str, list[float]] = {}
    refused, tokens, states = {}, 0, 0
    checks_per_token = []
    for name, schema in load_schemas(args.schemas):
        try:
            constraint = compile_constraint(schema, tokenizer)
        except ConstraintError as e:
            refused[name] = str(e)[:200]
            continue
        steps = decode_states(model, tokenizer, constraint, chat_ids(tokenizer,
                              prompt_for(schema)), args.max_tokens, args.seed)
        states += len(steps)
        tokens += sum(1 for s in steps if s["token"] is not None)
        checks_per_token.extend(len(s["checked"]) for s in steps)
        for k, v in time_states(constraint, steps, args.seed).items():
            timings.setdefault(k, []).extend(v)
        print(f"{name}: {len(steps)} states", flush=True)
    summary = {k: us(v) for k, v in timings.items()}
    per_token = (summary["awrs_step"]["mean_us"] + summary["advance"]["mean_us"])
    masking = summary["ll_mask"]["mean_us"] + summary["advance"]["mean_us"]
    result = {
        "config": {"schemas": args.schemas, "subset": "Github_easy", "max_tokens": args.max_tokens,
                   "seed": args.seed, "model": "smollm2", "candidates": CANDIDATES},
        "machine": {"cpu": cpu_name(),
                    "load_average": [round(x, 2) for x in os.getloadavg()]},
        "versions": versions("llguidance", "torch", "transformers"),
        "states": states, "tokens": tokens, "refused": refused,
        "checks_per_token": round(statistics.fmean(checks_per_token), 3),
        "timings": summary,
        "per_token_us": {"tether_awrs": round(per_token, 2), "llguidance_mask": round(masking, 2)},
    }
    print(json.dumps({"timings": summary, "checks_per_token": result["checks_per_token"],
                      "per_token_us": result["per_token_us"]}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
