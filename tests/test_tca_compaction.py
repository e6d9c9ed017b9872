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
    """Token prompts cut from the wikitext fixture (about 4,500 tokens): ``texts(i, n)`` is
    the i-th, n tokens from its own offset (no two share a first block)."""
    ids = hf_smollm2[1](fixture("wikitext-2", "valid-head.txt").read_text(encoding="utf-8"))
    ids = ids.input_ids
    return lambda i, n: ids[i * 373 % (len(ids) - n):][:n]


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


def scenario_chunked(llm, prompt, budget):
    """The same prompt twice from an empty prefix cache, 6 greedy tokens: whole, then with
    at most ``budget`` tokens scheduled per step (chunked prefill). Returns both reports and
    the chunked run's scheduled token counts per step."""
    scheduler = scheduler_of(llm)
    reports = []
    for limit in (None, budget):
        llm.engine.llm.reset_prefix_cache()
        saved = scheduler.max_num_scheduled_tokens
        counts = []
        original = scheduler.connector.build_connector_meta

        def meta(out):
            counts.append(sorted(out.num_scheduled_tokens.values()))
            return original(out)

        scheduler.connector.build_connector_meta = meta
        if limit is not None:
            scheduler.max_num_scheduled_tokens = limit
        try:
            reports.append(scenario_generate(llm, [prompt], max_tokens=6, logprobs=20))
        finally:
            scheduler.max_num_scheduled_tokens = saved
            del scheduler.connector.build_connector_meta
        reports[-1]["scheduled"] = counts
    return reports


def scenario_prefix(llm, prompt):
    """From an empty prefix cache: A decodes ``prompt`` (and compacts), then B the same prompt,
    then C the same prompt opted out; one after the other."""
    llm.engine.llm.reset_prefix_cache()
    got = []
    for extra in (None, None, {"tether_tca": False}):
        params = {"extra_args": extra} if extra else {}
        got.append(scenario_generate(llm, [prompt], max_tokens=6, logprobs=20, **params))
    return got


def scenario_mixed(llm, prompts):
    """One batch: the first prompt opted out, the second compacting."""
    from vllm import SamplingParams

    plain = SamplingParams(temperature=0, max_tokens=6, logprobs=20,
                           extra_args={"tether_tca": False})
    tca = SamplingParams(temperature=0, max_tokens=6, logprobs=20)
    with Recorder(llm) as rec:
        outs = llm.engine.llm.generate([{"prompt_token_ids": p} for p in prompts],
                                       [plain, tca], use_tqdm=False)
    return rec.report(outputs=outputs(outs))


def scenario_abort(llm, prompt):
    """A request compacts, is aborted mid-answer; a short request runs after it. Returns the
    free block counts (before, after the compaction, at the end), what the scheduler half and
    the workers still track, and the short request's output."""
    from vllm import SamplingParams

    engine = llm.engine.llm.llm_engine
    scheduler = scheduler_of(llm)
    conn, worker_conn, _ = parts(llm)
    pool = scheduler.kv_cache_manager.block_pool
    free = [pool.get_num_free_blocks()]
    req_id = engine.add_request("abort-me", {"prompt_token_ids": prompt},
                                SamplingParams(temperature=0, max_tokens=200))
    steps = 0
    while conn.tracked[req_id].compactions < 1 or steps < 3:
        engine.step()
        steps += 1
    free.append(pool.get_num_free_blocks())
    engine.abort_request(["abort-me"])
    after = greedy(llm, [{"prompt_token_ids": prompt[:20]}], max_tokens=3)
    free.append(pool.get_num_free_blocks())
    return {"free": free, "total": pool.num_gpu_blocks, "tracked": list(conn.tracked),
            "worker": list(worker_conn.state.requests), "id": req_id,
            "after": outputs(after)}


def scenario_preemption(llm, prompts, max_tokens):
    """Greedy decoding of ``prompts`` together; also counts vLLM's preemptions per step."""
    scheduler = scheduler_of(llm)
    preempted = []
    original = scheduler.connector.build_connector_meta

    def meta(out):
        preempted.extend(out.preempted_req_ids or ())
        return original(out)

    scheduler.connector.build_connector_meta = meta
    try:
        report = scenario_generate(llm, prompts, max_tokens=max_tokens)
    finally:
        del scheduler.connector.build_connector_meta
    return {**report, "preempted": preempted}


