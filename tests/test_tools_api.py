"""Tool calling through `tether serve --sampler awrs --enable-auto-tool-choice --tool-call-parser
hermes`, driven by the real OpenAI client.

vLLM's hermes parser turns the request's tools into a structural tag (named and "required"
tool choice always; "auto" when a tool is strict), which AWRS decodes; vLLM's parser reads the
calls back, whole or streamed. SmolLM2's own chat template has no tools: the server runs with
the committed ``examples/smollm2-tools.jinja``. Every call must name a declared tool, and its
arguments must validate with ``jsonschema`` under the schema's own draft. The tools are the
committed Glaive function schemas (``tests/data/jsonschemabench/Glaiveai2K_dev``).
"""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from conftest import ROOT, SERVER_ARGS, TETHER, fixture, free_port, openai_client, running

pytestmark = pytest.mark.engine

TEMPLATE = ROOT / "examples" / "smollm2-tools.jinja"
SCHEMAS = {p.stem.rsplit("_", 1)[0]: json.loads(p.read_text())
           for p in sorted(fixture("jsonschemabench", "Glaiveai2K_dev").glob("*.json"))}
NAMES = ["book_flight", "convert_temperature", "send_email"]  # the tools of every request
QUESTION = [{"role": "user", "content": "What is 36.6 degrees Celsius in Fahrenheit?"}]
CAT = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                        "age": {"type": "integer", "minimum": 0,
                                                "maximum": 30}},
       "required": ["name", "age"], "additionalProperties": False}


def tools(strict: bool = True, names=NAMES) -> list[dict]:
    return [{"type": "function", "function": {"name": n, "description": n.replace("_", " "),
                                              "parameters": SCHEMAS[n], "strict": strict}}
            for n in names]


def start(parser: str, tmp_path_factory):
    port = free_port()
    cmd = [TETHER, "serve", *SERVER_ARGS, "--enable-auto-tool-choice", "--tool-call-parser",
           parser, "--chat-template", str(TEMPLATE), "--host", "127.0.0.1", "--port", str(port)]
    return running([cmd], tmp_path_factory.mktemp(f"serve-tools-{parser}"), port)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with start("hermes", tmp_path_factory) as (base, _):
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def valid_calls(calls) -> list[tuple[str, dict]]:
    """(name, arguments) of each call, after checking that it names a declared tool and that
    its arguments validate under that tool's schema (its own draft, formats checked)."""
    out = []
    for call in calls:
        name = call.name if hasattr(call, "name") else call.function.name
        arguments = call.arguments if hasattr(call, "arguments") else call.function.arguments
        assert name in NAMES, name
        args = json.loads(arguments)
        schema = SCHEMAS[name]
        cls = jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator)
        cls(schema, format_checker=cls.FORMAT_CHECKER).validate(args)
        out.append((name, args))
    return out


def weights(response, n: int = 1) -> list[float]:
    """The log weights of the ``tether`` field: one finite number per choice."""
    ext = response.model_extra["tether"]
    assert ext["failure"] is None and len(ext["choices"]) == n, ext
    assert all(isinstance(c["log_weight"], float) for c in ext["choices"]), ext
    return [c["log_weight"] for c in ext["choices"]]


def raw_text(choice) -> str:
    """The choice's whole output (tool-call markup included), from its token ids."""
    from tether.constraints import vocab_for

    return vocab_for("smollm2").hf.decode(choice.model_extra["token_ids"])


def stream_calls(client, kw: dict):
    """A streamed chat request's calls put together from the parser's deltas, as (name,
    arguments); the number of argument pieces; the chunk without choices (the last)."""
    names, arguments, pieces, final = {}, {}, 0, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            final = chunk
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:
            if delta.function.name:
                names[delta.index] = delta.function.name
            if delta.function.arguments:
                arguments[delta.index] = arguments.get(delta.index, "") + \
                    delta.function.arguments
                pieces += 1
    return [(names[i], json.loads(arguments[i])) for i in sorted(names)], pieces, final


def test_named_tool_choice_calls_that_tool(client):
    r = client.chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=80, seed=0, tools=tools(),
        tool_choice={"type": "function", "function": {"name": "convert_temperature"}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop"  # OpenAI's reason for a named call
    ((name, args),) = valid_calls(choice.message.tool_calls)
    assert name == "convert_temperature"
    assert r.model_extra["tether"]["choices"][0]["finish_reason"] == "stop"
    weights(r)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_choice(client, parallel):
    """Both ways a valid call (or calls); without parallel calls the output itself holds
    exactly one call: the grammar stops after it (not vLLM's filter of the parsed calls)."""
    r = client.chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=80, seed=1, tools=tools(),
        tool_choice="required", parallel_tool_calls=parallel,
        extra_body={"return_token_ids": True})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = valid_calls(choice.message.tool_calls)
    assert len(calls) >= 1 and choice.message.content in ("", None)
    if not parallel:
        assert raw_text(choice).count("<tool_call>") == 1
    weights(r)


