"""TCA-Attention inside the real vLLM engine (``tether.decode.tca``), on the embedded SmolLM2.

One in-process TCA engine for the file (fp32, kv_budget 1.0: TCA captures queries and shifts
read windows, and nothing is pruned); the session's plain engine (``llm``) gives the references
before the TCA engine starts (a process holds one KV connector at a time: while the TCA engine
lives, the plain one is not stepped). Orders that move read windows come from a test planner
installed on the live scheduler connector; they free nothing and the test compactor moves
nothing, so the cache holds every token and the forward must equal the transformers model's
attention over the kept positions.
"""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass

import pytest
import torch

from conftest import TETHER, fixture, free_port, openai_client, running

pytestmark = pytest.mark.engine

PROMPTS = ["The capital of France is", "Write one sentence about the sea.",
           "List three colours:"]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
SHIFT = 32  # the forced window start: one block of 32 tokens


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
    from tether.attention.calibrate import calibrate

    text = fixture("wikitext-2", "valid-head.txt").read_text(encoding="utf-8")
    return calibrate("smollm2", block=32, tokens=256, window=16, text=text)


def greedy(engine, prompts, max_tokens=16, **params):
    from vllm import SamplingParams

    outs = engine.engine.llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=max_tokens, **params), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], outs


@pytest.fixture(scope="module")
def reference(llm):
    """The plain engine's answers, computed before the TCA engine exists."""
    tokens, outs = greedy(llm, PROMPTS)
    awrs = llm.generate(["Describe a cat as JSON."], SCHEMA, max_tokens=48, seed=3)[0]
    return {"greedy": tokens, "text": [o.outputs[0].text for o in outs], "awrs": awrs}


@pytest.fixture(scope="module")
def tca_llm(reference, budgets):
    from tether.decode.llm import LLM

    engine = LLM("smollm2", tca=budgets, kv_budget=1.0, max_model_len=2048, dtype="float32")
    yield engine
    engine.close()