def scenario_smc(llm, prompt, particles, max_tokens):
    """An SMC population of ``particles`` on one prompt (its blocks shared by prefix caching),
    then the same prompt alone, opted out, greedy."""
    llm.engine.llm.reset_prefix_cache()
    with Recorder(llm) as rec:
        result = llm.generate([prompt], max_tokens=max_tokens, particles=particles, seed=0)[0]
    after = greedy(llm, [{"prompt_token_ids": prompt}], max_tokens=6, logprobs=20,
                   extra_args={"tether_tca": False})
    return rec.report(texts=[p.text for p in result.particles], after=outputs(after))


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


def test_chunked_prefill_compacts_only_after_the_whole_prompt(tca, texts):
    """With at most 64 tokens scheduled per step, the 300-token prompt prefills in 5 chunks;
    the one compaction comes at the first decode step (L = 300), and it keeps the same
    positions and gives the same answer as the prompt prefilled whole: the ring of observed
    queries spans the chunks."""
    whole, chunked = tca.call("scenario_chunked", prompt=texts(5, PROMPT_LEN), budget=64)
    assert chunked["scheduled"][:6] == [[64]] * 4 + [[44], [1]]
    for run in (whole, chunked):
        (step,) = run["steps"]
        assert [o[1:] for o in step["orders"]] == [(PROMPT_LEN, 0, FIRST_START)]
    assert torch.equal(whole["kept"][0]["positions"], chunked["kept"][0]["positions"])
    (a,), (b,) = whole["outputs"], chunked["outputs"]
    assert a["tokens"] == b["tokens"] and a["params"] == b["params"]
    for x, y in zip(a["logprobs"], b["logprobs"]):
        assert x.keys() == y.keys()
        assert max(abs(x[t] - y[t]) for t in x) < 1e-3


def test_prefix_cache_serves_freed_blocks_and_never_rewritten_ones(tca, hf_smollm2, texts):
    """A compacts [0, 300) -> [160, 300). B, the same prompt next, hits exactly A's 5 freed
    leading blocks (160 tokens), not the rewritten ones, and answers as A did. C, the same
    prompt opted out, hits the same 160 tokens and its log-probabilities equal full
    attention's in transformers: the cached blocks hold the prompt's true KV."""
    prompt = texts(6, PROMPT_LEN)
    a, b, c = (run["outputs"][0] for run in tca.call("scenario_prefix", prompt=prompt))
    assert a["cached"] == 0 and b["cached"] == FIRST_START == c["cached"]
    assert a["params"] == b["params"] == {"tether_tca": {"window_start": FIRST_START,
                                                         "compactions": 1}}
    assert a["tokens"] == b["tokens"]
    assert c["params"] is None
    want = hf_logprobs(hf_smollm2[0], prompt, c["tokens"], len(c["tokens"]), None)
    assert_logprobs_match(c["logprobs"], want)


def test_opted_out_request_beside_a_compacting_one(tca, hf_smollm2, texts):
    """In one batch, a request opted out with ``extra_args["tether_tca"] = False`` keeps its
    whole KV (its log-probabilities are full attention's in transformers, no order names it)
    while the other compacts."""
    prompts = [texts(7, PROMPT_LEN), texts(8, PROMPT_LEN)]
    got = tca.call("scenario_mixed", prompts=prompts)
    plain, pruned = got["outputs"]
    assert plain["params"] is None
    assert pruned["params"] == {"tether_tca": {"window_start": FIRST_START, "compactions": 1}}
    assert sum(len(s["orders"]) for s in got["steps"]) == 1
    want = hf_logprobs(hf_smollm2[0], prompts[0], plain["tokens"], len(plain["tokens"]), None)
    assert_logprobs_match(plain["logprobs"], want)


