"""TCA-Attention inside the real vLLM engine (``tether.decode.tca``), on the embedded SmolLM2.

One TCA engine for the file (fp32, kv_budget 1.0: TCA captures queries and shifts read
windows, and nothing is pruned), in a child process of its own (``tca_child.EngineChild``,
which says why) beside the session's plain engine (``llm``, which gives the references here).
The tests send the child the names of the ``scenario_*`` functions below.

Orders that move a read window come from a test planner installed on the live scheduler
connector; they free nothing and the test compactor moves nothing, so the cache holds every
token and the forward must equal the transformers model's attention with the positions before
the window dropped.
"""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass

import pytest
import torch

from conftest import TETHER, fixture, free_port, openai_client, running
from tca_child import ChildError, EngineChild, greedy, parts, smollm2_budgets, spy

pytestmark = pytest.mark.engine

PROMPTS = ["The capital of France is", "Write one sentence about the sea.",
           "List three colours:"]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
SHIFT = 32  # the forced window start: one block of 32 tokens
LAYERS, HEADS, KV_HEADS, HEAD = 30, 9, 3, 64  # SmolLM2-135M
POOL_BLOCKS = 64  # the TCA engine's KV pool: 2,048 tokens in blocks of 32 (requests up to 1,024)


@dataclass
class ShiftOrder:
    """A compaction order (the planner's output type) that only moves the read window."""

    req_id: str
    length: int
    start_old: int
    start_new: int
    block_ids: list


@pytest.fixture(scope="module")
def budgets():
    return smollm2_budgets()


@pytest.fixture(scope="module")
def reference(llm):
    """The plain engine's answers."""
    outs = greedy(llm, PROMPTS)
    awrs = llm.generate(["Describe a cat as JSON."], SCHEMA, max_tokens=48, seed=3)[0]
    return {"tokens": [list(o.outputs[0].token_ids) for o in outs],
            "text": [o.outputs[0].text for o in outs],
            "awrs": (awrs.token_ids, awrs.finish_reason, awrs.log_weight)}


@pytest.fixture(scope="module")
def tca(budgets):
    child = EngineChild(__name__, model="smollm2", tca=budgets.to_dict(), kv_budget=1.0,
                        max_model_len=1024, dtype="float32",
                        num_gpu_blocks_override=POOL_BLOCKS)
    yield child
    child.close()


# -- scenarios (run in the child, next to the engine) ----------------------------------------------

def scenario_greedy(llm, prompts, **params):
    outs = greedy(llm, prompts, **params)
    return [list(o.outputs[0].token_ids) for o in outs]


def scenario_awrs(llm):
    out = llm.generate(["Describe a cat as JSON."], SCHEMA, max_tokens=48, seed=3)[0]
    return out.token_ids, out.finish_reason, out.log_weight, out.stats["tokens"]


def scenario_hooks(llm):
    """Spies on the hooks while two requests decode together, then one that opts out."""
    scheduler, worker_conn, worker = parts(llm)
    runner = worker.model_runner
    events, undo = [], []
    undo.append(spy(events, scheduler, "build_connector_meta", "meta"))
    undo.append(spy(events, worker_conn, "handle_preemptions",
                    lambda meta: ("handle", tuple(meta.started))))
    undo.append(spy(events, runner, "_update_states", "update_states"))
    undo.append(spy(events, worker_conn, "wait_for_save", "end"))
    builders = [g.get_metadata_builder() for gs in runner.attn_groups for g in gs]
    for builder in builders:
        undo.append(spy(events, builder, "build", "build"))
    layers = [layer for layer in runner.compilation_config.static_forward_context.values()
              if hasattr(layer, "impl")]
    for i, layer in enumerate(layers):
        undo.append(spy(events, layer.impl, "forward", f"layer{i}"))
    try:
        outs = greedy(llm, ["Hello there,", "Good morning,"], max_tokens=4)
        opted = greedy(llm, ["Good evening,"], max_tokens=3, extra_args={"tether_tca": False})
    finally:
        for u in undo:
            u()
    return {"events": events, "builders": len(builders), "layers": len(layers),
            "ids": [o.request_id for o in outs], "opted": opted[0].request_id,
            "params": [o.kv_transfer_params for o in outs + opted]}


