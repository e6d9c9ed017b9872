"""A seeded request whose prompt is prefilled in chunks, on vLLM's CPU engine
(``tether.decode.cpu_seeds``).

vLLM discards the samples drawn for a prompt still being prefilled and rewinds the request's
seeded generator by an offset, which a CPU generator does not have: unpatched, the engine core
died ("CPU Generator does not use offset") and took every request with it. Here a seeded
request shares the batch with another long prompt, so that its prompt is chunked; the engine
must answer it, and the answer must be the one the same seed gives when the prompt is
prefilled in one piece (the discarded draws leave no trace).
"""

from __future__ import annotations

import pytest

from conftest import fixture

pytestmark = pytest.mark.engine


def test_seeded_request_with_a_chunked_prompt(llm):
    from vllm import SamplingParams

    vllm_llm = llm.engine.llm
    budget = vllm_llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    ids = llm.tokenizer(fixture("wikitext-2", "valid-head.txt").read_text(encoding="utf-8"))
    ids = ids.input_ids
    length = 1400  # a prompt fits one step; the last of the batch is cut at the budget
    prompts = [ids[i * length:(i + 1) * length] for i in range(budget // length + 1)]
    assert len(prompts[-1]) == length and len(prompts) * length > budget
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=1234, ignore_eos=True)
    together = vllm_llm.generate([{"prompt_token_ids": p} for p in prompts],
                                 [params] * len(prompts), use_tqdm=False)
    alone = vllm_llm.generate([{"prompt_token_ids": prompts[-1]}], params, use_tqdm=False)
    tokens = together[-1].outputs[0].token_ids
    assert len(tokens) == 12
    assert list(tokens) == list(alone[0].outputs[0].token_ids)