def test_abort_after_a_compaction_frees_everything(tca, texts):
    """A request aborted after its compaction: the freed blocks came back at the compaction,
    the rest at the abort (every block of the pool is free again), and neither half tracks it
    any more; the engine answers the next request."""
    got = tca.call("scenario_abort", prompt=texts(9, PROMPT_LEN))
    start, compacted, end = got["free"]
    assert start == end == got["total"] - 1  # all but the pool's null block
    assert compacted == start - (-(-(PROMPT_LEN + 3) // 32)) + FIRST_START // 32
    assert got["tracked"] == [] and got["id"] not in got["worker"]
    assert len(got["after"][0]["tokens"]) == 3


@pytest.mark.slow
def test_preemption_under_a_tight_pool_with_compaction(tca, texts):
    """Three 672-token prompts fill the 63 usable blocks; their first decode step needs a 22nd
    block each, so vLLM preempts one, and the others compact (12 blocks each) in that step.
    The preempted request is re-admitted (prefix hits on its own unmodified blocks), starts
    its ring again, and compacts once it has observed 128 queries; no preemption loop."""
    prompts = [texts(i, 672) for i in (10, 11, 12)]
    got = tca.call("scenario_preemption", prompts=prompts, max_tokens=100)
    assert 1 <= len(got["preempted"]) <= 2
    for out in got["outputs"]:
        assert out["finish"] == "length" and len(out["tokens"]) == 100 and out["text"].strip()
        assert out["params"]["tether_tca"]["compactions"] >= 1


@pytest.mark.slow
def test_smc_population_never_writes_shared_prompt_blocks(tca, hf_smollm2, texts):
    """Four SMC particles share a 200-token prompt's 6 full blocks. A particle's compaction
    whose kept blocks include a shared one defers (at L = 260 the target start 128 would keep
    blocks 4 and 5): its first order comes at L = 324, start 192, where every kept block is
    its own, and no order ever names a block with another holder. Every particle answers,
    and afterwards the prompt's cached blocks still hold its true KV: an opted-out request on
    it hits them and its log-probabilities equal full attention's in transformers."""
    prompt = texts(13, 200)
    got = tca.call("scenario_smc", prompt=prompt, particles=4, max_tokens=130)
    assert len(got["texts"]) == 4 and all(t.strip() for t in got["texts"])
    orders = [o for step in got["steps"] for o in step["orders"]]
    assert orders and got["shared"] == [1] * len(orders)
    first = {}
    for req_id, length, _, start in orders:
        first.setdefault(req_id, (length, start))
    assert all(length >= 324 and start >= 192 for length, start in first.values())
    (after,) = got["after"]
    assert after["cached"] == 192
    want = hf_logprobs(hf_smollm2[0], prompt, after["tokens"], len(after["tokens"]), None)
    assert_logprobs_match(after["logprobs"], want)


@pytest.mark.slow
def test_served_engine_compacts_under_awrs(budgets, texts, tmp_path):
    """``tether serve --tca FILE --kv-budget 0.4 --sampler awrs`` (the mp executor: orders are
    pickled to the worker process): a JSON-schema request under AWRS and a plain 300-token
    prompt; the plain one compacts (its response reports the window), both answer."""
    import json

    from conftest import TETHER, free_port, openai_client, running

    path = tmp_path / "budgets.json"
    budgets.save(path)
    port = free_port()
    cmd = [TETHER, "serve", "--max-model-len", "1024", "--dtype", "float32", "--tca",
           str(path), "--kv-budget", "0.4", "--sampler", "awrs", "--host", "127.0.0.1",
           "--port", str(port)]
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}},
              "required": ["name"], "additionalProperties": False}
    with running([cmd], tmp_path, port) as (base, _):
        client = openai_client(base)
        out = client.completions.create(model="smollm2", prompt=texts(14, PROMPT_LEN),
                                        max_tokens=8, temperature=0)
        awrs = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Name a cat, as JSON."}],
            max_tokens=40, response_format={"type": "json_schema", "json_schema": {
                "name": "cat", "schema": schema}})
    assert out.kv_transfer_params == {"tether_tca": {"window_start": FIRST_START,
                                                     "compactions": 1}}
    assert out.choices[0].text
    assert "name" in json.loads(awrs.choices[0].message.content)


@pytest.mark.slow
def test_data_parallel_engines_compact_in_their_own_pools(budgets, texts, tmp_path):
    """``tether serve --data-parallel-size 2 --tca FILE --kv-budget 0.4``: four 300-token
    prompts at once spread over both engines (vLLM's metrics count prompt tokens on each),
    and every one of them compacts in its engine's pool."""
    import concurrent.futures
    import re
    import urllib.request

    from conftest import TETHER, free_port, openai_client, running

    path = tmp_path / "budgets.json"
    budgets.save(path)
    port = free_port()
    cmd = [TETHER, "serve", "--max-model-len", "1024", "--dtype", "float32", "--tca",
           str(path), "--kv-budget", "0.4", "--data-parallel-size", "2", "--host",
           "127.0.0.1", "--port", str(port)]
    with running([cmd], tmp_path, port) as (base, _):
        client = openai_client(base)

        def one(i):
            return client.completions.create(model="smollm2", prompt=texts(20 + i, PROMPT_LEN),
                                             max_tokens=4, temperature=0)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(one, range(4)))
        metrics = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
    for out in outs:
        assert out.kv_transfer_params == {"tether_tca": {"window_start": FIRST_START,
                                                         "compactions": 1}}
        assert out.choices[0].text
    prompt_tokens = {engine: float(value) for engine, value in re.findall(
        r'^vllm:prompt_tokens_total\{[^}]*engine="(\d)"[^}]*\} (\S+)', metrics, re.M)}
    assert prompt_tokens.keys() == {"0", "1"} and min(prompt_tokens.values()) > 0
