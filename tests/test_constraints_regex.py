"""Regular expressions from the AWRS paper's pattern set (fixture: tests/data/patterns), checked on
both real tokenizers: regular ones through llguidance, the rest (backreferences, lookarounds,
atomic groups, recursion, conditionals, branch resets) through partial matching with ``regex``.

Each case: a string that matches (allowed token by token, complete at the end) and a string
that stops being extendable to a match at a known character (hand-derived), where the token
covering that character must be the first one refused.

Known limit, tested below: the ``regex`` module's partial matching cannot always tell that a
negative lookaround already failed (``^(?!.*(.).*\1)...`` on "abca"), so such a prefix is
allowed; the output is still refused at the end, where EOS needs a full match.
"""

from __future__ import annotations

import csv

import pytest
import regex

from conftest import encode, fixture, token_at_byte, walk
from tether import Constraint, Regex

# (pattern, matching string, bad string, index of the first character that cannot be extended)
CASES = [
    (r"^(\w)(\w)(?:\2\1)+$", "abbaba", "abbaab", 4),
    (r"(?<year>\d{4})(?<month>\d{2})(?<day>\d{2})", "20240131", "2024x1", 4),
    (r"^((\w)\2*)+$", "aabbbc", "aa b", 2),
    (r"(?>one|two|three)", "three", "tx", 1),
    (r"(?<!\d{4}-)(?:\d{4}-){3}(?!\d{4}-)", "1234-5678-9012-", "1234-56a8", 7),
    (r"^(?<first>\w)(?<second>\w)(?&first)(?&second)$", "abcd", "abc-", 3),
    (r"(\d{3})?(?(1)abc\1|xyz)", "123abc123", "123abd", 5),
    (r"^(?<x>a|b(?&x)?)$", "bba", "bbc", 2),
    (r"^[a-z]++\d*+$", "abc123", "abc1d", 4),
    (r"(?>foo|foobar)baz", "foobaz", "foobarbaz", 5),
    (r"^(?:a|(?(?=b)b|c))+$", "abca", "abd", 2),
    (r"(?<!a)b(?!c)", "b", "bc", 1),
    (r"(\w)(\w)(\w)\3\2\1", "abccba", "abccbb", 5),
    (r"^(abc|(def)|(ghi))(?(2)\2|\1)$", "defdef", "defabc", 3),
    (r"(\w)(\1\w)\2", "aabab", "ab", 1),
    (r"^(\w{3})-\1-\1$", "abc-abc-abc", "abc-abd", 6),
    (r"^(?|(abc)|(def)|(ghi))\1$", "ghighi", "ghigha", 5),
    (r"^([01]?[0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9])?$", "23:59:01", "24:00", 1),
    (r"^-?\d+(?:\.\d+)?$", "-12.5", "-12.x", 4),
    (r"^((?:19|20)\d\d)[- /.](0[1-9]|1[012])[- /.](0[1-9]|[12][0-9]|3[01])$",
     "2024-02-29", "2024-13", 6),
]


def test_cases_come_from_the_papers_pattern_set():
    with open(fixture("patterns", "patterns.csv"), newline="") as fh:
        patterns = {row["regex"] for row in csv.DictReader(fh)}
    missing = [p for p, *_ in CASES if p not in patterns]
    assert not missing, missing
    engines = {Constraint.from_spec(Regex(p), "smollm2").engine for p, *_ in CASES}
    assert engines == {"llguidance", "regex-partial"}


@pytest.mark.parametrize("pattern,good,bad,fail_at", CASES, ids=[c[0][:24] for c in CASES])
def test_pattern(vocab, pattern, good, bad, fail_at):
    assert regex.fullmatch(pattern, good), "the case itself is wrong"
    c = Constraint.from_spec(Regex(pattern), vocab)

    refused, state = walk(c, encode(vocab, good))
    assert refused is None and c.is_complete(state)
    assert c.allows(state, min(c.eos_token_ids))

    ids = encode(vocab, bad)
    refused, state = walk(c, ids)
    assert refused == token_at_byte(vocab, ids, fail_at)


def test_lookahead_limit_is_caught_at_the_end(smollm2_vocab):
    vocab = smollm2_vocab
    c = Constraint.from_spec(Regex(r"^(?!.*(.).*\1)[a-zA-Z]+$"), vocab)
    refused, state = walk(c, encode(vocab, "abca"))
    assert refused is None  # over-approximated by partial matching
    assert not c.is_complete(state) and not c.allows(state, min(c.eos_token_ids))


def test_incomplete_prefix_is_not_complete(vocab):
    c = Constraint.from_spec(Regex(r"^(\w{3})-\1$"), vocab)
    refused, state = walk(c, encode(vocab, "abc-ab"))
    assert refused is None and not c.is_complete(state)
    assert not c.allows(state, min(c.eos_token_ids))


def test_utf8_character_split_across_tokens(vocab):
    # '☃' is 3 bytes; whatever the tokenizer does, the check must see whole characters.
    c = Constraint.from_spec(Regex(r"(☃)(x)\1\2"), vocab)
    refused, state = walk(c, encode(vocab, "☃x☃x"))
    assert refused is None and c.is_complete(state)
    ids = encode(vocab, "☃x☄")  # same first two bytes as ☃, different last byte
    refused, _ = walk(c, ids)
    assert refused == token_at_byte(vocab, ids, len("☃x☄".encode()) - 1)


def test_predicate_constraint(vocab):
    c = Constraint.from_spec(tether_predicate(), vocab)
    refused, state = walk(c, encode(vocab, "aaa"))
    assert refused is None and not c.is_complete(state)
    refused, state = walk(c, encode(vocab, "aaaa"))
    assert refused is None and c.is_complete(state)
    refused, _ = walk(c, encode(vocab, "aab"))
    assert refused is not None


def tether_predicate():
    from tether import Predicate

    return Predicate(lambda text: set(text) <= {"a"}, complete=lambda text: text == "aaaa")
