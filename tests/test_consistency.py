"""Checkers against independent answers.

* JSON Schemas: llguidance's full mask (``compute_bitmask``) agrees with its token-by-token
  checks (``validate_tokens``) on random walks. The bounded-cost AWRS mode mixes both (checks
  first, the mask to finish a step), so any disagreement would bias the weights.
* Non-regular patterns: partial matching agrees, on every viable prefix and every token over a
  small alphabet, with an oracle that enumerates the pattern's whole (finite) language with
  plain full matches; and the comparison catches planted bugs.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import regex

from conftest import fixture
from tether import Constraint, Regex


def random_walk_states(constraint, rng, steps=20):
    state = constraint.start()
    for _ in range(steps):
        yield state
        allowed = np.nonzero(constraint.mask(state))[0]
        allowed = [t for t in allowed if t not in constraint.eos_token_ids]
        if not allowed:
            return
        state = constraint.advance(state, int(rng.choice(allowed)))


SCHEMAS = sorted(fixture("jsonschemabench", "Github_easy").glob("*.json"))[:6]


@pytest.mark.parametrize("path", SCHEMAS, ids=[p.stem for p in SCHEMAS])
def test_json_mask_matches_checks(vocab, path):
    c = Constraint.from_spec(json.loads(path.read_text()), vocab)
    rng = np.random.default_rng(0)
    sample = rng.choice(vocab.size, size=3000, replace=False)  # all ids would take minutes
    for state in random_walk_states(c, rng):
        mask = c.mask(state)
        checks = np.array([c.allows(state, int(t)) for t in sample])
        assert (mask[sample] == checks).all()
        for t in np.nonzero(mask)[0][:50]:  # every allowed token, sampled ones aside
            assert c.allows(state, int(t))


# Non-regular patterns whose languages over {a, b, c} are finite (at most MAX_LEN characters),
# so that enumerating every string gives the exact set of viable prefixes: an independent
# oracle for partial matching (which decides viability without enumerating anything).
ALPHABET, MAX_LEN = "abc", 6
EXACT_PATTERNS = [
    r"^([ab])([ab])c\2\1$",            # backreferences: a 5-letter palindrome around c
    r"^(a|b)\1{1,3}c$",                # a backreference under a counted repeat
    r"^(?:(a)|b)(?(1)cc|ca)$",         # a conditional on a group
    r"^(?>a{1,2})ab$",                 # an atomic group: "aab" matches, "ab" does not
    r"^(?|(ab)|(ba))c\1$",             # a branch reset
]
# Lookarounds: partial matching cannot always tell that a lookaround has already failed when
# the text ends inside it, so it may allow a prefix no match extends (the module docstring of
# constraints.prefix); it must never refuse a viable one, and EOS still needs a full match.
OVER_APPROXIMATED = [
    r"^(?=[ab]*c)[abc]{2,4}$",         # a lookahead that must find a c
    r"^([abc])(?!\1)([abc])\2$",       # a negative lookahead on a backreference
]
ORACLE_PATTERNS = EXACT_PATTERNS + OVER_APPROXIMATED


def _oracle(pattern: str) -> tuple[set[str], set[str]]:
    """(full matches, viable prefixes) over ALPHABET up to MAX_LEN, by enumeration."""
    compiled = regex.compile(pattern)
    matches = {"".join(s) for n in range(MAX_LEN + 1)
               for s in itertools.product(ALPHABET, repeat=n)
               if compiled.fullmatch("".join(s))}
    return matches, {m[:i] for m in matches for i in range(len(m) + 1)}


def _alphabet_tokens(vocab) -> dict[int, str]:
    """Every token spelling a non-empty string over ALPHABET, at most 3 characters."""
    out = {}
    for t, data in enumerate(vocab.token_bytes):
        if data and len(data) <= 3 and set(data.decode("latin-1")) <= set(ALPHABET):
            out[t] = data.decode()
    return out


def check_against_oracle(constraint, vocab, pattern: str, exact: bool = True) -> int:
    """Compare allows/is_complete on every viable prefix with the oracle (``exact=False``:
    allowing more than the oracle is tolerated); returns the number of decisions compared."""
    matches, viable = _oracle(pattern)
    assert matches, pattern
    tokens = _alphabet_tokens(vocab)
    eos = min(constraint.eos_token_ids)
    compared = 0
    for prefix in sorted(viable):
        state = prefix.encode()
        assert constraint.is_complete(state) == (prefix in matches), (pattern, prefix)
        assert constraint.allows(state, eos) == (prefix in matches), (pattern, prefix)
        for token, text in tokens.items():
            expected, allowed = prefix + text in viable, constraint.allows(state, token)
            assert allowed == expected or (allowed and not exact), (pattern, prefix, text)
            compared += 1
    return compared


@pytest.mark.parametrize("pattern", ORACLE_PATTERNS)
def test_partial_matching_agrees_with_enumeration(smollm2_vocab, pattern):
    c = Constraint.from_spec(Regex(pattern), smollm2_vocab)
    assert c.engine == "regex-partial"
    assert check_against_oracle(c, smollm2_vocab, pattern,
                                exact=pattern in EXACT_PATTERNS) > 50


class _PlantedBugs:
    """Plausible mistakes in a partial-matching checker; the oracle must catch each."""

    @staticmethod
    def first_character_only(self, text):  # judges the start, not what the token added
        return self.pattern.fullmatch(text[:1], partial=True) is not None

    @staticmethod
    def full_instead_of_partial(self, text):  # forgets that the text may continue
        return self.pattern.fullmatch(text) is not None

    @staticmethod
    def last_character_ignored(self, text):  # an off-by-one in the prefix it judges
        return self.pattern.fullmatch(text[:-1], partial=True) is not None


@pytest.mark.parametrize("bug", ["first_character_only", "full_instead_of_partial",
                                 "last_character_ignored"])
def test_the_oracle_catches_planted_bugs(smollm2_vocab, monkeypatch, bug):
    from tether.constraints.prefix import PartialRegexConstraint

    monkeypatch.setattr(PartialRegexConstraint, "prefix_ok", getattr(_PlantedBugs, bug))
    caught = 0
    for pattern in EXACT_PATTERNS:
        c = PartialRegexConstraint(Constraint.from_spec(Regex(pattern), smollm2_vocab).spec,
                                   smollm2_vocab, regex.compile(pattern))
        try:
            check_against_oracle(c, smollm2_vocab, pattern)
        except AssertionError:
            caught += 1
    assert caught == len(EXACT_PATTERNS), (bug, caught)
