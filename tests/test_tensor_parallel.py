"""AWRS under tensor parallelism: every rank must force the same token.

vLLM runs the sampling step on every tensor-parallel rank. The AWRS noise is a pure function
of (particle seed, step), so ranks that see the same logits make the same decisions; the
records of all ranks are compared whenever they are read (``records.merge``).
"""

from __future__ import annotations

import os

import pytest

from tether.decode.records import merge

pytestmark = pytest.mark.engine


def _raw(token, weight, key="p"):
    return {key: {"key": key, "dead_step": None, "failure": None, "engine": 0, "steps": {0: {
        "token": token, "log_weight": weight, "checks": 1, "rejections": 0, "exact": False,
        "untruncated": False, "constraint_s": 0.1, "device_s": 0.2}}}}


def test_rank_disagreement_is_detected():
    assert merge([_raw(5, -1.0), _raw(5, -1.0)])["p"].steps[0].token == 5
    with pytest.raises(RuntimeError, match="worker 1"):
        merge([_raw(5, -1.0), _raw(6, -1.0)])


def test_workers_without_the_record_are_ignored():
    # pipeline stages that do not sample, and other data-parallel engines, hold no record
    merged = merge([{}, _raw(5, -1.0), _raw(7, -2.0, key="q"), {}])
    assert merged["p"].steps[0].log_weight == -1.0 and merged["q"].steps[0].token == 7


@pytest.mark.slow  # about 80 s: its own two-process engine
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores, one per rank")
def test_two_ranks_on_the_cpu(monkeypatch):
    from tether.decode.llm import LLM

    # Gemma 3 270M: 4 attention heads (SmolLM2's 9 do not split in two). One core per rank.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    with LLM("gemma3", tensor_parallel_size=2, max_model_len=512) as llm:
        results = llm.generate(["A cat as JSON: "] * 3, schema, max_tokens=16, seed=5)
    for r in results:  # reading the records compared the two ranks' decisions
        assert r.stats["tokens"] == len(r.token_ids) and r.text.startswith('{"name": "')
