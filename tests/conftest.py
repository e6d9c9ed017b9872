"""Shared fixtures: real tokenizers, the real engine (one per test session), data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# The engine runs in-process so that its processor and our test share the same Python state.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"missing shared test data: {path}")
    return path


@pytest.fixture(scope="session", params=["smollm2", "gemma3"])
def vocab(request):
    """Each real tokenizer: byte-level BPE (SmolLM2) and SentencePiece with byte fallback."""
    from tether import vocab_for

    return vocab_for(request.param)


@pytest.fixture(scope="session")
def smollm2_vocab():
    from tether import vocab_for

    return vocab_for("smollm2")


@pytest.fixture(scope="session")
def llm():
    """One real vLLM engine on the embedded SmolLM2-135M-Instruct for the whole session."""
    from tether.decode.llm import LLM

    engine = LLM("smollm2", max_model_len=2048)
    yield engine
    engine.close()


def walk(constraint, token_ids):
    """Feed tokens one by one; return (index of the first refused token or None, final state)."""
    state = constraint.start()
    for i, t in enumerate(token_ids):
        if not constraint.allows(state, t):
            return i, state
        state = constraint.advance(state, t)
    return None, state


def encode(vocab, text: str) -> list[int]:
    return list(vocab.hf.encode(text, add_special_tokens=False))


def token_at_byte(vocab, token_ids, byte_pos: int) -> int:
    """Index of the token whose bytes cover ``byte_pos`` of the concatenated output."""
    end = 0
    for i, t in enumerate(token_ids):
        end += len(vocab.token_bytes[t])
        if end > byte_pos:
            return i
    raise ValueError("byte position past the end")
