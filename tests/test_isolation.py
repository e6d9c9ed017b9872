"""One request's constraint cannot reach another: failures, budgets and lost records, on the real
engine (in-process, so that an exception escaping the logits processor would reach this test).
"""

from __future__ import annotations

import math
import time

import pytest

from tether import Predicate, Regex

pytestmark = pytest.mark.engine

YES_NO = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}


def _raising_after(calls: int) -> Predicate:
    count = [0]

    def prefix(text: str) -> bool:
        count[0] += 1
        if count[0] > calls:
            raise ZeroDivisionError("boom from the user's predicate")
        return True

    return Predicate(prefix, complete=lambda text: False)  # never done: it keeps checking


def test_a_constraint_that_raises_ends_only_its_request(llm):
    prompts = ["Say hello.", "Is the sky blue? JSON.", "Is grass green? JSON."]
    results = llm.generate(prompts, [_raising_after(20), YES_NO, YES_NO], max_tokens=24,
                           seed=0)
    bad, *good = results
    assert bad.finish_reason == "error" and bad.value is None
    assert bad.log_weight == -math.inf
    assert "ZeroDivisionError: boom" in bad.stats["failure"]["message"]
    assert 0 < len(bad.token_ids) <= 24
    for r in good:  # the rest of the batch never noticed
        assert r.finish_reason == "stop" and math.isfinite(r.log_weight)
        assert isinstance(r.value["ok"], bool)
    again = llm.generate(["Is water wet? JSON."], YES_NO, max_tokens=24, seed=1)[0]
    assert again.finish_reason == "stop"  # and the engine goes on


def test_a_slow_constraint_runs_out_of_budget_alone(llm):
    def slow(text: str) -> bool:
        time.sleep(0.3)  # two checks exceed the 0.5 s a step may take
        return True

    t0 = time.perf_counter()
    bad, good = llm.generate(["Say hello.", "Is the sky blue? JSON."],
                             [Predicate(slow, lambda text: False), YES_NO], max_tokens=200,
                             seed=0)
    assert bad.finish_reason == "budget" and "budget" in bad.stats["failure"]["message"]
    assert good.finish_reason == "stop"
    # each step of the slow particle is cut at STEP_LIMIT_S (0.5 s); its first step already is
    assert time.perf_counter() - t0 < 30


def test_population_with_a_failed_particle_has_no_estimate(llm):
    r = llm.generate(["Say hello."], _raising_after(60), particles=4, max_tokens=16,
                     seed=0)[0]
    assert r.finish_reason == "error" and r.log_z is None and r.draws == []
    assert r.stats["failure"]["reason"] == "error"
    assert all(p.normalized_weight is None for p in r.particles)


def test_a_lost_record_is_an_error_never_weight_one(llm):
    """A record that no engine reports (here: wiped from the store mid-generation) makes the
    particle's request fail; it is never counted as weight 1."""
    from tether.decode import records

    calls = [0]

    def wipe_records(text: str) -> bool:
        calls[0] += 1
        if calls[0] == 10:
            with records._LOCK:
                records._STORE.clear()
        return True

    for particles in (1, 3):
        calls[0] = 0
        r = llm.generate(["Say hello."], Predicate(wipe_records, lambda t: len(t) > 5),
                         particles=particles, max_tokens=12, seed=2)[0]
        assert r.finish_reason == "error", (particles, r.finish_reason)
        failure = r.stats.get("failure") or r.particles[0].stats["failure"]
        assert "record" in failure["message"] and "weight is unknown" in failure["message"]


def test_n_draws_from_one_call(llm):
    r = llm.generate(["Is the sky blue? JSON."], YES_NO, n=4, max_tokens=24, seed=3)[0]
    assert len(r.draws) == 4 and len(r.particles) == 4 and r.log_z is not None


def test_penalties_shape_what_awrs_samples(llm):
    spec = Regex(r"[ab]{12}")
    plain = llm.generate(["Letters:"] * 8, spec, max_tokens=16, seed=4)
    penalized = llm.generate(["Letters:"] * 8, spec, max_tokens=16, seed=4,
                             frequency_penalty=2.0)
    # a frequency penalty pushes away from the tokens used most so far
    def most_repeated(r):
        return max(r.token_ids[:-1].count(t) for t in set(r.token_ids[:-1]))

    assert all(r.valid for r in plain + penalized)
    assert sum(map(most_repeated, penalized)) < sum(map(most_repeated, plain))
