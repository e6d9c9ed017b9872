"""`tether serve --sampler awrs`: the real server on a loopback port, driven by the openai client.

Besides the features (response formats, n, particles, streaming, metrics), one test per class
of hostile request: each gets a clear 4xx or a bounded, honest answer, and a normal request
beside it is still served.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.request

import jsonschema
import pytest
import regex

from conftest import openai_client

pytestmark = pytest.mark.engine

CAT = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                        "age": {"type": "integer", "minimum": 0,
                                                "maximum": 30}},
       "required": ["name", "age"], "additionalProperties": False}
YES_NO = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}
# Forces 28 'a's; then partial matching of the nested quantifiers backtracks for seconds on
# every check (measured: over 3 s for 28 a's).
PATHOLOGICAL = r"^(?=a{28})((a|aa)+)+(b)\3$"


@pytest.fixture(scope="module")
def server(server_dp1):
    return server_dp1[0]


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def chat(client, prompt, **kw):
    return client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": prompt}], **kw)


def post(server, path, body, timeout=600):
    """(status, raw body) of a JSON POST, without a client library's parsing."""
    req = urllib.request.Request(server + path, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(server, name) -> float:
    with urllib.request.urlopen(server + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_json_schema_response_format(client):
    r = chat(client, "Describe a cat as JSON.", max_tokens=64, seed=0,
             response_format={"type": "json_schema",
                              "json_schema": {"name": "cat", "schema": CAT}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), CAT)
    ext = r.model_extra["tether"]
    assert ext["choices"][0]["finish_reason"] == "stop" and ext["choices"][0]["engine"] == 0
    assert ext["stats"]["checks_per_token"] > 0 and ext["particles"] == 1


def test_regex_and_grammar_through_extra_body(client):
    r = chat(client, "A date:", max_tokens=16, seed=1,
             extra_body={"structured_outputs": {"regex": r"20\d\d-(0[1-9]|1[0-2])-[0-2]\d"}})
    assert regex.fullmatch(r"20\d\d-(0[1-9]|1[0-2])-[0-2]\d", r.choices[0].message.content)
    grammar = 'start: "yes" | "no" | "maybe"\n'
    r = client.completions.create(model="smollm2", prompt="Will it rain? Answer:",
                                  max_tokens=4, seed=2,
                                  extra_body={"structured_outputs": {"grammar": grammar}})
    assert r.choices[0].text in ("yes", "no", "maybe")
    assert r.model_extra["tether"]["choices"][0]["finish_reason"] == "stop"  # completions too
    r = chat(client, "Pick a colour.", max_tokens=4,
             extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
    assert r.choices[0].message.content in ("red", "green", "blue")


def test_n_choices_are_posterior_draws(client):
    r = chat(client, "Is water wet? Answer as JSON.", max_tokens=16, n=3, seed=3,
             response_format={"type": "json_schema",
                              "json_schema": {"name": "yn", "schema": YES_NO}})
    assert len(r.choices) == 3
    for c in r.choices:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content)["ok"], bool)
    ext = r.model_extra["tether"]
    assert ext["particles"] == 3 and len(ext["choices"]) == 3 and "log_z" in ext


def test_smc_particles_override(client):
    r = chat(client, "Is water wet? Answer as JSON.", max_tokens=16, seed=4,
             response_format={"type": "json_schema",
                              "json_schema": {"name": "yn", "schema": YES_NO}},
             extra_body={"vllm_xargs": {"tether_particles": 4, "tether_ess_threshold": 1.0}})
    assert r.model_extra["tether"]["particles"] == 4
    assert r.model_extra["tether"]["resampling_events"] >= 1


def _nested(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


@pytest.mark.parametrize("body,status,needle", [
    (dict(response_format={"type": "json_schema",
                           "json_schema": {"name": "x", "schema": {"type": "nope"}}}),
     400, "/type"),
    (dict(structured_outputs={"regex": "a(b"}), 400, "position 3"),
    (dict(structured_outputs={"grammar": 'start: "x" b\n'}), 400, "grammar"),
    (dict(response_format={"type": "json_object"}, vllm_xargs={"tether_sampler": "nope"}),
     400, "tether_sampler"),
    (dict(structured_outputs={"regex": "a" * 300_000}), 400, "limit"),
    # about 100 levels deep: a RecursionError (HTTP 500) before the depth limit
    (dict(response_format={"type": "json_schema",
                           "json_schema": {"name": "d", "schema": _nested(100)}}), 400, "64"),
    (dict(response_format={"type": "json_object"}, vllm_xargs={"tether_particles": 100000}),
     400, "max-particles"),
    (dict(response_format={"type": "json_object"}, vllm_xargs={"tether_particles": -3}),
     400, "tether_particles"),
    (dict(response_format={"type": "json_object"}, vllm_xargs={"tether_particles": "many"}),
     400, "tether_particles"),
    (dict(response_format={"type": "json_object"}, n=5000), 400, "max-particles"),
    (dict(response_format={"type": "json_object"}, vllm_xargs={"tether_ess_threshold": 7}),
     400, "tether_ess_threshold"),
    (dict(response_format={"type": "json_object"}, logprobs=True, top_logprobs=2), 400,
     "logprobs"),
    (dict(response_format={"type": "json_object"}, stop=["}"]), 400, "stop"),
])
def test_bad_requests_get_400_naming_the_problem(server, client, body, status, needle):
    code, text = post(server, "/v1/chat/completions", dict(
        model="smollm2", messages=[{"role": "user", "content": "x"}], max_tokens=4, **body))
    assert code == status and needle in json.loads(text)["error"]["message"], text[:500]


def test_the_server_goes_on_after_bad_requests(client):
    r = chat(client, "Describe a cat as JSON.", max_tokens=64, seed=5,
             response_format={"type": "json_schema",
                              "json_schema": {"name": "cat", "schema": CAT}})
    assert r.choices[0].finish_reason in ("stop", "length")


def test_pathological_regex_ends_alone_with_budget(server, client):
    """Every check of the hostile request backtracks for seconds: it ends with finish_reason
    "budget" after at most a step's bound, and the requests beside it are served."""
    def healthy(i):
        t0 = time.time()
        r = chat(client, f"Question {i}: is the sky blue? Answer as JSON.", max_tokens=24,
                 seed=i, response_format={"type": "json_schema",
                                          "json_schema": {"name": "yn", "schema": YES_NO}})
        return r, time.time() - t0

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        hostile = pool.submit(post, server, "/v1/completions", {
            "model": "smollm2", "prompt": "a" * 60, "max_tokens": 64, "seed": 0,
            "structured_outputs": {"regex": PATHOLOGICAL}})
        normal = list(pool.map(healthy, range(4)))
        code, text = hostile.result()
    assert code == 200
    out = json.loads(text)
    assert out["choices"][0]["finish_reason"] == "budget"
    failure = out["tether"]["failure"]
    assert failure["reason"] == "budget" and "backtracks" in failure["message"]
    assert out["tether"]["log_z"] is None
    for r, seconds in normal:
        assert r.choices[0].finish_reason == "stop" and seconds < 60
        assert isinstance(json.loads(r.choices[0].message.content)["ok"], bool)


def test_dead_particle_is_not_stop_and_no_infinity(server):
    code, text = post(server, "/v1/chat/completions", {
        "model": "smollm2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 8,
        "structured_outputs": {"regex": "(?!)"}})  # nothing matches: every token is rejected
    assert code == 200 and "Infinity" not in text and "NaN" not in text
    out = json.loads(text)  # strict JSON
    assert out["choices"][0]["finish_reason"] == "constraint"
    choice = out["tether"]["choices"][0]
    assert choice["finish_reason"] == "constraint" and choice["log_weight"] is None
    assert out["tether"]["log_z"] is None


def test_twenty_concurrent_requests(client):
    def one(i):
        return chat(client, f"Question {i}: is the sky blue? Answer as JSON.", max_tokens=24,
                    seed=i, response_format={"type": "json_schema",
                                             "json_schema": {"name": "yn", "schema": YES_NO}})

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    for r in results:
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].message.content)["ok"], bool)