def scenario_shift(llm, prompt, at, max_tokens):
    """Greedy decoding of ``prompt``; when the request has ``at`` tokens cached, a planner order
    moves its window start to SHIFT. Returns what the planner and the compactor saw."""
    scheduler, worker_conn, _ = parts(llm)
    seen, captured = [], []

    def planner(manager, steps, settings):
        orders = []
        for step in steps:
            if step.num_new_tokens == 1 and step.request.num_computed_tokens == at:
                seen.append((step.start, step.observed))
                orders.append(ShiftOrder(step.request.request_id, at, step.start, SHIFT,
                                         manager.get_block_ids(step.request.request_id)[0]))
        return orders

    def compactor(order, kv_caches, queries, settings, kept):
        captured.append({"length": order.length, "layers": len(kv_caches),
                         "queries": queries.clone(), "scale": settings.scale,
                         "observe": settings.observe})

    saved = scheduler.planner, worker_conn.compactor
    scheduler.planner, worker_conn.compactor = planner, compactor
    try:
        out = greedy(llm, [{"prompt_token_ids": prompt}], max_tokens=max_tokens,
                     logprobs=20)[0]
    finally:
        scheduler.planner, worker_conn.compactor = saved
    return {"seen": seen, "captured": captured, "tokens": list(out.outputs[0].token_ids),
            "logprobs": [{t: lp.logprob for t, lp in step.items()}
                         for step in out.outputs[0].logprobs],
            "params": out.kv_transfer_params}


def scenario_preemption(llm, prompts, max_tokens):
    """Decodes ``prompts`` together in a pool too small for all of them; returns the tokens and
    each step's (dropped, started) request ids."""
    _, worker_conn, _ = parts(llm)
    events = []
    undo = spy(events, worker_conn, "handle_preemptions",
               lambda meta: (list(meta.dropped), list(meta.started)))
    try:
        outs = greedy(llm, [{"prompt_token_ids": p} for p in prompts], max_tokens=max_tokens)
    finally:
        undo()
    return [list(o.outputs[0].token_ids) for o in outs], events


def scenario_bad_opt_out(llm):
    greedy(llm, ["Hi"], max_tokens=1, extra_args={"tether_tca": "no"})


# -- tests ------------------------------------------------------------------------------------------

def test_hooks_fire_in_order_every_step(tca):
    """Per step: the scheduler's metadata, the worker's handle_preemptions (before the runner
    updates its batch), the builder, every layer's attention in order, the step's end. Each TCA
    request starts its state at its first step; an opted-out request never does, and only TCA
    requests report ``kv_transfer_params["tether_tca"]``."""
    got = tca.call("scenario_hooks")
    assert got["builders"] == 1 and got["layers"] == LAYERS
    per_step = ["meta", "handle", "update_states", "build"] + \
        [f"layer{i}" for i in range(LAYERS)] + ["end"]
    events = got["events"]
    steps = [events[i:i + len(per_step)] for i in range(0, len(events), len(per_step))]
    assert len(steps) == 4 + 3  # two requests decoded together (4 tokens), then 3 tokens
    for step in steps:
        assert [e[0] if isinstance(e, tuple) else e for e in step] == per_step
    # engine-side request ids are the caller's plus a suffix
    started = [r.rsplit("-", 1)[0] for step in steps for r in step[1][1]]
    assert steps[0][1][1] and sorted(started) == sorted(got["ids"])
    assert got["opted"] not in started
    assert got["params"] == [{"tether_tca": {"window_start": 0, "compactions": 0}}] * 2 + [None]


def test_no_compaction_equals_the_plain_engine(tca, reference):
    assert tca.call("scenario_greedy", prompts=PROMPTS) == reference["tokens"]


def test_awrs_with_tca_equals_the_plain_engine(tca, reference):
    """The AWRS processor, its records and tether's worker extension work beside TCA."""
    tokens, finish, log_weight, recorded = tca.call("scenario_awrs")
    ref_tokens, ref_finish, ref_log_weight = reference["awrs"]
    assert tokens == ref_tokens and finish == ref_finish
    assert log_weight == pytest.approx(ref_log_weight, abs=1e-6)
    assert recorded == len(tokens) > 0


@pytest.fixture(scope="module")
def hf_smollm2():
    from tether.attention.hf import load_model

    return load_model("smollm2")


