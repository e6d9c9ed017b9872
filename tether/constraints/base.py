"""The token-level constraint interface, and ``Constraint.from_spec``: one compiled checker per spec.

A ``Constraint`` is compiled once per (spec, tokenizer) and cached; it holds no per-sequence
state. Each particle holds a small ``state`` object instead (a grammar matcher position, or the
bytes generated so far), and the constraint answers questions about it:

    s = c.start()
    c.allows(s, token_id)  -> may this token extend the prefix?  (does not change s)
    s = c.advance(s, token_id)                                    (returns a new state)
    c.is_complete(s)       -> may the output end here (EOS allowed)?
    c.mask(s)              -> the exact set of allowed tokens, as a boolean array

EOS tokens are allowed exactly where the output is complete. Special (control) tokens other than
EOS are never allowed, except where a structural tag names them (``structural``). Token ids at
or past the tokenizer's size (padding in the model's logits) are never allowed.
"""

from __future__ import annotations

import json
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any

import numpy as np

from tether.constraints.specs import Spec, normalize
from tether.constraints.vocab import TokenVocab, vocab_for
from tether.errors import ConstraintError


class Constraint(ABC):
    """A compiled, stateless checker; see the module docstring for the protocol."""

    #: which engine checks tokens: "llguidance" or "regex-partial" or "predicate"
    engine: str = ""
    #: whether ``mask`` costs about as little as a few checks (a compiled grammar) rather than
    #: one check per vocabulary entry (text predicates)
    cheap_mask: bool = False

    def __init__(self, spec: Spec, vocab: TokenVocab):
        self.spec = spec
        self.vocab = vocab
        self.eos_token_ids = vocab.eos_token_ids

    # -- construction -------------------------------------------------------------------
    @staticmethod
    def from_spec(spec: Any, tokenizer: Any) -> "Constraint":
        """Compile ``spec`` for ``tokenizer`` (an HF tokenizer or a model name/dir), cached.

        Raises ``ConstraintError`` naming the problem if the spec is invalid.
        """
        return compile_constraint(spec, tokenizer)

    # -- the per-state protocol ------------------------------------------------------------
    @abstractmethod
    def start(self) -> Any:
        """The state of the empty output."""

    @abstractmethod
    def allows(self, state: Any, token_id: int) -> bool:
        """Whether ``token_id`` may follow the prefix in ``state``; ``state`` is unchanged."""

    @abstractmethod
    def advance(self, state: Any, token_id: int, check: bool = True) -> Any:
        """The state after appending ``token_id``; raises ``ValueError`` if it is not allowed.

        ``check=False`` skips the check for a token already known to be allowed (one this
        constraint accepted at this state): partial matching would otherwise repeat it.
        """

    @abstractmethod
    def is_complete(self, state: Any) -> bool:
        """Whether the output may end at ``state`` (an EOS token is allowed here)."""

    @abstractmethod
    def output_bytes(self, state: Any) -> bytes:
        """The bytes generated so far."""

    def mask(self, state: Any) -> np.ndarray:
        """Boolean array over the tokenizer's ids: True where ``allows(state, id)``.

        Subclasses override this with something faster than one check per token.
        """
        return np.fromiter((self.allows(state, t) for t in range(self.vocab.size)), dtype=bool,
                           count=self.vocab.size)

    # -- helpers shared by the implementations ----------------------------------------------
    def is_eos(self, token_id: int) -> bool:
        return token_id in self.eos_token_ids

    def is_plain_token(self, token_id: int) -> bool:
        """A token with bytes of its own (not special, inside the tokenizer's range)."""
        return 0 <= token_id < self.vocab.size and self.vocab.token_bytes[token_id] is not None

    def text(self, state: Any) -> str:
        return self.output_bytes(state).decode("utf-8", errors="replace")

    def parse(self, text: str) -> Any:
        """The value of a complete output: a dict/list for a JSON Schema, a model instance for a
        pydantic class, the text itself otherwise."""
        if self.spec.kind != "json_schema":
            return text
        if self.spec.model is not None:
            return self.spec.model.model_validate_json(text)
        return json.loads(text)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.describe()!r}, engine={self.engine})"


_CACHE: "OrderedDict[tuple, Constraint]" = OrderedDict()
_CACHE_SIZE = 512
_LOCK = threading.Lock()


def compile_constraint(spec: Any, tokenizer: Any) -> Constraint:
    """Normalize ``spec``, then build (or fetch from the cache) its checker for ``tokenizer``."""
    spec = normalize(spec)
    vocab = vocab_for(tokenizer)
    key = (spec, id(vocab))
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    built = _build(spec, vocab)
    with _LOCK:
        _CACHE[key] = built
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return built


def _build(spec: Spec, vocab: TokenVocab) -> Constraint:
    from tether.constraints import grammar, prefix, structural

    if spec.canonical:
        from dataclasses import replace

        from tether.constraints.canonical import CanonicalConstraint

        return CanonicalConstraint(spec, compile_constraint(replace(spec, canonical=False), vocab))

    if spec.kind == "json_schema":
        return grammar.json_schema_constraint(spec, vocab)
    if spec.kind == "grammar":
        return grammar.lark_constraint(spec, vocab)
    if spec.kind == "regex":
        compiled = prefix.compile_python_regex(spec.source)
        # Regular expressions go to llguidance; what it cannot express (backreferences,
        # lookarounds, atomic groups, recursion, conditionals, ...) to partial matching.
        checker = grammar.regex_constraint(spec, vocab, compiled)
        return checker if checker is not None else prefix.PartialRegexConstraint(spec, vocab,
                                                                                   compiled)
    if spec.kind == "structural_tag":
        return structural.structural_tag_constraint(spec, vocab)
    if spec.kind == "predicate":
        return prefix.PredicateConstraint(spec, vocab)
    raise ConstraintError(f"unknown constraint kind {spec.kind!r}")  # pragma: no cover


def enumerate_outputs(constraint: Constraint, max_tokens: int, limit: int = 100_000):
    """Every token sequence of at most ``max_tokens`` tokens (EOS included) that the constraint
    accepts, by depth-first search over its masks. For small finite languages (tests, exact
    benchmarks); raises ``ValueError`` past ``limit`` sequences.

    A sequence ends with any of the constraint's EOS tokens (``eos_token_ids``: the tokenizer's
    and the generation config's, the tokens the AWRS sampler ends an output with), so a model
    with several gives each complete text once per EOS token, as the sampler can produce it.
    """
    out: list[list[int]] = []

    def walk(state: Any, prefix: list[int]) -> None:
        if len(prefix) >= max_tokens:
            return
        for token in np.nonzero(constraint.mask(state))[0]:
            token = int(token)
            if token in constraint.eos_token_ids:
                out.append(prefix + [token])
                if len(out) > limit:
                    raise ValueError(f"more than {limit} outputs")
                continue
            walk(constraint.advance(state, token), prefix + [token])

    walk(constraint.start(), [])
    return out