def parts(engine):
    """(scheduler connector, worker connector, worker) of an in-process engine."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    core = engine.engine.llm.llm_engine.engine_core.engine_core
    return core.scheduler.connector, get_kv_transfer_group(), \
        core.model_executor.driver_worker.worker


@pytest.fixture
def hooks(tca_llm):
    """Installs planner/compactor on the live connectors; restores them afterwards."""
    scheduler, worker_conn, _ = parts(tca_llm)
    saved = scheduler.planner, worker_conn.compactor
    yield scheduler, worker_conn
    scheduler.planner, worker_conn.compactor = saved


def spy(events, obj, name, label):
    """Record a call of ``obj.name`` (an instance attribute shadowing the method)."""
    original = getattr(obj, name)

    def call(*args, **kwargs):
        events.append(label(*args) if callable(label) else label)
        return original(*args, **kwargs)

    setattr(obj, name, call)
    return lambda: delattr(obj, name)


def test_hooks_fire_in_order_every_step(tca_llm):
    """Per step: scheduler metadata, worker's handle_preemptions (before the runner updates
    its batch), the builder, every layer's attention in order, the step's end; an opted-out
    request never starts TCA state."""
    scheduler, worker_conn, worker = parts(tca_llm)
    runner = worker.model_runner
    events, undo = [], []
    undo.append(spy(events, scheduler, "build_connector_meta", "meta"))
    undo.append(spy(events, worker_conn, "handle_preemptions",
                    lambda meta: ("handle", tuple(meta.started))))
    undo.append(spy(events, runner, "_update_states", "update_states"))
    undo.append(spy(events, worker_conn, "wait_for_save", "end"))
    builders = [g.get_metadata_builder() for gs in runner.attn_groups for g in gs]
    assert len(builders) == 1
    undo.append(spy(events, builders[0], "build", "build"))
    layers = [(name, layer) for name, layer in
              runner.compilation_config.static_forward_context.items() if hasattr(layer, "impl")]
    for i, (_, layer) in enumerate(layers):
        undo.append(spy(events, layer.impl, "forward", f"layer{i}"))
    try:
        _, outs = greedy(tca_llm, ["Hello there,", "Good morning,"], max_tokens=4)
        _, opted = greedy(tca_llm, ["Good evening,"], max_tokens=3,
                          extra_args={"tether_tca": False})
    finally:
        for u in undo:
            u()
    per_step = ["meta", "handle", "update_states", "build"] + \
        [f"layer{i}" for i in range(len(layers))] + ["end"]
    steps = [events[i:i + len(per_step)] for i in range(0, len(events), len(per_step))]
    assert len(steps) == 4 + 3  # two requests decoded together, then the opted-out one
    for step in steps:
        assert [e if not isinstance(e, tuple) else e[0] for e in step] == per_step
    # engine-side ids are the caller's plus a suffix; each TCA request starts at its first step
    started = [r.rsplit("-", 1)[0] for step in steps for r in step[1][1]]
    assert sorted(started) == sorted(o.request_id for o in outs)
    assert opted[0].request_id not in started
    assert outs[0].kv_transfer_params == {"tether_tca": {"window_start": 0, "compactions": 0}}
    assert opted[0].kv_transfer_params is None


def test_no_compaction_equals_the_plain_engine(tca_llm, reference):
    tokens, _ = greedy(tca_llm, PROMPTS)
    assert tokens == reference["greedy"]


def test_awrs_with_tca_equals_the_plain_engine(tca_llm, reference):
    """The AWRS processor, its records and the worker extension work beside TCA."""
    out = tca_llm.generate(["Describe a cat as JSON."], SCHEMA, max_tokens=48, seed=3)[0]
    ref = reference["awrs"]
    assert out.token_ids == ref.token_ids and out.finish_reason == ref.finish_reason
    assert out.log_weight == pytest.approx(ref.log_weight, abs=1e-6)
    assert out.stats["tokens"] == len(out.token_ids) > 0


@pytest.fixture(scope="module")
def hf_smollm2():
    from tether.attention.hf import load_model

    return load_model("smollm2")


def test_captured_queries_and_shifted_window_match_transformers(tca_llm, hooks, hf_smollm2):
    """A 200-token prompt, decoded greedily: at its third decode step (L = 202 tokens cached) a
    planner order moves its read window to start at 32 (freeing nothing). The compactor gets the last w = 128 rotated
    queries (prefill and decode, through the ring's wrap-around), equal to transformers'; the
    log-probabilities of that step and the next equal transformers' attention with positions
    before 32 dropped from the cache (and differ from full attention's); those before the
    order equal full attention's."""
    from tether.attention.hf import Probe

    scheduler, worker_conn = hooks
    model, tokenizer = hf_smollm2
    text = fixture("wikitext-2", "valid-head.txt").read_text(encoding="utf-8")
    prompt = tokenizer(text[5000:8000]).input_ids[:200]
    P, L = len(prompt), len(prompt) + 2  # the order comes when 2 output tokens are computed
    seen = []

    def planner(manager, steps, settings):
        orders = []
        for step in steps:
            if step.num_new_tokens == 1 and step.request.num_computed_tokens == L:
                seen.append(step)
                orders.append(ShiftOrder(step.request.request_id, L, step.start, SHIFT,
                                         manager.get_block_ids(step.request.request_id)[0]))
        return orders

    captured = []
    scheduler.planner = planner
    worker_conn.compactor = lambda order, kv, queries, settings: captured.append(
        (order, queries.clone(), len(kv), settings))
    tokens, outs = greedy(tca_llm, [{"prompt_token_ids": prompt}], max_tokens=5, logprobs=20)
    tokens = tokens[0]
    assert len(seen) == 1 and seen[0].observed == L  # no prefix-cache hit: all queries seen
    (order, queries, num_kv, settings), = captured
    assert order.length == L and num_kv == 30 and settings.scale == pytest.approx(64 ** -0.5)
    assert queries.shape == (30, 128, 9, 64)  # layers, the last w queries, heads, head size
    assert outs[0].kv_transfer_params == {"tether_tca": {"window_start": SHIFT,
                                                         "compactions": 1}}

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
        hf_queries = torch.stack([probe.q[i] for i in range(30)])
        probe.record = False
        cache = out.past_key_values
        full = model(torch.tensor([[tokens[2]]]), past_key_values=copy.deepcopy(cache))
        for i in (3, 4):  # output i from position P - 1 + i, reading [32, P - 1 + i]
            probe.keep = {layer: (torch.arange(P - 1 + i) >= SHIFT).expand(1, 3, P - 1 + i)
                          for layer in range(30)}
            out = model(torch.tensor([[tokens[i - 1]]]), past_key_values=cache)
            logits[i], cache = out.logits[0, -1], out.past_key_values
    torch.testing.assert_close(queries, hf_queries, atol=1e-4, rtol=1e-4)
    engine = outs[0].outputs[0].logprobs
    for i, want in logits.items():
        ids = list(engine[i])
        got = torch.tensor([engine[i][t].logprob for t in ids])
        torch.testing.assert_close(got, torch.log_softmax(want.double(), -1)[ids].float(),
                                   atol=1e-3, rtol=0)
    full = torch.log_softmax(full.logits[0, -1].double(), -1)[list(engine[3])].float()
    assert (torch.tensor([lp.logprob for lp in engine[3].values()]) - full).abs().max() > 0.1


def test_bad_opt_out_value_is_refused_before_the_engine(tca_llm):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="tether_tca"):
        tca_llm.engine.llm.generate(["Hi"], SamplingParams(max_tokens=1,
                                                           extra_args={"tether_tca": "no"}),
                                    use_tqdm=False)


@pytest.mark.parametrize("model, settings, env, reason", [
    ("gemma3", {}, {}, "sliding-window layers"),
    ("smollm2", {"kv_cache_dtype": "fp8"}, {}, "unquantized KV cache"),
    ("smollm2", {}, {"VLLM_USE_V2_MODEL_RUNNER": "1"}, "Model Runner V2"),
])
def test_unsupported_configurations_are_refused(budgets, monkeypatch, model, settings, env,
                                                reason):
    """Refused at the worker's start, before the model loads. Model Runner V2: on a CPU whose
    Triton has no CPU backend vLLM refuses it first ("Model Runner V2 requires Triton"); TCA's
    own check (``check_config``) names it where vLLM would run it."""
    from tether.decode.llm import LLM
    from tether.decode.tca import TCAUnsupported

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(TCAUnsupported if not env else ValueError, match=reason):
        LLM(model, tca=budgets, kv_budget=1.0, max_model_len=1024, **settings)


def test_wiring_refuses_bad_settings(budgets, tmp_path):
    from tether.attention.budgets import BudgetError
    from tether.decode.engine import engine_args
    from tether.decode.tca import TCAUnsupported

    with pytest.raises(ValueError, match="kv_budget"):
        engine_args("smollm2", tca=budgets)
    with pytest.raises(ValueError, match=r"kv_budget must be a number in \(0, 1\]"):
        engine_args("smollm2", tca=budgets, kv_budget=1.5)
    with pytest.raises(BudgetError, match="not a TCA budgets file"):
        (tmp_path / "b.json").write_text("{}")
        engine_args("smollm2", tca=tmp_path / "b.json", kv_budget=1.0)
    with pytest.raises(TCAUnsupported, match="kv_budget < 1 needs in-engine compaction"):
        engine_args("smollm2", tca=budgets, kv_budget=0.5)
    args = engine_args("smollm2", tca=budgets, kv_budget=1.0)
    assert args["worker_cls"] == "tether.decode.tca.TCAWorker"
    assert args["kv_transfer_config"]["kv_role"] == "kv_producer"


@pytest.mark.slow
def test_served_multiprocess_engine_answers_with_tca(budgets, reference, tmp_path):
    """``tether serve --tca`` with vLLM's engine process and a worker process of its own (the
    mp executor: the worker class is loaded there and the step's connector metadata is pickled
    to it), through the OpenAI client: the greedy answer equals the plain engine's, and the
    response says the request went through TCA."""
    path = tmp_path / "budgets.json"
    budgets.save(path)
    port = free_port()
    cmd = [TETHER, "serve", "--max-model-len", "1024", "--dtype", "float32", "--tca",
           str(path), "--kv-budget", "1.0", "--distributed-executor-backend", "mp",
           "--host", "127.0.0.1", "--port", str(port)]
    with running([cmd], tmp_path, port) as (base, _):
        out = openai_client(base).completions.create(model="smollm2", prompt=PROMPTS[0],
                                                     max_tokens=16, temperature=0)
    assert out.choices[0].text == reference["text"][0]
    assert out.kv_transfer_params == {"tether_tca": {"window_start": 0, "compactions": 0}}


def test_step_metadata_survives_pickling():
    """What the mp executor does to every step's metadata on its way to the workers."""
    from tether.decode.tca import TCAStepMetadata

    meta = TCAStepMetadata(dropped=["a"], started=["b"],
                           orders=[ShiftOrder("b", 300, 0, 192, [0, 0, 0, 0, 0, 0, 7, 8, 9, 10])])
    assert pickle.loads(pickle.dumps(meta)) == meta
