"""`tether serve --sampler awrs`: the real server on a loopback port, driven by the openai client."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import regex

pytestmark = pytest.mark.engine

CAT = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                        "age": {"type": "integer", "minimum": 0,
                                                "maximum": 30}},
       "required": ["name", "age"], "additionalProperties": False}
YES_NO = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [str(Path(sys.executable).parent / "tether"), "serve", "--sampler", "awrs",
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048",
           "--served-model-name", "smollm2"]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("server did not come up")
    yield base
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=600)


def chat(client, prompt, **kw):
    return client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": prompt}], **kw)


def test_json_schema_response_format(client):
    r = chat(client, "Describe a cat as JSON.", max_tokens=64, seed=0,
             response_format={"type": "json_schema",
                              "json_schema": {"name": "cat", "schema": CAT}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), CAT)
    ext = r.model_extra["tether"]
    assert ext["choices"][0]["finish_reason"] == "stop"
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


def test_bad_requests_get_400_and_the_server_goes_on(client):
    import openai

    bad = [
        dict(response_format={"type": "json_schema",
                              "json_schema": {"name": "x", "schema": {"type": "nope"}}}),
        dict(extra_body={"structured_outputs": {"regex": "a(b"}}),
        dict(extra_body={"structured_outputs": {"grammar": 'start: "x" b\n'}}),
        dict(response_format={"type": "json_object"},
             extra_body={"vllm_xargs": {"tether_sampler": "nope"}}),
        dict(extra_body={"structured_outputs": {"regex": "a" * 300_000}}),
    ]
    for kwargs in bad:
        with pytest.raises(openai.BadRequestError):
            chat(client, "x", max_tokens=4, **kwargs)
    r = chat(client, "Describe a cat as JSON.", max_tokens=64, seed=5,
             response_format={"type": "json_schema",
                              "json_schema": {"name": "cat", "schema": CAT}})
    assert r.choices[0].finish_reason in ("stop", "length")


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
    with urllib.request.urlopen(server + "/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "tether_constraint_checks_total" in text and "vllm:" in text
    checks = [line for line in text.splitlines()
              if line.startswith("tether_constraint_checks_total")]
    assert float(checks[0].split()[-1]) > 0


def _running(server) -> float:
    with urllib.request.urlopen(server + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("vllm:num_requests_running"):
                return float(line.split()[-1])
    return 0.0


def test_disconnected_client_aborts_its_particles(server):
    body = json.dumps({"model": "smollm2", "max_tokens": 1900, "messages": [
        {"role": "user", "content": "Write a very long story as JSON."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
            "type": "object", "properties": {"story": {"type": "string"}}}}},
        "vllm_xargs": {"tether_particles": 4}}).encode()
    req = urllib.request.Request(server + "/v1/chat/completions", data=body,
                                 headers={"content-type": "application/json"})
    with pytest.raises(OSError):  # the client gives up after 2 s and closes the connection
        urllib.request.urlopen(req, timeout=2)
    # left running, 4 particles x 1900 tokens would take minutes on this CPU
    deadline = time.time() + 15
    while time.time() < deadline and _running(server) > 0:
        time.sleep(0.5)
    assert _running(server) == 0
