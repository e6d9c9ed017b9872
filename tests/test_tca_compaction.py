"""TCA-Attention compacting inside the real vLLM engine (kv_budget 0.4), on the embedded SmolLM2.

One engine for the file (fp32, kv_budget 0.4, a 64-block pool of 32 tokens, prefix caching),
in a child process of its own (``tca_child.EngineChild``, which says why); the tests send it
the names of the ``scenario_*`` functions below. The planner and the compactor are the real
ones (``tca_blocks.plan_compactions``, ``tca_layout.compact_request``); the scenarios only wrap
them to record what they did. With the calibration's w = 128 observed queries, 4 sinks and
window 16, a request keeps at least 132 tokens and compacts when its window start can advance
by 4 blocks: a 300-token prompt compacts at its first decode step, from [0, 300) to
[160, 300) (5 blocks freed), and next at 480 tokens.
"""

from __future__ import annotations

import time

import pytest
import torch

from conftest import fixture
from tca_child import EngineChild, greedy, parts, scheduler_of, smollm2_budgets

pytestmark = pytest.mark.engine

LAYERS, KV_HEADS = 30, 3  # SmolLM2-135M
POOL_BLOCKS = 64
PROMPT_LEN = 300
FIRST_START = 160  # floor((300 - max(132, ceil(0.4 * 300))) / 32) * 32


@pytest.fixture(scope="module")
def budgets():
    return smollm2_budgets()


@pytest.fixture(scope="module")
def tca(budgets):
    child = EngineChild(__name__, model="smollm2", tca=budgets.to_dict(), kv_budget=0.4,
                        max_model_len=1024, dtype="float32",
                        num_gpu_blocks_override=POOL_BLOCKS)
    yield child
    child.close()


@pytest.fixture(scope="module")
def hf_smollm2():
    from tether.attention.hf import load_model

    return load_model("smollm2")


@pytest.fixture(scope="module")
def texts(hf_smollm2):
    """Token prompts cut from the wikitext fixture: ``texts(i, n)`` is the i-th, n tokens."""
    tokenizer = hf_smollm2[1]
    text = fixture("wikitext-2", "valid-head.txt").read_text(encoding="utf-8")
    return lambda i, n: tokenizer(text[i * 4000:(i + 1) * 4000]).input_ids[:n]


# -- scenarios (run in the child, next to the engine) ----------------------------------------------