def test_streaming_one_particle(client):
    stream = chat(client, "Describe a cat as JSON.", max_tokens=64, seed=6, stream=True,
                  response_format={"type": "json_schema",
                                   "json_schema": {"name": "cat", "schema": CAT}})
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert len([p for p in pieces if p]) > 3  # it streamed, not one blob
    if finish == "stop":
        jsonschema.validate(json.loads("".join(pieces)), CAT)


def test_unconstrained_requests_are_plain_vllm(client):
    r = chat(client, "Say hello.", max_tokens=8)
    assert r.choices[0].message.content and "tether" not in (r.model_extra or {})


def test_metrics_have_tether_counters(server):
    assert metric(server, "tether_constraint_checks_total") > 0
    assert metric(server, "tether_failed_requests_total") >= 0
    with urllib.request.urlopen(server + "/metrics", timeout=10) as r:
        assert "vllm:" in r.read().decode()


def test_disconnected_client_frees_everything(server):
    body = json.dumps({"model": "smollm2", "max_tokens": 900, "messages": [
        {"role": "user", "content": "Write a very long story as JSON."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
            "type": "object", "properties": {"story": {"type": "string"}}}}},
        "vllm_xargs": {"tether_particles": 4}}).encode()
    req = urllib.request.Request(server + "/v1/chat/completions", data=body,
                                 headers={"content-type": "application/json"})
    with pytest.raises(OSError):  # the client gives up after 3 s and closes the connection
        urllib.request.urlopen(req, timeout=3)
    # left running, 4 particles x 900 tokens would take minutes on this CPU
    deadline = time.time() + 20
    while time.time() < deadline and (metric(server, "vllm:num_requests_running") > 0 or
                                      metric(server, "tether_particle_records") > 0):
        time.sleep(0.5)
    assert metric(server, "vllm:num_requests_running") == 0
    assert metric(server, "tether_particle_records") == 0  # every record was collected


def test_served_under_the_name_given_and_quiet(server_dp1, client):
    # started as `tether serve` without --served-model-name: the default model's name
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    log = server_dp1[1].read_text()
    assert " INFO " not in log and "Attempted to load weight" not in log
    assert "tether serve: model 'smollm2'" in log
