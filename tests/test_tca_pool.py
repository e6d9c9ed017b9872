"""TCA in the engine returns KV blocks to vLLM's pool, and other requests get them (issue 22,
item 2), read from vLLM's own metrics (``LLM.get_metrics()``: ``vllm:num_requests_running``,
``vllm:kv_cache_usage_perc``, ``vllm:num_preemptions``) after every engine step.

Six ~2,500-token prompts (windows of the committed WikiText-2 fixture) in a KV pool of
``POOL`` blocks of 32 tokens: 2.9 requests' worth, so full attention runs at most two at once.
With TCA keeping 40%, a request shrinks to about 33 blocks at its first decode step, and the
freed blocks admit the next: at least four run at once. Each engine runs in a child process
of its own (vLLM keeps its KV connector and distributed state per process), with the same
settings and pool for all.

At ``kv_budget`` 1.0, TCA runs in the same pool and prunes nothing: as many at once as full
attention, and KV usage never falls between finishes.
"""

from __future__ import annotations

import multiprocessing
import traceback

import pytest

from conftest import fixture

pytestmark = [pytest.mark.engine, pytest.mark.slow]

PROMPT_TOKENS, REQUESTS, MAX_TOKENS, BLOCK = 2500, 6, 32, 32
PER_REQUEST = -(-(PROMPT_TOKENS + MAX_TOKENS) // BLOCK)  # 80 blocks
POOL = int(2.9 * PER_REQUEST)  # 232: two requests fit, three do not


@pytest.fixture(scope="module")
def budgets():
    from tether.attention.calibrate import calibrate

    text = fixture("wikitext-2", "valid-head.txt").read_text(encoding="utf-8")
    return calibrate("smollm2", block=32, tokens=256, window=16, text=text)


@pytest.fixture(scope="module")
def prompts():
    """Six windows of 2,500 tokens at distinct offsets (no shared prefix to cache)."""
    from transformers import AutoTokenizer

    from tether.models import resolve

    text = fixture("wikitext-2", "valid-head.txt").read_text(encoding="utf-8")
    ids = AutoTokenizer.from_pretrained(resolve("smollm2"))(text).input_ids
    step = (len(ids) - PROMPT_TOKENS) // (REQUESTS - 1)
    assert step >= BLOCK
    return [ids[i * step:i * step + PROMPT_TOKENS] for i in range(REQUESTS)]


WATCHED = ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:num_preemptions")


def scenario_batch(llm, prompts, max_tokens):
    """Adds every prompt at once and steps the engine to the end; after each step, vLLM's
    (running requests, KV usage, preemptions so far) and how many requests finished in it."""
    from vllm import SamplingParams

    engine = llm.engine.llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    steps, outputs = [], {}
    while engine.has_unfinished_requests():
        finished = [out for out in engine.step() if out.finished]
        outputs.update((int(out.request_id), out) for out in finished)
        metrics = {m.name: m.value for m in llm.engine.llm.get_metrics()
                   if m.name in WATCHED}
        steps.append((int(metrics["vllm:num_requests_running"]),
                      metrics["vllm:kv_cache_usage_perc"],
                      int(metrics["vllm:num_preemptions"]), len(finished)))
    return steps, [(outputs[i].outputs[0].text, outputs[i].kv_transfer_params)
                   for i in range(len(prompts))]


def _child(conn, prompts, tca) -> None:
    from tether.decode.llm import LLM

    try:
        llm = LLM("smollm2", max_model_len=PROMPT_TOKENS + MAX_TOKENS, block_size=BLOCK,
                  num_gpu_blocks_override=POOL, disable_log_stats=False, **tca)
        try:
            conn.send(("ok", scenario_batch(llm, prompts, MAX_TOKENS)))
        finally:
            llm.close()
    except Exception:
        conn.send(("error", traceback.format_exc()))


def run(prompts, **tca):
    """``scenario_batch`` on a fresh engine in a spawned child process."""
    ctx = multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child_conn, prompts, tca))
    proc.start()
    try:
        if not conn.poll(1800):
            raise TimeoutError("the engine's process did not answer")
        status, value = conn.recv()
    finally:
        proc.join(120)
        if proc.is_alive():
            proc.kill()
    if status == "error":
        raise RuntimeError(value)
    return value


@pytest.fixture(scope="module")
def full_run(prompts):
    return run(prompts)


def falls_between_finishes(steps) -> list[int]:
    """Steps where KV usage fell though no request finished or was preempted in it."""
    return [i for i in range(1, len(steps)) if steps[i][1] < steps[i - 1][1]
            and steps[i][3] == 0 and steps[i][2] == steps[i - 1][2]]


def test_budget_1_prunes_nothing_in_the_same_pool(budgets, prompts, full_run):
    full_steps, full_answers = full_run
    steps, answers = run(prompts, tca=budgets.to_dict(), kv_budget=1.0)
    assert max(s[0] for s in full_steps) == max(s[0] for s in steps) <= 2
    assert all(text.strip() for text, _ in full_answers + answers)
    assert [params for _, params in answers] == \
        [{"tether_tca": {"window_start": 0, "compactions": 0}}] * REQUESTS
    assert not falls_between_finishes(steps)
    assert not falls_between_finishes(full_steps)


def test_tca_runs_twice_as_many_requests_in_the_same_pool(budgets, prompts, request):
    full_steps, full_answers = request.getfixturevalue("full_run")
    tca_steps, tca_answers = run(prompts, tca=budgets.to_dict(), kv_budget=0.4)
    full_peak = max(s[0] for s in full_steps)
    tca_peak = max(s[0] for s in tca_steps)
    assert full_peak <= 2  # the pool is too small for the six under full attention
    assert tca_peak >= 2 * full_peak
    assert all(text.strip() for text, _ in full_answers + tca_answers)
    # no preemption loop: a request preempted at most once on average, and the run ended
    assert tca_steps[-1][2] <= REQUESTS
    for _, params in tca_answers:
        assert params["tether_tca"]["compactions"] >= 1
        assert params["tether_tca"]["window_start"] > 0
    # the blocks a compaction frees leave vLLM's usage figure at once; under full attention
    # usage falls only when a request finishes or is preempted
    assert falls_between_finishes(tca_steps)
    assert not falls_between_finishes(full_steps)