class Recorder:
    """Wraps the live engine's planner and compactor: per step with orders, vLLM's free block
    count and ``kv_cache_usage`` around the planner, and the orders; per compaction, the
    order and the kept positions the compactor returned."""

    def __init__(self, llm):
        self.scheduler = scheduler_of(llm)
        self.conn, self.worker_conn, _ = parts(llm)
        self.steps, self.kept, self.shared = [], [], []

    def __enter__(self):
        manager = self.scheduler.kv_cache_manager
        planner, compactor = self.conn.planner, self.worker_conn.compactor

        def plan(kv_manager, steps, settings):
            rows = {s.request.request_id: [b.ref_cnt for b in
                                           kv_manager.get_blocks(s.request.request_id).blocks[0]]
                    for s in steps}
            free, usage = manager.block_pool.get_num_free_blocks(), manager.usage
            orders = planner(kv_manager, steps, settings)
            if orders:
                self.steps.append({
                    "free": (free, manager.block_pool.get_num_free_blocks()),
                    "usage": (usage, manager.usage),
                    "orders": [(o.req_id, o.length, o.start_old, o.start_new) for o in orders]})
            for o in orders:  # the destination blocks' holders before the surgery
                self.shared.append(max(rows[o.req_id][o.start_new // settings.block_size:]))
            return orders

        def compact(order, kv_caches, queries, settings, kept):
            began = time.perf_counter()
            out = compactor(order, kv_caches, queries, settings, kept)
            self.kept.append({"req_id": order.req_id, "length": order.length,
                              "start": order.start_new, "positions": out.clone(),
                              "seconds": time.perf_counter() - began})
            return out

        self.saved = planner, compactor
        self.conn.planner, self.worker_conn.compactor = plan, compact
        return self

    def __exit__(self, *exc):
        self.conn.planner, self.worker_conn.compactor = self.saved

    def report(self, **more):
        return {"steps": self.steps, "kept": self.kept, "shared": self.shared, **more}


def outputs(outs):
    return [{"tokens": list(o.outputs[0].token_ids), "text": o.outputs[0].text,
             "finish": o.outputs[0].finish_reason, "params": o.kv_transfer_params,
             "cached": o.num_cached_tokens,
             "logprobs": None if o.outputs[0].logprobs is None else
             [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]}
            for o in outs]


def scenario_generate(llm, prompts, max_tokens, **params):
    """Greedy decoding of token prompts, all in one batch, with the recorder on."""
    began = time.perf_counter()
    with Recorder(llm) as rec:
        outs = greedy(llm, [{"prompt_token_ids": p} for p in prompts], max_tokens=max_tokens,
                      **params)
    return rec.report(outputs=outputs(outs), seconds=time.perf_counter() - began)



# -- helpers ---------------------------------------------------------------------------------------

def hf_logprobs(model, prompt, tokens, kept_at, kept):
    """Transformers' log-probabilities of outputs 0.. of ``prompt`` followed by ``tokens``,
    attention of the outputs from index ``kept_at`` on restricted, per layer and KV head, to
    the positions ``kept [layers, H_kv, K]`` (None: none restricted) among the first ``len(prompt) + kept_at - 1``
    (the later ones all visible), as after the engine's compaction (fp64 softmax)."""
    from tether.attention.hf import Probe

    P = len(prompt)
    L = P + kept_at - 1  # tokens cached when the compaction came
    probe = Probe()
    probe.record = False
    mask = torch.zeros(LAYERS, 1, KV_HEADS, L, dtype=torch.bool)
    if kept is not None:
        mask.scatter_(3, kept.long()[:, None], True)
    out_lp = []
    with probe, torch.no_grad():
        out = model(torch.tensor([prompt + tokens[:kept_at - 1]]), use_cache=True)
        out_lp.extend(torch.log_softmax(out.logits[0, P - 1 + i].double(), -1)
                      for i in range(kept_at))
        cache = out.past_key_values
        probe.keep = {layer: mask[layer] for layer in range(LAYERS)}
        for i in range(kept_at, len(tokens)):
            out = model(torch.tensor([[tokens[i - 1]]]), past_key_values=cache)
            out_lp.append(torch.log_softmax(out.logits[0, -1].double(), -1))
            cache = out.past_key_values
    return out_lp


def assert_logprobs_match(engine, want, atol=1e-3):
    for i, (got, lp) in enumerate(zip(engine, want)):
        ids = list(got)
        torch.testing.assert_close(torch.tensor([got[t] for t in ids]), lp[ids].float(),
                                   atol=atol, rtol=0, msg=lambda m: f"output {i}: {m}")


# -- tests ------------------------------------------------------------------------------------------

def test_compaction_returns_blocks_and_matches_transformers(tca, hf_smollm2, texts):
    """A 300-token prompt compacts at its first decode step, [0, 300) -> [160, 300): vLLM's
    free block count rises by the 5 freed blocks and its ``kv_cache_usage`` falls in that very
    step; the report says where the window starts. The worker's kept positions hold the 4 sinks
    and the last 128 tokens (the observed queries); every later log-probability equals
    transformers' attention over exactly those positions (plus the tokens decoded since), with
    logical RoPE positions, and differs from full attention's."""
    model = hf_smollm2[0]
    prompt = texts(1, PROMPT_LEN)
    got = tca.call("scenario_generate", prompts=[prompt], max_tokens=6, logprobs=20)
    (out,) = got["outputs"]
    assert out["params"] == {"tether_tca": {"window_start": FIRST_START, "compactions": 1}}
    (step,) = got["steps"]
    (order,) = step["orders"]
    assert order[1:] == (PROMPT_LEN, 0, FIRST_START)
    free_before, free_after = step["free"]
    assert free_after - free_before == FIRST_START // 32
    assert step["usage"][1] < step["usage"][0]
    (kept,) = got["kept"]
    positions = kept["positions"]
    assert kept["length"] == PROMPT_LEN and positions.shape == (LAYERS, KV_HEADS, 140)
    assert (positions[:, :, :4] == torch.arange(4)).all()
    assert (positions[:, :, -128:] == torch.arange(PROMPT_LEN - 128, PROMPT_LEN)).all()
    assert (positions.diff(dim=2) > 0).all()
    tokens = out["tokens"]
    assert len(tokens) == 6
    want = hf_logprobs(model, prompt, tokens, 1, positions)
    assert_logprobs_match(out["logprobs"], want)
    full = hf_logprobs(model, prompt, tokens, 6, positions)  # no output restricted
    ids = list(out["logprobs"][1])
    assert (torch.tensor([out["logprobs"][1][t] for t in ids]) - full[1][ids]).abs().max() > 1e-2


@pytest.mark.slow
def test_long_answers_compact_repeatedly_and_stay_sensible(tca, texts):
    """Three requests decode 200 tokens together from 300-token prompts: each compacts at its
    first decode step and again as it grows (every compaction advances the window by at
    least 4 blocks and frees them in vLLM's pool in that step); every answer is a full,
    non-degenerate continuation."""
    got = tca.call("scenario_generate", prompts=[texts(i, PROMPT_LEN) for i in (2, 3, 4)],
                   max_tokens=200)
    for out in got["outputs"]:
        report = out["params"]["tether_tca"]
        assert report["compactions"] >= 2 and report["window_start"] >= 288
        assert out["finish"] == "length" and len(out["tokens"]) == 200
        assert out["text"].strip() and len(set(out["tokens"])) >= 20
    for step in got["steps"]:
        freed = sum((new - old) // 32 for _, _, old, new in step["orders"])
        assert step["free"][1] - step["free"][0] == freed >= 4 * len(step["orders"])
        assert step["usage"][1] < step["usage"][0]
    assert sum(len(s["orders"]) for s in got["steps"]) == \
        sum(o["params"]["tether_tca"]["compactions"] for o in got["outputs"])
