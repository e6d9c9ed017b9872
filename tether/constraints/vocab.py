"""A tokenizer seen from the constraint layer: each token's bytes, special tokens, EOS ids.

Token bytes come from llguidance's tokenizer (built from the Hugging Face tokenizer), which maps
both byte-level BPE (SmolLM2: 'Ġ' for a space, byte symbols) and SentencePiece with byte fallback
(Gemma 3: '▁' for a space, ``<0xNN>`` byte tokens) to the exact bytes each token stands for.
A UTF-8 character split across tokens is therefore seen byte by byte, as the model emits it.
Building the llguidance tokenizer takes about 0.4 s (SmolLM2) to 5 s (Gemma 3), so one
``TokenVocab`` is built per tokenizer and cached.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np


class TokenVocab:
    """Token-level facts about one tokenizer, shared by every constraint compiled for it.

    Attributes:
        hf: the Hugging Face tokenizer.
        ll: the llguidance ``LLTokenizer`` built from it.
        size: number of token ids the tokenizer defines (the model's logits may be wider; ids
            at or past ``size`` are never allowed).
        token_bytes: ``token_bytes[i]`` is the bytes of token ``i``; ``None`` for special tokens.
        eos_token_ids: ids that end generation (tokenizer EOS plus the model's generation config).
        special: boolean array, True for special (control) tokens.
    """

    def __init__(self, hf_tokenizer: Any, eos_token_ids: set[int] | None = None):
        import llguidance.hf

        self.hf = hf_tokenizer
        eos = set(eos_token_ids or ())
        if hf_tokenizer.eos_token_id is not None:
            eos.add(int(hf_tokenizer.eos_token_id))
        if not eos:
            raise ValueError("the tokenizer defines no EOS token; pass eos_token_ids")
        self.eos_token_ids = frozenset(eos)
        self.ll = llguidance.hf.from_tokenizer(hf_tokenizer, eos_token=sorted(eos))
        self.size = self.ll.vocab_size
        self.special = np.array([self.ll.is_special_token(i) for i in range(self.size)])
        self.token_bytes: list[bytes | None] = [
            None if self.special[i] else self.ll.decode_bytes([i]) for i in range(self.size)
        ]
        self.name = getattr(hf_tokenizer, "name_or_path", "") or f"tokenizer@{id(hf_tokenizer)}"

    def __repr__(self) -> str:
        return f"TokenVocab({self.name!r}, size={self.size}, eos={sorted(self.eos_token_ids)})"

    def decode(self, token_ids) -> str:
        """The text of a token sequence (special tokens dropped, bad UTF-8 replaced)."""
        data = b"".join(self.token_bytes[t] or b"" for t in token_ids if 0 <= t < self.size)
        return data.decode("utf-8", errors="replace")


_CACHE: dict[Any, TokenVocab] = {}
_LOCK = threading.Lock()


def _generation_eos(model_dir: str) -> set[int]:
    path = Path(model_dir) / "generation_config.json"
    if not path.exists():
        return set()
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list) else [eos])}


def vocab_for(tokenizer: Any) -> TokenVocab:
    """The (cached) ``TokenVocab`` of an HF tokenizer, a model name/directory, or a vocab."""
    if isinstance(tokenizer, TokenVocab):
        return tokenizer
    if isinstance(tokenizer, (str, Path)):
        from tether.models import resolve

        path = resolve(str(tokenizer))
        key = ("path", path)
        with _LOCK:
            if key not in _CACHE:
                from transformers import AutoTokenizer

                hf = AutoTokenizer.from_pretrained(path)
                _CACHE[key] = TokenVocab(hf, _generation_eos(path))
            return _CACHE[key]
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise TypeError(
            f"expected a Hugging Face fast tokenizer or a model name, got {type(tokenizer).__name__}")
    key = ("object", id(tokenizer))
    with _LOCK:
        cached = _CACHE.get(key)
        if cached is None or cached.hf is not tokenizer:
            path = getattr(tokenizer, "name_or_path", "")
            eos = _generation_eos(path) if path and Path(path).is_dir() else set()
            cached = _CACHE[key] = TokenVocab(tokenizer, eos)
        return cached