def test_auto_without_strict_tools_is_vllm_unconstrained(client):
    """vLLM builds no structural tag for "auto" with tools none of which is strict (at its
    default --tool-strict-level): there is nothing to constrain, so vLLM decodes it."""
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=24,
                                       seed=2, tools=tools(strict=False), tool_choice="auto")
    message = r.choices[0].message
    assert message.content or message.tool_calls
    assert "tether" not in (r.model_extra or {})


def test_auto_with_strict_tools_runs_under_awrs(client):
    """Text or calls: text may run free until a "<tool_call>" trigger, which must then open a
    valid call; nothing malformed is left in the content."""
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=40,
                                       seed=3, tools=tools(), tool_choice="auto")
    choice = r.choices[0]
    valid_calls(choice.message.tool_calls or [])
    assert choice.message.tool_calls or choice.message.content
    assert "<tool_call>" not in (choice.message.content or "")
    assert r.model_extra["tether"]["choices"][0]["finish_reason"] == choice.finish_reason \
        or choice.finish_reason == "tool_calls"
    assert r.model_extra["tether"]["stats"]["checks_per_token"] > 0


def test_smc_with_tools(client):
    """Four particles, two posterior draws: each draw's calls are valid, each has its weight."""
    r = client.chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=80, seed=4, n=2, tools=tools(),
        tool_choice="required",
        extra_body={"vllm_xargs": {"tether_particles": 4, "tether_ess_threshold": 1.0}})
    assert len(r.choices) == 2
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        assert valid_calls(choice.message.tool_calls)
    ext = r.model_extra["tether"]
    assert ext["particles"] == 4 and ext["resampling_events"] >= 1
    assert isinstance(ext["log_z"], float)
    weights(r, n=2)


def test_streamed_tool_calls_equal_the_whole_call(client):
    """The parser's deltas: the name first, then the arguments in pieces; put together they are
    the call of the same request without streaming (same seed), and the stream's last chunk
    before [DONE] carries the same weights."""
    kw = dict(model="smollm2", messages=QUESTION, max_tokens=80, seed=1, tools=tools(),
              tool_choice="required")
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].finish_reason == "tool_calls"
    streamed, pieces, final = stream_calls(client, kw)
    assert streamed == valid_calls(whole.choices[0].message.tool_calls)
    assert pieces > len(streamed)  # streamed in pieces, not one blob
    assert final is not None and final.model_extra["tether"]["choices"] == \
        whole.model_extra["tether"]["choices"]


def test_smc_stream_gets_its_weights_too(client):
    r = client.chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=80, seed=6, tools=tools(),
        tool_choice="required", stream=True, extra_body={"vllm_xargs": {"tether_particles": 3}})
    chunks = list(r)
    ext = chunks[-1].model_extra["tether"]
    assert chunks[-1].choices == [] and ext["particles"] == 3
    assert isinstance(ext["choices"][0]["log_weight"], float)


def test_responses_api_function_tools(client):
    r = client.responses.create(
        model="smollm2", input=QUESTION[0]["content"], max_output_tokens=80,
        tools=[dict(t["function"], type="function") for t in tools()], tool_choice="required",
        extra_body={"seed": 7})
    calls = [item for item in r.output if item.type == "function_call"]
    assert valid_calls(calls)
    weights(r)


def test_responses_api_json_schema_text_format(client):
    r = client.responses.create(
        model="smollm2", input="Describe a cat as JSON.", max_output_tokens=64,
        text={"format": {"type": "json_schema", "name": "cat", "schema": CAT, "strict": True}},
        extra_body={"seed": 8})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), CAT)
    assert r.model_extra["tether"]["choices"][0]["finish_reason"] == "stop"
    weights(r)


@pytest.mark.parametrize("bad,needle", [
    ({"type": "function", "function": {"name": "f", "parameters": "an object"}},
     "tools.1.function.parameters"),  # vLLM's request model names it
    ({"type": "function", "function": {"parameters": {"type": "object"}}},
     "tools.1.function.name"),
    ({"type": "function", "function": {"name": "f", "parameters": {"type": "nope"},
                                       "strict": True}},
     "tools[1].function.parameters (function 'f'): invalid schema at /type"),
    ({"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "a(b"}}}}},
     "tools[1].function.parameters (function 'f'): invalid schema at /properties/a/pattern"),
])
def test_malformed_tool_entries_get_400_naming_them(client, bad, needle):
    for choice in ("required", "auto"):
        with pytest.raises(openai.BadRequestError, match=re.escape(needle)):
            client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=4,
                                           tools=tools(names=NAMES[:1]) + [bad],
                                           tool_choice=choice)


def test_malformed_responses_tool_gets_400_naming_it(client):
    bad = {"type": "function", "name": "f", "parameters": {"type": "nope"}}
    with pytest.raises(openai.BadRequestError,
                       match=re.escape("tools[0].parameters (function 'f'): invalid schema")):
        client.responses.create(model="smollm2", input="x", max_output_tokens=4, tools=[bad],
                                tool_choice="required")
