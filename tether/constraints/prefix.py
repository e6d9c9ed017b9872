"""Constraints checked on the decoded text prefix: non-regular patterns, Python predicates.

Expressions that are not regular (backreferences, lookarounds, atomic groups, possessive
quantifiers, recursion, conditionals) cannot be compiled into an automaton. Python's ``regex``
module decides instead, by partial matching, whether a string is a prefix of some full match:
``pattern.fullmatch(text, partial=True)``. A state is just the bytes generated so far.

Partial matching is exact for backreferences, atomic groups, possessive quantifiers, recursion
and conditionals. For some negative lookarounds it over-approximates: ``regex`` cannot always
tell that a lookaround has already failed (``^(?!.*(.).*\1)[a-z]+$`` on "abca"), so such a
prefix is allowed; EOS still requires a full match, so no invalid output is ever complete.

Tokens map to bytes, not characters: a token may end inside a multi-byte UTF-8 character. The
check then runs on the text before that character, and the dangling bytes must be a valid UTF-8
prefix; the character is judged when its last byte arrives.
"""

from __future__ import annotations

import codecs
from typing import Any, Callable

import regex

from tether.constraints.base import Constraint
from tether.constraints.specs import Spec
from tether.constraints.vocab import TokenVocab
from tether.errors import ConstraintError

# A pathological pattern must not hang a decoding step: a partial match that takes longer than
# this counts as "no match" for the token at hand (the token is rejected).
MATCH_TIMEOUT_S = 1.0


def compile_python_regex(pattern: str) -> Any:
    try:
        return regex.compile(pattern)
    except regex.error as e:
        pos = e.pos if e.pos is not None else 0
        raise ConstraintError(
            f"invalid regular expression at position {pos}: {e.msg}\n  {pattern}\n  {' ' * pos}^"
        ) from None


def split_utf8(data: bytes) -> tuple[str, bool]:
    """Decode ``data`` up to any dangling partial character.

    Returns ``(text, ok)``: ``ok`` is False if the bytes are not a prefix of valid UTF-8.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        return decoder.decode(data, final=False), True
    except UnicodeDecodeError:
        return "", False


class TextPrefixConstraint(Constraint):
    """Base for checkers that judge the decoded prefix with ``prefix_ok`` / ``complete_ok``."""

    def prefix_ok(self, text: str) -> bool:
        raise NotImplementedError

    def complete_ok(self, text: str) -> bool:
        raise NotImplementedError

    def start(self) -> bytes:
        return b""

    def allows(self, state: bytes, token_id: int) -> bool:
        if token_id in self.eos_token_ids:
            return self.is_complete(state)
        if not self.is_plain_token(token_id):
            return False
        text, ok = split_utf8(state + self.vocab.token_bytes[token_id])
        return ok and self.prefix_ok(text)

    def advance(self, state: bytes, token_id: int) -> bytes:
        if not self.allows(state, token_id):
            raise ValueError(f"token {token_id} is not allowed here")
        if token_id in self.eos_token_ids:
            return state
        return state + self.vocab.token_bytes[token_id]

    def is_complete(self, state: bytes) -> bool:
        try:
            text = state.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return self.complete_ok(text)

    def output_bytes(self, state: bytes) -> bytes:
        return state


class PartialRegexConstraint(TextPrefixConstraint):
    engine = "regex-partial"

    def __init__(self, spec: Spec, vocab: TokenVocab, compiled: Any):
        super().__init__(spec, vocab)
        self.pattern = compiled

    def prefix_ok(self, text: str) -> bool:
        try:
            return self.pattern.fullmatch(text, partial=True, timeout=MATCH_TIMEOUT_S) is not None
        except TimeoutError:
            return False

    def complete_ok(self, text: str) -> bool:
        try:
            return self.pattern.fullmatch(text, timeout=MATCH_TIMEOUT_S) is not None
        except TimeoutError:
            return False


class PredicateConstraint(TextPrefixConstraint):
    engine = "predicate"

    def __init__(self, spec: Spec, vocab: TokenVocab):
        super().__init__(spec, vocab)
        pred = spec.predicate
        self._prefix: Callable[[str], bool] = pred.prefix
        self._complete: Callable[[str], bool] = pred.complete or pred.prefix

    def prefix_ok(self, text: str) -> bool:
        return bool(self._prefix(text))

    def complete_ok(self, text: str) -> bool:
        return bool(self._complete(text))

