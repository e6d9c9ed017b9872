"""Constraints checked on the decoded text prefix: non-regular patterns, Python predicates.

Expressions that are not regular (backreferences, lookarounds, atomic groups, possessive
quantifiers, recursion, conditionals) cannot be compiled into an automaton. Python's ``regex``
module decides instead, by partial matching, whether a string is a prefix of some full match:
``pattern.fullmatch(text, partial=True)``. A state is just the bytes generated so far.

Partial matching is exact for backreferences, atomic groups, possessive quantifiers, recursion,
conditionals and branch resets (``tests/test_consistency.py`` checks it against an oracle that
enumerates whole languages). With lookarounds it over-approximates: when the text ends inside
a lookaround, ``regex`` cannot always tell that it has already failed
(``^(?!.*(.).*\1)[a-z]+$`` on "abca"; ``^(?=[ab]*c)[abc]{2,4}$`` on "aaba"), so such a prefix
is allowed; it never refuses a viable prefix, and EOS still requires a full match, so no
invalid output is ever complete.

Partial matching can backtrack for an exponential time on nested quantifiers
(``^((a|aa)+)+b$``). Each match gets the time left in the decoding step's budget
(``budget.remaining()``), at most ``MATCH_LIMIT_S``; running out raises ``BudgetExceeded``,
which ends the particle with the reason ``budget``. It never turns into a rejection, so
acceptance does not depend on the clock.

Tokens map to bytes, not characters: a token may end inside a multi-byte UTF-8 character. The
text before that character must be extendable, and so must the text followed by one of the
characters those bytes can still become: all of them when there are at most 64 (two-byte
characters, or longer ones with all but the last byte known), else 64 spread over the range
plus every non-ASCII character the pattern names. That last case may refuse a token that some
other rare character would have made valid (tokenizers spell common characters with whole
tokens). The character is judged exactly when its last byte arrives.
"""

from __future__ import annotations

import codecs
import functools
from typing import Any, Callable

import regex

from tether.constraints import budget
from tether.constraints.base import Constraint
from tether.constraints.specs import Spec
from tether.constraints.vocab import TokenVocab
from tether.errors import ConstraintError

# One partial match takes microseconds to a millisecond on ordinary patterns and outputs;
# one that runs past this is backtracking exponentially, and would again at the next check.
MATCH_LIMIT_S = 0.05


def compile_python_regex(pattern: str) -> Any:
    try:
        return regex.compile(pattern)
    except (RecursionError, OverflowError):
        raise ConstraintError("the regular expression is nested too deeply to compile") from None
    except regex.error as e:
        pos = e.pos if e.pos is not None else 0
        raise ConstraintError(
            f"invalid regular expression at position {pos}: {e.msg}\n  {pattern}\n  {' ' * pos}^"
        ) from None


def split_utf8(data: bytes) -> tuple[str, bytes] | None:
    """Decode ``data`` up to a dangling partial character.

    Returns ``(text, tail)``, ``tail`` being the bytes of an unfinished character (possibly
    empty), or None if the bytes are not a prefix of valid UTF-8.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        text = decoder.decode(data, final=False)
    except UnicodeDecodeError:
        return None
    return text, decoder.getstate()[0]


TAIL_PROBES = 64


def completions(tail: bytes, extra: tuple[str, ...] = ()) -> list[str]:
    """Characters whose UTF-8 encoding starts with ``tail`` (an unfinished character):
    all of them when there are at most ``TAIL_PROBES``, else that many, evenly spread, plus
    those of ``extra`` (characters the spec names) that fit."""
    lead = tail[0]
    length = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    missing = length - len(tail)
    bounds = []
    for fill in (b"\x80", b"\xbf"):
        try:
            bounds.append(ord((tail + fill * missing).decode("utf-8")))
        except UnicodeDecodeError:  # overlong or surrogate corners: scan from the other end
            bounds.append(None)
    lo = bounds[0] if bounds[0] is not None else bounds[1]
    hi = bounds[1] if bounds[1] is not None else bounds[0]
    if lo is None:
        return []
    count = hi - lo + 1
    step = max(1, count // TAIL_PROBES)
    points = range(lo, hi + 1, step) if count > TAIL_PROBES else range(lo, hi + 1)
    out = [ch for ch in extra if ch.encode("utf-8", errors="ignore").startswith(tail)]
    for cp in points:
        ch = chr(cp)
        try:
            if ch.encode("utf-8").startswith(tail):
                out.append(ch)
        except UnicodeEncodeError:  # a surrogate
            continue
    return out


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
        split = split_utf8(state + self.vocab.token_bytes[token_id])
        if split is None or not self.prefix_ok(split[0]):
            return False
        return not split[1] or self._tail_ok(*split)

    @functools.lru_cache(maxsize=4096)
    def _tail_ok(self, text: str, tail: bytes) -> bool:
        """Whether some character that ``tail`` can still become keeps ``text`` extendable."""
        return any(self.prefix_ok(text + ch) for ch in completions(tail, self.probe_chars))

    #: characters the spec names, always among the probes for an unfinished character
    probe_chars: tuple[str, ...] = ()

    def advance(self, state: bytes, token_id: int, check: bool = True) -> bytes:
        if check and not self.allows(state, token_id):
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
        self.probe_chars = _named_characters(spec.source)

    def prefix_ok(self, text: str) -> bool:
        return self._match(text, partial=True)

    def complete_ok(self, text: str) -> bool:
        return self._match(text, partial=False)

    def _match(self, text: str, partial: bool) -> bool:
        # A pathological pattern (nested quantifiers) can backtrack for ages: the match gets
        # the time left in the step's budget, at most MATCH_LIMIT_S, and running out ends the
        # particle (``BudgetExceeded``) instead of deciding the token.
        left = budget.remaining()
        timeout = MATCH_LIMIT_S if left is None else min(left, MATCH_LIMIT_S)
        try:
            return self.pattern.fullmatch(text, partial=partial, timeout=timeout) is not None
        except TimeoutError:
            raise budget.BudgetExceeded(
                f"partial matching of the pattern took longer than {timeout:.3g} s "
                f"(at output length {len(text)}): the pattern backtracks too much") from None


class PredicateConstraint(TextPrefixConstraint):
    engine = "predicate"

    def __init__(self, spec: Spec, vocab: TokenVocab):
        super().__init__(spec, vocab)
        pred = spec.predicate
        self._prefix: Callable[[str], bool] = pred.prefix
        self._complete: Callable[[str], bool] = pred.complete or pred.prefix

    def prefix_ok(self, text: str) -> bool:
        ok = bool(self._prefix(text))
        budget.check()  # a Python predicate cannot be interrupted; it is judged after the call
        return ok

    def complete_ok(self, text: str) -> bool:
        ok = bool(self._complete(text))
        budget.check()
        return ok


def _named_characters(pattern: str) -> tuple[str, ...]:
    r"""Non-ASCII characters a pattern spells literally or by escape (\xNN, \uNNNN, \UNNNNNNNN,
    \x{N...}): likely targets when a token stops inside a multi-byte character."""
    found = {ch for ch in pattern if ord(ch) > 127}
    for m in regex.finditer(r"\\(?:x\{([0-9a-fA-F]+)\}|x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})"
                            r"|U([0-9a-fA-F]{8}))", pattern):
        code = int(next(g for g in m.groups() if g), 16)
        if 127 < code < 0x110000 and not 0xD800 <= code < 0xE000:
            found.add(chr(code))
    return tuple(sorted(found))
