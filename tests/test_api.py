"""The Python API and the constraint layer without an engine: limits, budgets, specs, formats,
sampling parameters against vLLM's own implementations, and what the README promises."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tether import Constraint, ConstraintError, Predicate, Regex
from tether.constraints import budget

ROOT = Path(__file__).resolve().parents[1]


def test_viz_after_import_tether():
    code = "import tether; print(tether.viz.write_html.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "write_html", out.stderr


def test_pydantic_models_with_the_same_schema_stay_apart(smollm2_vocab):
    from pydantic import BaseModel

    def make(name):
        class Pet(BaseModel):
            name: str
        Pet.__qualname__ = name
        return Pet

    first, second = make("Pet"), make("Pet")  # same schema, same name, two classes
    a = Constraint.from_spec(first, smollm2_vocab)
    b = Constraint.from_spec(second, smollm2_vocab)
    assert a is not b
    assert type(a.parse('{"name": "Rex"}')) is first
    assert type(b.parse('{"name": "Rex"}')) is second
    assert a.spec.to_wire()["model"] != b.spec.to_wire()["model"]


@pytest.mark.parametrize("spec,needle", [
    ({"type": "array", "items": json.loads('{"items": ' * 200 + "{}" + "}" * 200)},
     "64 levels"),
    ("[" * 100000 + "]" * 100000, "limit"),  # JSON text nested past the parser's recursion
    (Regex("a" * 300_000), "limit"),
    (Regex("(" * 5000 + ")" * 5000), "nested too deeply"),
])
def test_limits(smollm2_vocab, spec, needle):
    with pytest.raises(ConstraintError, match=needle):
        Constraint.from_spec(spec, smollm2_vocab)


def _deep(levels):
    schema = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_deep_but_allowed_schema_compiles(smollm2_vocab):
    Constraint.from_spec(_deep(31), smollm2_vocab)  # 62 JSON levels: under the limit
    with pytest.raises(ConstraintError, match="64"):
        Constraint.from_spec(_deep(40), smollm2_vocab)


def test_partial_matching_out_of_time_raises_instead_of_rejecting(smollm2_vocab):
    c = Constraint.from_spec(Regex(r"^(?=a{28})((a|aa)+)+(b)\3$"), smollm2_vocab)
    state = b"a" * 27  # a partial-matching state is the output's bytes
    a_token = smollm2_vocab.hf.convert_tokens_to_ids("a")
    with budget.deadline(0.2):
        with pytest.raises(budget.BudgetExceeded):
            c.allows(state, a_token)  # 28 a's: backtracks for seconds
    # a check that finishes in time is decided by the pattern, never by a clock
    assert c.allows(b"a" * 3, a_token)
    # and one backtracking match never takes more than MATCH_LIMIT_S, whatever the budget
    with budget.deadline(30.0), pytest.raises(budget.BudgetExceeded, match="backtracks"):
        c.allows(state, a_token)


def test_predicates_are_judged_against_the_deadline(smollm2_vocab):
    import time

    c = Constraint.from_spec(Predicate(lambda t: time.sleep(0.05) or True), smollm2_vocab)
    with budget.deadline(0.01), pytest.raises(budget.BudgetExceeded):
        c.allows(c.start(), 100)


def test_checked_formats_are_the_readme_list():
    from tether.constraints.grammar import checked_formats

    readme = (ROOT / "README.md").read_text()
    listed = re.search(r"Formats checked \(draft 2020-12\): (.*?)\.\n", readme, re.S)
    assert listed, "the README lists the checked formats"
    assert sorted(re.findall(r"`([a-z0-9-]+)`", listed.group(1))) == checked_formats()
    assert {"date-time", "time", "uri", "email"} <= set(checked_formats())


def test_time_format_follows_the_schema_draft(smollm2_vocab):
    """The end-of-output check uses the draft's format checker: RFC 3339 ``time`` (with an
    offset), as llguidance's grammar does."""
    schema = {"type": "object", "properties": {"t": {"type": "string", "format": "time"}},
              "required": ["t"]}
    c = Constraint.from_spec(schema, smollm2_vocab)

    def complete(text):
        state = c.start()
        for t in smollm2_vocab.hf.encode(text, add_special_tokens=False):
            if not c.allows(state, t):
                return False
            state = c.advance(state, t)
        return c.is_complete(state)

    assert complete('{"t": "12:30:00Z"}')
    assert not complete('{"t": "25:30:00Z"}')


