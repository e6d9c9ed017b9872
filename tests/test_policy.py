"""The server's request policy, step grants, result assembly and record checks, without an
engine: each piece against what it promises (the server tests drive them end to end)."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
from vllm.sampling_params import SamplingParams, StructuredOutputsParams

from tether import Constraint, Regex
from tether.decode import policy, processor
from tether.decode.policy import Limits, Options, RequestError, RequestScope

from conftest import walk


def params(**kw):
    so = kw.pop("structured_outputs", StructuredOutputsParams(regex="[ab]+"))
    return SamplingParams(structured_outputs=so, **kw)


TOKENS = {"type": "token", "prompt_token_ids": [1, 2, 3]}
AWRS = Options(sampler="awrs")


def test_plan_takes_options_and_keeps_the_other_xargs():
    p = policy.plan(params(n=2, extra_args={"tether_particles": 5, "mine": [1, 2]}), TOKENS,
                    AWRS, Limits(), None)
    assert p.particles == 5 and p.extra_args == {"mine": [1, 2]}
    assert policy.plan(params(n=3), TOKENS, AWRS, Limits(), None).particles == 3
    # without the awrs sampler or a constraint, vLLM decodes it as it is
    assert policy.plan(params(), TOKENS, Options(), Limits(), None) is None
    assert policy.plan(SamplingParams(), TOKENS, AWRS, Limits(), None) is None
    with pytest.raises(RequestError, match="tether_particles: tether options need"):
        policy.plan(params(extra_args={"tether_particles": 2}), TOKENS, Options(), Limits(),
                    None)


@pytest.mark.parametrize("kw,prompt,name", [
    (dict(logprobs=2), TOKENS, "logprobs"),
    (dict(stop=["}"]), TOKENS, "stop"),
    (dict(structured_outputs=StructuredOutputsParams(json={"type": "object"},
                                                     whitespace_pattern=" ?")), TOKENS,
     "whitespace_pattern"),
    (dict(), {"type": "embeds", "prompt_embeds": None}, "prompt_embeds"),
    (dict(), {"type": "multimodal", "prompt_token_ids": [1], "mm_kwargs": {}}, "messages"),
    (dict(extra_args={"tether_ess_threshold": 2}), TOKENS, "tether_ess_threshold"),
    (dict(extra_args={"tether_particles": 65}), TOKENS, "tether_particles"),
])
def test_what_cannot_be_honoured_is_refused_by_name(kw, prompt, name):
    with pytest.raises(RequestError) as e:
        policy.plan(params(**kw), prompt, AWRS, Limits(), None)
    assert e.value.parameter == name


def test_particles_are_counted_per_http_request_and_endpoints_checked():
    scope = RequestScope("/v1/completions", max_particles=64)
    for _ in range(2):
        policy.plan(params(extra_args={"tether_particles": 30}), TOKENS, AWRS, Limits(), scope)
    with pytest.raises(RequestError, match="asks for 90 particles"):
        policy.plan(params(extra_args={"tether_particles": 30}), TOKENS, AWRS, Limits(), scope)
    with pytest.raises(RequestError, match="not /v1/messages"):
        policy.plan(params(), TOKENS, AWRS, Limits(), RequestScope("/v1/messages", 64))
    assert policy.plan(params(), TOKENS, AWRS, Limits(), RequestScope("/v1/responses", 64))


def test_disable_additional_properties_closes_every_object_schema(smollm2_vocab):
    schema = {"type": "object", "properties": {
        "properties": {"type": "object", "properties": {"a": {"type": "integer"}}},
        "tags": {"type": "array", "items": {"type": "object"}},
        "open": {"type": "object", "additionalProperties": True}}}
    so = StructuredOutputsParams(json=schema, disable_additional_properties=True)
    closed = policy.spec_from_structured_outputs(so).schema
    assert closed["additionalProperties"] is False
    inner = closed["properties"]["properties"]  # a property named like a keyword
    assert inner["additionalProperties"] is False and "additionalProperties" not in \
        inner["properties"]
    assert closed["properties"]["tags"]["items"]["additionalProperties"] is False
    assert closed["properties"]["open"]["additionalProperties"] is True  # kept as written
    c = Constraint.from_spec(closed, smollm2_vocab)
    extra = smollm2_vocab.hf.encode('{"x": 1}', add_special_tokens=False)
    assert walk(c, extra)[0] is not None  # an undeclared key is refused
    assert policy.spec_from_structured_outputs(StructuredOutputsParams(json=schema)).schema \
        == schema


def _row(population="p", allowance=0.5):
    return SimpleNamespace(cfg=SimpleNamespace(population=population),
                           allowance=lambda: allowance)


def test_step_grants_bound_a_population_and_the_step():
    grants = processor.StepGrants()
    a, b = _row("a"), _row("b")
    assert grants.grant(a) == processor.POPULATION_STEP_S
    grants.charge(a, 0.4)
    assert grants.grant(_row("a")) == pytest.approx(processor.POPULATION_STEP_S - 0.4)
    grants.charge(_row("a"), 0.1)
    assert grants.grant(_row("a")) == 0.0  # the population's share is used up
    assert grants.grant(b) == processor.POPULATION_STEP_S  # another population is not
    grants.charge(b, 0.5)
    grants.charge(_row("c"), 0.2)  # the step's total is used up: the floor remains
    assert grants.grant(_row("d")) == processor.ROW_FLOOR_S
    assert grants.grant(_row("e", allowance=0.001)) == 0.001  # a row's own budget binds


def test_a_row_without_time_ends_with_budget_at_once():
    failures = []
    row = SimpleNamespace(fail=lambda reason, message: failures.append((reason, message)))
    ran = []
    assert processor._run_granted(row, 0.0, lambda: ran.append(1)) is None
    assert not ran and failures[0][0] == "budget" and "population" in failures[0][1]


def test_prepare_compiles_in_the_background_once(smollm2_vocab):
    from tether.constraints import compile_constraint
    from tether.decode.records import prepare_local

    spec = {"type": "object", "properties": {"q": {"type": "integer", "minimum": 7}}}
    wire = Constraint.from_spec(spec, smollm2_vocab).spec.to_wire()
    deadline = time.time() + 30
    answers = prepare_local("smollm2", [wire])
    while answers != ["ready"] and time.time() < deadline:
        assert answers == ["pending"]
        time.sleep(0.01)
        answers = prepare_local("smollm2", [wire])
    assert answers == ["ready"]
    t0 = time.perf_counter()
    compile_constraint(spec, smollm2_vocab)  # now a cache hit
    assert time.perf_counter() - t0 < 0.05
    bad = dict(wire, source="{not json")
    for _ in range(300):
        answer = prepare_local("smollm2", [bad])[0]
        if answer != "pending":
            break
        time.sleep(0.01)
    assert answer.startswith("error:")


def _group(tokens_by_particle, finishes, weights, failure=None):
    """A finished population as the SMC driver leaves it (records of real steps)."""
    from tether.decode.records import StepRecord
    from tether.decode.smc import Group, Particle

    constraint = Constraint.from_spec(Regex("[a-z]*"), "smollm2")
    group = Group(0, [1], constraint, seed=0, rng=np.random.default_rng(0))
    for uid, (tokens, finish, w) in enumerate(zip(tokens_by_particle, finishes, weights)):
        steps = [StepRecord(t, w / len(tokens), 1, 0, False, False, 0.0, 0.0) for t in tokens]
        group.particles.append(Particle(uid, list(tokens), steps, finish_reason=finish))
    if failure is not None:
        group.particles[1].failure = failure
        group.failure = failure
    return group


def test_one_assembly_for_every_case():
    from tether.decode.results import assemble

    decode = lambda tokens: "".join(chr(97 + t % 26) for t in tokens)
    pop = assemble(_group([[1, 2], [3], [4, 5, 6]], ["stop", "length", "stop"],
                          [-1.0, -0.5, -2.0]), 200, decode)
    assert [p.finish_reason for p in pop.particles] == ["stop", "length", "stop"]
    assert pop.particles[1].normalized_weight == 0.0
    w = np.exp([-1.0, -2.0])
    assert pop.particles[0].normalized_weight == pytest.approx(w[0] / w.sum())
    assert pop.log_z == pytest.approx(math.log(w.sum() / 3))
    share = pop.draws.count(0) / len(pop.draws)  # 200 draws from the posterior
    assert abs(share - w[0] / w.sum()) < 4 * math.sqrt(0.27 * 0.73 / 200)
    assert set(pop.draws) <= {0, 2} and pop.choices(3) == pop.draws[:3]
    # nothing complete: no posterior; the best weight first, never labelled stop
    none = assemble(_group([[1], [2, 3]], ["length", "length"], [-1.0, -0.2]), 2, decode)
    assert none.draws == [] and none.log_z == -math.inf and none.choices(2) == [1, 0]
    # a failure: no posterior and no estimate; the failed particle first
    failed = assemble(_group([[1], [2]], ["stop", "budget"], [-1.0, -1.0],
                             failure={"reason": "budget", "message": "x", "step": 0}), 1,
                      decode)
    assert failed.log_z is None and failed.draws == [] and failed.choices(2) == [1, 0]
    assert failed.particles[1].log_weight == -math.inf


def test_a_record_of_another_token_is_an_error_never_a_weight():
    from tether.decode.records import ParticleRecord, StepRecord
    from tether.decode.smc import Particle, SMCDriver, SMCSettings

    driver = SMCDriver([[1]], [None], SMCSettings(), seed=0, max_tokens=4, sampler="awrs",
                       estimator="recursive", max_rejections=None, sampling={})
    particle = Particle(0, [5, 6], key="k")
    record = ParticleRecord("k", {0: StepRecord(5, -0.1, 1, 0, False, False, 0, 0),
                                  1: StepRecord(7, -0.2, 1, 0, False, False, 0, 0)})
    driver._merge(particle, record)
    assert particle.failure["reason"] == "error" and "token 7" in particle.failure["message"]


def test_weights_option():
    assert Options().weights == "auto"
    assert Options().override({"tether_weights": "estimate"}).weights == "estimate"
    with pytest.raises(RequestError, match="tether_weights") as e:
        Options().override({"tether_weights": "bogus"})
    assert e.value.parameter == "tether_weights"


def test_canonical_option():
    from tether.constraints import normalize

    plan = policy.plan(params(extra_args={"tether_canonical": 1}), TOKENS, AWRS, Limits(), None)
    assert plan.options.canonical and normalize(plan.spec).canonical  # JSON true arrives as 1
    plan = policy.plan(params(extra_args={"tether_canonical": False}), TOKENS,
                       Options(sampler="awrs", canonical=True), Limits(), None)
    assert not plan.options.canonical and not normalize(plan.spec).canonical
    for bad in ("yes", 2):
        with pytest.raises(RequestError, match="tether_canonical") as e:
            Options().override({"tether_canonical": bad})
        assert e.value.parameter == "tether_canonical"