def test_captured_queries_and_shifted_window_match_transformers(tca, hf_smollm2):
    """A 200-token prompt, decoded greedily: at its third decode step (L = 202 tokens cached) a
    planner order moves its read window to start at 32 (freeing nothing). The compactor gets the
    last w = 128 rotated queries (prefill and decode, through the ring's wrap-around), equal to
    transformers'; the log-probabilities of that step and the next equal transformers' attention
    with the positions before 32 dropped from the cache (and differ from full attention's);
    those before the order equal full attention's."""
    from tether.attention.hf import Probe

    model, tokenizer = hf_smollm2
    text = fixture("wikitext-2", "valid-head.txt").read_text(encoding="utf-8")
    prompt = tokenizer(text[5000:8000]).input_ids[:200]
    P = len(prompt)
    L = P + 2  # the order comes when two output tokens are cached
    got = tca.call("scenario_shift", prompt=prompt, at=L, max_tokens=5)
    assert got["seen"] == [(0, L)]  # window at 0; no prefix-cache hit: every query seen
    (captured,) = got["captured"]
    assert captured["length"] == L and captured["layers"] == LAYERS
    assert captured["scale"] == pytest.approx(HEAD ** -0.5) and captured["observe"] == 128
    queries = captured["queries"]
    assert queries.shape == (LAYERS, 128, HEADS, HEAD)  # the last w queries of every layer
    assert got["params"] == {"tether_tca": {"window_start": SHIFT, "compactions": 1}}
    tokens, engine = got["tokens"], got["logprobs"]

    class Queries(Probe):
        def on_last_queries(self, layer, q, keys, scaling, visible):
            self.q[layer] = q[0]

    probe = Queries(observe=128)
    probe.q = {}
    logits = {}
    with probe, torch.no_grad():
        out = model(torch.tensor([prompt + tokens[:2]]), use_cache=True)  # L tokens
        for i in (0, 1, 2):  # output i from position P - 1 + i: before the order
            logits[i] = out.logits[0, P - 1 + i]
        hf_queries = torch.stack([probe.q[i] for i in range(LAYERS)])
        probe.record = False
        cache = out.past_key_values
        full = model(torch.tensor([[tokens[2]]]), past_key_values=copy.deepcopy(cache))
        for i in (3, 4):  # output i from position P - 1 + i, reading [32, P - 1 + i]
            probe.keep = {layer: (torch.arange(P - 1 + i) >= SHIFT).expand(1, KV_HEADS,
                                                                          P - 1 + i)
                          for layer in range(LAYERS)}
            out = model(torch.tensor([[tokens[i - 1]]]), past_key_values=cache)
            logits[i], cache = out.logits[0, -1], out.past_key_values
    torch.testing.assert_close(queries, hf_queries, atol=1e-4, rtol=1e-4)
    for i, want in logits.items():
        ids = list(engine[i])
        torch.testing.assert_close(torch.tensor([engine[i][t] for t in ids]),
                                   torch.log_softmax(want.double(), -1)[ids].float(),
                                   atol=1e-3, rtol=0)
    ids = list(engine[3])
    full = torch.log_softmax(full.logits[0, -1].double(), -1)[ids].float()
    assert (torch.tensor([engine[3][t] for t in ids]) - full).abs().max() > 0.1


@pytest.mark.slow
def test_preempted_requests_restart_their_state_and_answer_as_plain(tca, llm, hf_smollm2):
    """Three 640-token prompts (20 blocks each) are admitted to the 64-block pool; decoding
    96 tokens each would need 69 blocks, so vLLM preempts one (it re-prefills later). The
    workers drop a preempted request's state and start it again when it resumes; the tokens
    equal the plain engine's."""
    tokenizer = hf_smollm2[1]
    text = fixture("wikitext-2", "valid-head.txt").read_text(encoding="utf-8")
    prompts = [tokenizer(text[i * 4000:(i + 1) * 4000]).input_ids[:640] for i in range(3)]
    tokens, events = tca.call("scenario_preemption", prompts=prompts, max_tokens=96)
    starts = [r for _, started in events for r in started]
    restarted = {r for r in starts if starts.count(r) > 1}
    assert len(set(starts)) == 3 and restarted  # every request started; some twice
    for r in restarted:
        first_drop = next(i for i, (dropped, _) in enumerate(events) if r in dropped)
        assert any(r in started for _, started in events[first_drop:])
    plain = greedy(llm, [{"prompt_token_ids": p} for p in prompts], max_tokens=96)
    assert tokens == [list(o.outputs[0].token_ids) for o in plain]


def test_bad_opt_out_value_is_refused_before_the_engine(tca):
    with pytest.raises(ChildError, match=r"VLLMValidationError: extra_args\['tether_tca'\] "
                                         "must be true or false, not 'no'"):
        tca.call("scenario_bad_opt_out")
    assert tca.call("scenario_greedy", prompts=PROMPTS[:1]) != []  # the engine goes on


@pytest.mark.parametrize("model, settings, env, reason", [
    ("gemma3", {}, {}, "sliding-window layers"),
    ("smollm2", {"kv_cache_dtype": "fp8"}, {}, "unquantized KV cache"),
    ("smollm2", {}, {"VLLM_USE_V2_MODEL_RUNNER": "1"}, "Model Runner V2"),
    ("smollm2", {"speculative_config": {"method": "ngram", "num_speculative_tokens": 2,
                                        "prompt_lookup_max": 2}}, {}, "speculative decoding"),
])
def test_unsupported_configurations_are_refused(budgets, monkeypatch, model, settings, env,
                                                reason):
    """Refused when the worker starts, before the model loads (nothing of the process's vLLM
    state is touched yet, so this runs in the test process), with compaction on (kv_budget
    0.4). Model Runner V2: on a CPU whose Triton has no CPU backend vLLM refuses it first
    ("Model Runner V2 requires Triton"); TCA's own check (``check_config``) names it where
    vLLM would run it."""
    from tether.decode.llm import LLM
    from tether.decode.tca import TCAUnsupported

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(TCAUnsupported if not env else ValueError, match=reason):
        LLM(model, tca=budgets, kv_budget=0.4, max_model_len=1024, **settings)


