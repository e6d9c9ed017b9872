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

from conftest import metric, openai_client, post

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


def test_canonical_spelling_over_http(client, smollm2_vocab):
    """vllm_xargs tether_canonical: the output is spelled with the tokenizer's own encoding.
    A logit bias makes "g" nearly certain wherever it is allowed: without the filter the
    output starts with it, more tokens than the text's own encoding; with it, "g" is refused
    (no canonical spelling of "green" or "greenish" starts with it)."""
    g = smollm2_vocab.hf.encode("g", add_special_tokens=False)
    assert len(g) == 1

    def run(canonical):
        r = chat(client, "Name a colour.", max_tokens=8, seed=6, logit_bias={str(g[0]): 100},
                 extra_body={"structured_outputs": {"choice": ["green", "greenish"]},
                             "vllm_xargs": {"tether_canonical": canonical}})
        text = r.choices[0].message.content
        assert text in ("green", "greenish")
        own = len(smollm2_vocab.hf.encode(text, add_special_tokens=False)) + 1  # and EOS
        return r.model_extra["tether"]["stats"]["tokens"], own

    tokens, own = run(False)
    assert tokens > own
    tokens, own = run(True)
    assert tokens == own


def test_n_choices_are_posterior_draws(client):
    r = chat(client, "Is water wet? Answer as JSON.", max_tokens=16, n=3, seed=3,
             response_format={"type": "json_schema",
                              "json_schema": {"name": "yn", "schema": YES_NO}})
    assert len(r.choices) == 3
    for c in r.choices:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content)["ok"], bool)
    ext = r.model_extra["tether"]
    assert ext["particles"] == 3 and len(ext["choices"]) == 3
    if any(c.finish_reason == "stop" for c in r.choices):  # a posterior: a finite estimate
        assert isinstance(ext["log_z"], float) and ext["log_z"] < 0
        assert all(c["log_weight"] is not None for c in ext["choices"])


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
    (dict(response_format={"type": "json_object"}, vllm_xargs={"tether_canonical": "yes"}),
     400, "tether_canonical"),
    # compiles, but llguidance's lexer gives up once b's follow (vLLM made the "error" finish
    # a bare 500 "Internal server error")
    (dict(structured_outputs={"regex": "(a|aa)*(a|aa)*(a|aa)*b{1000000}"}, seed=0,
          max_tokens=8), 400, "too many expressions"),
])
def test_bad_requests_get_400_naming_the_problem(server, client, body, status, needle):
    code, text = post(server, "/v1/chat/completions", dict(
        dict(model="smollm2", messages=[{"role": "user", "content": "x"}], max_tokens=4),
        **body))
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
    """Every token the constraint allows is banned by the operator's processor: no allowed
    token has any mass, so the particle dies at its first step (found by the full mask after
    the bounded rejections, not by scanning the vocabulary)."""
    from tether.constraints import vocab_for

    hf = vocab_for("smollm2").hf
    starts_a = [i for t, i in hf.get_vocab().items()
                if hf.convert_tokens_to_string([t]).startswith("a")]
    code, text = post(server, "/v1/chat/completions", {
        "model": "smollm2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 8,
        "structured_outputs": {"regex": "a+"}, "vllm_xargs": {"ban_token_ids": starts_a}})
    assert code == 200 and "Infinity" not in text and "NaN" not in text
    out = json.loads(text)  # strict JSON
    assert out["choices"][0]["finish_reason"] == "constraint", out["tether"]
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


def test_metrics_count_what_happened(server, client):
    checks, failed = (metric(server, "tether_constraint_checks_total"),
                      metric(server, "tether_failed_requests_total"))
    r = chat(client, "Is water wet? Answer as JSON.", max_tokens=16, seed=8,
             response_format={"type": "json_schema",
                              "json_schema": {"name": "yn", "schema": YES_NO}})
    assert metric(server, "tether_constraint_checks_total") >= \
        checks + r.model_extra["tether"]["stats"]["checks"] > checks
    code, _ = post(server, "/v1/completions", {  # ends with "budget": a failed request
        "model": "smollm2", "prompt": "a" * 60, "max_tokens": 40,
        "structured_outputs": {"regex": PATHOLOGICAL}})
    assert code == 200 and metric(server, "tether_failed_requests_total") == failed + 1
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


# -- second pass: ids, dropped values, per-request limits, endpoints ----------------------------

def test_requests_sharing_a_client_request_id_keep_their_own_weights(client):
    """A retrying client or a proxy sends one X-Request-Id for two requests: each must come
    back with its own particles, outputs and weights (records are keyed by server-made ids)."""
    digits = dict(messages=[{"role": "user", "content": "A number:"}], max_tokens=6, seed=1,
                  extra_body={"structured_outputs": {"regex": r"[0-9]{3}"},
                              "vllm_xargs": {"tether_particles": 4,
                                             "tether_ess_threshold": 1.0}})
    words = dict(messages=[{"role": "user", "content": "A colour:"}], max_tokens=6, seed=2,
                 n=2, extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]},
                                  "vllm_xargs": {"tether_particles": 6,
                                                 "tether_ess_threshold": 1.0}})
    bodies = (digits, words, digits, words)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda body: client.chat.completions.create(
            model="smollm2", extra_headers={"X-Request-Id": "same-id"}, **body), bodies))
    for out, body in zip(outs, bodies):
        ext = out.model_extra["tether"]
        assert ext["failure"] is None, ext["failure"]
        assert ext["particles"] == body["extra_body"]["vllm_xargs"]["tether_particles"]
        assert len(out.choices) == len(ext["choices"]) == body.get("n", 1)
        assert isinstance(ext["log_z"], float)
        for choice, info in zip(out.choices, ext["choices"]):
            assert choice.finish_reason == info["finish_reason"] == "stop"
            assert isinstance(info["log_weight"], float)
            if "regex" in body["extra_body"]["structured_outputs"]:
                assert regex.fullmatch(r"[0-9]{3}", choice.message.content)
            else:
                assert choice.message.content in ("red", "green", "blue")


