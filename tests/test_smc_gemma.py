"""SMC on the embedded Gemma 3 (SentencePiece, 262,144 tokens) against an exactly enumerated
target, with its own engine (slow).

The problem: a choice among colour words after a plain-text prompt (Gemma 3 here is a base
model). ``enumerate_outputs`` lists every accepted token sequence, each ending with any of the
constraint's EOS tokens (the ones the sampler may end with); scoring each with the model gives
the exact target pi over the words. AWRS-SMC (exact weights, the default on a choice), 64 runs
of 8 particles with their own seeds, pooled: TV to pi below 0.12, and every finished particle
ends with one of the EOS tokens the enumeration counts.
"""

from __future__ import annotations

import collections
import math

import pytest

from tether import Choice
from tether.constraints.base import enumerate_outputs

pytestmark = [pytest.mark.engine, pytest.mark.slow]

PROMPT = "My favourite colour is"
WORDS = ["red", "reddish", "green", "blue", "bluish"]
RUNS, PARTICLES = 64, 8


def test_smc_matches_the_exact_target_on_gemma3():
    from tether.decode.llm import LLM

    with LLM("gemma3", max_model_len=512, dtype="float32") as llm:
        spec = Choice(WORDS)
        c = llm.constraint(spec)
        sequences = enumerate_outputs(c, max_tokens=8)
        assert {s[-1] for s in sequences} == set(c.eos_token_ids)
        prompt = llm.prompt_ids(PROMPT, chat=False)
        scores = llm.logprobs(prompt, sequences)
        pi = collections.defaultdict(float)
        for seq, lp in zip(sequences, scores):
            pi[llm.tokenizer.decode(seq, skip_special_tokens=True)] += math.exp(lp)
        z = sum(pi.values())
        pi = {k: v / z for k, v in pi.items()}
        assert set(pi) == set(WORDS)

        runs = llm.generate([prompt] * RUNS, spec, particles=PARTICLES, max_tokens=8, seed=0)
    smc = collections.defaultdict(float)
    for run in runs:
        assert run.stats["weights"] == "exact"
        for p in run.particles:
            if p.finish_reason == "stop":
                assert p.token_ids[-1] in c.eos_token_ids
                smc[p.value] += p.normalized_weight / RUNS
    tv = 0.5 * sum(abs(smc.get(k, 0.0) - pi[k]) for k in pi)
    assert tv < 0.12, (tv, dict(smc), pi)