def test_unsupported_vllm_version_is_refused(monkeypatch):
    """All of TCA's vLLM-internal code was written for vLLM 0.32: another version is refused
    by name before any of it runs (the worker and the connector check first)."""
    import vllm

    from tether.decode.tca import check_config

    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with pytest.raises(RuntimeError, match="tether is tested with vLLM >= 0.32.*found 0.33.0"):
        check_config(None)


def test_wiring_refuses_bad_settings(budgets, tmp_path):
    from tether.attention.budgets import BudgetError
    from tether.decode.engine import engine_args
    from tether.decode.tca import COMPACTOR, PLANNER, TCAUnsupported, resolve_callable

    with pytest.raises(ValueError, match="kv_budget"):
        engine_args("smollm2", tca=budgets)
    with pytest.raises(ValueError, match=r"kv_budget must be a number in \(0, 1\]"):
        engine_args("smollm2", tca=budgets, kv_budget=1.5)
    (tmp_path / "b.json").write_text("{}")
    with pytest.raises(BudgetError, match="not a TCA budgets file"):
        engine_args("smollm2", tca=tmp_path / "b.json", kv_budget=1.0)
    with pytest.raises(TCAUnsupported, match="kv_budget < 1 needs in-engine compaction from "
                                             "nowhere:plan"):
        resolve_callable("nowhere:plan")
    args = engine_args("smollm2", tca=budgets, kv_budget=1.0)
    assert args["worker_cls"] == "tether.decode.tca.TCAWorker"
    assert args["kv_transfer_config"]["kv_role"] == "kv_producer"
    assert "planner" not in args["kv_transfer_config"]["kv_connector_extra_config"]["tether_tca"]
    extra = engine_args("smollm2", tca=budgets, kv_budget=0.5)["kv_transfer_config"][
        "kv_connector_extra_config"]["tether_tca"]
    assert (extra["kv_budget"], extra["planner"], extra["compactor"]) == (0.5, PLANNER, COMPACTOR)


def test_step_metadata_survives_pickling():
    """What the mp executor does to every step's metadata on its way to the workers."""
    from tether.decode.tca import TCAStepMetadata

    meta = TCAStepMetadata(dropped=["a"], started=["b"],
                           orders=[ShiftOrder("b", 300, 0, 192, [0, 0, 0, 0, 0, 0, 7, 8, 9, 10])])
    assert pickle.loads(pickle.dumps(meta)) == meta


@pytest.mark.slow
def test_served_multiprocess_engine_answers_with_tca(budgets, reference, tmp_path):
    """``tether serve --tca``: vLLM's engine process, and on the CPU a worker process of its own
    (vLLM turns the uni executor into the mp one when multiprocessing is on: the worker class
    is loaded there and every step's connector metadata is pickled to it). Through the OpenAI
    client, the greedy answer equals the plain engine's, the response says the request went
    through TCA, a request opts out with ``vllm_xargs``, and a bad opt-out value is a 400."""
    import openai

    path = tmp_path / "budgets.json"
    budgets.save(path)
    port = free_port()
    cmd = [TETHER, "serve", "--max-model-len", "1024", "--dtype", "float32", "--tca",
           str(path), "--kv-budget", "1.0", "--host", "127.0.0.1", "--port", str(port)]
    with running([cmd], tmp_path, port) as (base, _):
        client = openai_client(base)
        out = client.completions.create(model="smollm2", prompt=PROMPTS[0], max_tokens=16,
                                        temperature=0)
        opted = client.completions.create(model="smollm2", prompt=PROMPTS[0], max_tokens=16,
                                          temperature=0,
                                          extra_body={"vllm_xargs": {"tether_tca": False}})
        with pytest.raises(openai.BadRequestError, match="must be true or false"):
            client.completions.create(model="smollm2", prompt="Hi", max_tokens=1,
                                      extra_body={"vllm_xargs": {"tether_tca": "no"}})
    assert out.choices[0].text == opted.choices[0].text == reference["text"][0]
    assert out.kv_transfer_params == {"tether_tca": {"window_start": 0, "compactions": 0}}
    assert opted.kv_transfer_params is None  # the opted-out request never went through TCA