def test_results_are_strict_json():
    """A dead particle's weight and an undefined log Z are JSON null, never Infinity/NaN."""
    from tether.decode.llm import Result

    dead = Result("", [], "constraint", float("-inf"), stats={"log_weight": float("-inf")})
    smc = Result("", [], "length", float("nan"), particles=[dead], log_z=float("-inf"),
                 draws=[])
    out = smc.to_dict()
    assert out["log_weight"] is None and out["log_z"] is None
    assert out["particles"][0]["log_weight"] is None
    json.loads(json.dumps(out, allow_nan=False))


def test_unknown_model_names_are_refused_with_the_registered_ones():
    from tether.models import ModelError, resolve

    with pytest.raises(ModelError, match="did you mean 'smollm2'.*registered: smollm2, gemma3"):
        resolve("smolm2")
    assert resolve("someone/some-model") == "someone/some-model"  # a hub id passes


def _vllm_penalized(logits, prompt, output, rep, freq, pres):
    from vllm.v1.sample.ops.penalties import apply_all_penalties

    return apply_all_penalties(
        logits[None].clone(), torch.tensor([prompt]), torch.tensor([pres]),
        torch.tensor([freq]), torch.tensor([rep]), [list(output)])[0]


def test_penalties_batch_rows_of_any_length():
    """``shaping.penalize`` pads a batch of prompts and outputs of different lengths; each row
    must come out as vLLM penalizes that row alone, and the input must stay untouched."""
    from tether.decode.shaping import penalize

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=gen) * 3
    before = logits.clone()
    prompts = [[3, 5, 5, 7, 299], [], [1], [8, 8, 8, 8, 8, 8, 8, 8]]
    outputs = [[5, 9, 9, 9, 11, 3], [2], [4], [8, 0, 299]]
    params = [(1.3, 0.0, 0.0), (1.0, 0.7, 0.0), (1.0, 0.0, 1.1), (0.8, -0.5, 0.4)]
    ours = penalize(logits, prompts, outputs, params)
    assert torch.equal(logits, before)
    for row, (p, o, (rep, freq, pres)) in enumerate(zip(prompts, outputs, params)):
        theirs = _vllm_penalized(logits[row], p or [300], o, rep, freq, pres)
        assert torch.allclose(ours[row], theirs, atol=1e-5)
        assert not torch.allclose(ours[row], logits[row])


def test_min_p_matches_vllm():
    from types import SimpleNamespace

    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate
    from vllm.v1.sample.logits_processor.builtin import MinPLogitsProcessor

    from tether.decode.shaping import shape_logits

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 500, generator=gen) * 2
    min_p = [0.0, 0.05, 0.3]
    config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=8))
    proc = MinPLogitsProcessor(config, torch.device("cpu"), False)
    proc.update_state(BatchUpdate(batch_size=3, removed=[], moved=[], added=[
        (i, SamplingParams(min_p=p), None, []) for i, p in enumerate(min_p)]))
    temperature = torch.tensor([0.7, 0.7, 0.7])
    theirs = proc.apply(logits / temperature[:, None])
    before = logits.clone()
    ours = shape_logits(logits, temperature, torch.zeros(3, dtype=torch.long),
                        torch.ones(3), torch.tensor(min_p))
    assert torch.equal(logits, before)  # the caller's logits are never modified
    assert torch.equal(torch.isinf(theirs), torch.isinf(ours))
    assert torch.isinf(ours[2]).sum() > torch.isinf(ours[1]).sum() > 0 == torch.isinf(ours[0]).sum()
    assert torch.allclose(ours[torch.isfinite(ours)], theirs[torch.isfinite(theirs)])


def test_serve_takes_the_model_it_is_given():
    """`tether serve MODEL`: vLLM's parser owns the positional model; a second positional of
    the same name once swallowed it, and the default model was served instead."""
    import subprocess
    import sys
    from pathlib import Path

    from tether.decode.serve import build_parser

    parser = build_parser()
    for argv in (["gemma3", "--sampler", "awrs"], ["--sampler", "awrs", "gemma3"]):
        assert parser.parse_args(argv).model_tag == "gemma3"
    tether_cli = str(Path(sys.executable).parent / "tether")
    run = subprocess.run([tether_cli, "serve", "smolm2"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and "did you mean 'smollm2'" in run.stderr, run.stderr[-500:]