def test_other_vllm_xargs_reach_the_operators_processors(client):
    """``ban_token_ids`` goes to the server's own logits processor (tests/ban_processor.py)
    under AWRS: with every token that starts "yes" banned, the answer is always "no"."""
    from tether.constraints import vocab_for

    hf = vocab_for("smollm2").hf
    yes = [i for t, i in hf.get_vocab().items()
           if (s := hf.convert_tokens_to_string([t]).strip()) and "yes".startswith(s)]

    def ask(seed, ban):
        extra = {"structured_outputs": {"choice": ["yes", "no"]}}
        if ban:
            extra["vllm_xargs"] = {"ban_token_ids": yes}
        r = chat(client, "Is water wet? Answer yes or no.", max_tokens=3, seed=seed,
                 extra_body=extra)
        return r.choices[0].message.content

    assert "yes" in {ask(seed, ban=False) for seed in range(6)}  # the model does say yes
    assert {ask(seed, ban=True) for seed in range(6)} == {"no"}


def test_particles_are_limited_per_http_request(server, client):
    """3 prompts x 30 particles is over --max-particles (64) for one HTTP request, though
    each prompt alone is under it; 2 x 30 is not."""
    import openai

    extra = {"structured_outputs": {"regex": "[ab]"}, "vllm_xargs": {"tether_particles": 30}}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2", prompt=["x", "y", "z"], max_tokens=2,
                                  extra_body=extra)
    assert "--max-particles" in str(e.value) and "90" in str(e.value)
    r = client.completions.create(model="smollm2", prompt=["x", "y"], max_tokens=2,
                                  extra_body=extra)
    assert [f["particles"] for f in r.model_extra["tether"]] == [30, 30]  # one per prompt
    time.sleep(1)
    assert metric(server, "vllm:num_requests_running") == 0  # nothing left behind


def test_batch_endpoint_gets_the_same_treatment(server):
    def batch(n):
        return post(server, "/v1/chat/completions/batch", {
            "model": "smollm2", "max_tokens": 4,
            "messages": [[{"role": "user", "content": f"Pick a letter {i}."}] for i in range(n)],
            "structured_outputs": {"regex": "[abc]"},
            "vllm_xargs": {"tether_particles": 30}})

    code, text = batch(3)
    assert code == 400 and "--max-particles" in text, text[:300]
    code, text = batch(2)
    assert code == 200, text[:300]
    out = json.loads(text)
    assert [c["message"]["content"] in "abc" for c in out["choices"]] == [True, True]
    assert [f["particles"] for f in out["tether"]] == [30, 30]


def test_what_awrs_cannot_honour_is_refused(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="whitespace_pattern"):
        chat(client, "x", max_tokens=4, extra_body={"structured_outputs": {
            "json": {"type": "object"}, "whitespace_pattern": " ?"}})


def test_endpoints_awrs_does_not_serve_refuse_it(server):
    """Anthropic's /v1/messages with a JSON schema output: a 400 in its error format, naming
    the endpoint, never a silently unconstrained answer."""
    code, text = post(server, "/v1/messages", {
        "model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}],
        "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}})
    assert code == 400 and "not /v1/messages" in text, text[:300]


def test_closed_objects_under_awrs(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}},
              "required": ["name"]}
    r = chat(client, "A cat as JSON with a name and its colour.", max_tokens=40, seed=3,
             extra_body={"structured_outputs": {"json": schema,
                                                "disable_additional_properties": True}})
    if r.choices[0].finish_reason == "stop":
        assert set(json.loads(r.choices[0].message.content)) == {"name"}


def test_many_pathological_particles_hold_no_step(client):
    """One request, 16 particles whose every check backtracks for seconds: its population
    shares one step's constraint time, so it ends with "budget" within a few steps, and a
    request beside it is served."""
    def healthy():
        t0 = time.time()
        r = chat(client, "Is the sky blue? Answer as JSON.", max_tokens=16, seed=0,
                 response_format={"type": "json_schema",
                                  "json_schema": {"name": "yn", "schema": YES_NO}})
        return r, time.time() - t0

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        t0 = time.time()
        hostile = pool.submit(client.completions.create, model="smollm2", prompt="a" * 60,
                              max_tokens=64, extra_body={
                                  "structured_outputs": {"regex": PATHOLOGICAL},
                                  "vllm_xargs": {"tether_particles": 16}})
        normal = pool.submit(healthy)
        out = hostile.result()
        hostile_s = time.time() - t0
        r, _ = normal.result()
    assert out.choices[0].finish_reason == "budget" and out.model_extra["tether"]["log_z"] is None
    assert hostile_s < 30  # 16 x 0.5 s per step was the old bound, for each of 64 steps
    assert r.choices[0].finish_reason == "stop"


def test_bad_server_options_stop_it_at_start(tmp_path):
    import subprocess

    from conftest import TETHER

    for flags, needle in ((["--ess-threshold", "2"], "--ess-threshold"),
                          (["--particles", "8", "--max-particles", "4"], "--max-particles"),
                          (["--constraint-budget", "0"], "--constraint-budget")):
        run = subprocess.run([TETHER, "serve", "--sampler", "awrs", *flags],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 2 and needle in run.stderr, run.stderr[-800:]
        assert "Traceback" not in run.stderr
