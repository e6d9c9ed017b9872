"""``LLM.chat``: tool calls in the Python API, made as the server makes them (vLLM's request
model, tool parser and structured-output rules; ``tether.decode.tools``), on the session's
in-process engine."""

from __future__ import annotations

import pytest

from test_tools_api import NAMES, QUESTION, TEMPLATE, tools, valid_calls

pytestmark = pytest.mark.engine

NAMED = {"type": "function", "function": {"name": "convert_temperature"}}
TWO = NAMES[1:]  # a shorter prompt than the server tests' three tools


class Call:  # valid_calls reads .name and .arguments (JSON text)
    def __init__(self, call: dict):
        import json

        self.name, self.arguments = call["name"], json.dumps(call["arguments"])


def test_named_tool_choice_gives_one_valid_call_with_its_weight(llm):
    r = llm.chat(QUESTION, tools=tools(names=TWO), tool_choice=NAMED, chat_template=str(TEMPLATE),
                 max_tokens=80, seed=0)
    assert r.finish_reason == "stop" and r.log_weight < 0
    ((name, args),) = valid_calls([Call(c) for c in r.tool_calls])
    assert name == "convert_temperature" and r.content is None
    assert r.to_dict()["tool_calls"][0]["arguments"] == args


@pytest.mark.slow
def test_required_under_smc_every_particle_is_read(llm):
    r = llm.chat(QUESTION, tools=tools(names=TWO), tool_choice="required",
                 parallel_tool_calls=False,
                 chat_template=TEMPLATE.read_text(), max_tokens=80, seed=1, particles=3, n=2,
                 ess_threshold=1.0)
    assert len(r.particles) == 3 and len(r.draws) == 2 and r.log_z is not None
    for p in r.particles:
        if p.finish_reason == "stop":
            assert len(valid_calls([Call(c) for c in p.tool_calls])) == 1
    assert r.tool_calls and r.finish_reason == "stop"


def test_what_is_constrained_and_which_template(llm):
    """The constraint is the one vLLM's parser asks for: a structural tag for named,
    "required" and strict "auto"; none for "auto" without strict tools (sampled freely).
    Without tools, the prompt is the model's own chat template."""
    from tether.decode.tools import plan_chat

    def spec(choice, strict=True):
        return plan_chat(llm.tokenizer, QUESTION, tools(strict), choice, True, "hermes",
                         "auto", str(TEMPLATE), None, 16).spec

    from tether import StructuralTag

    assert all(isinstance(spec(c), StructuralTag) for c in (NAMED, "required", "auto"))
    assert spec("auto", strict=False) is None
    plain = plan_chat(llm.tokenizer, QUESTION, None, None, True, "hermes", "auto", None, None, 8)
    assert plain.prompt_ids == llm.prompt_ids(QUESTION) and plain.spec is None
    with_tools = plan_chat(llm.tokenizer, QUESTION, tools(), "required", True, "hermes",
                           "auto", str(TEMPLATE), None, 8)
    text = llm.tokenizer.decode(with_tools.prompt_ids)
    assert all(f'"name": "{n}"' in text for n in NAMES)


def test_malformed_tools_raise_naming_them(llm):
    bad = {"type": "function", "function": {"name": "f", "parameters": "an object"}}
    with pytest.raises(ValueError, match=r"tools\.1\.function\.parameters"):
        llm.chat(QUESTION, tools=tools()[:1] + [bad], tool_choice="required")
    with pytest.raises(ValueError, match="needs tools"):
        llm.chat(QUESTION, tool_choice="required")
