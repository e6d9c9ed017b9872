"""Lark grammars through llguidance, cross-checked with the lark parser itself."""

from __future__ import annotations

import lark
import pytest

from conftest import encode, walk
from tether import Choice, Constraint, Grammar

ARITHMETIC = r"""
?start: expr
?expr: term (("+" | "-") term)*
?term: factor (("*" | "/") factor)*
?factor: NUMBER | "(" expr ")" | "-" factor
%import common.NUMBER
%import common.WS
%ignore WS
"""

SQL = r"""
start: "SELECT " columns " FROM " NAME where?
columns: "*" | NAME (", " NAME)*
where: " WHERE " NAME " " OP " " value
OP: "=" | "<" | ">"
value: NUMBER | "'" /[a-z]+/ "'"
NAME: /[a-z_][a-z0-9_]*/
%import common.NUMBER
"""

VALID_ARITH = ["1+2*(3-4)", "-(7)", "12 / 3 - 0.5", "((1))", "2*-3"]
INVALID_ARITH = [("1+*2", 2), ("(1+2", None), ("1)", 1), ("3 4", 2), ("1+a", 2)]
VALID_SQL = ["SELECT * FROM users", "SELECT id, name FROM t WHERE age > 30",
             "SELECT a FROM b WHERE c = 'x'"]
INVALID_SQL = [("SELECT FROM users", 7), ("SELECT * FROM users WHERE", None),
               ("SELECT * FROM 1x", 14)]


@pytest.mark.parametrize("grammar,sentence", [(ARITHMETIC, s) for s in VALID_ARITH]
                         + [(SQL, s) for s in VALID_SQL])
def test_valid_sentences_are_accepted(vocab, grammar, sentence):
    lark.Lark(grammar).parse(sentence)  # the reference parser agrees it is valid
    c = Constraint.from_spec(Grammar(grammar), vocab)
    refused, state = walk(c, encode(vocab, sentence))
    assert refused is None and c.is_complete(state)


@pytest.mark.parametrize("grammar,sentence,fail_at", [(ARITHMETIC, *s) for s in INVALID_ARITH]
                         + [(SQL, *s) for s in INVALID_SQL])
def test_invalid_sentences_are_rejected(vocab, grammar, sentence, fail_at):
    with pytest.raises(lark.exceptions.LarkError):
        lark.Lark(grammar).parse(sentence)
    c = Constraint.from_spec(Grammar(grammar), vocab)
    ids = encode(vocab, sentence)
    refused, state = walk(c, ids)
    if fail_at is None:  # a valid prefix that is not a sentence
        assert refused is None and not c.is_complete(state)
    else:
        end = 0
        for i, t in enumerate(ids):  # the token that covers the first bad character
            end += len(vocab.token_bytes[t])
            if end > fail_at:
                break
        assert refused == i


def test_choice(vocab):
    c = Constraint.from_spec(Choice(["red", "green", "blue"]), vocab)
    for word in ["red", "green", "blue"]:
        refused, state = walk(c, encode(vocab, word))
        assert refused is None and c.is_complete(state)
    refused, _ = walk(c, encode(vocab, "yellow"))
    assert refused == 0


def test_enumeration_ends_with_every_eos_token(smollm2_vocab):
    """A tokenizer with several EOS tokens: each complete text is enumerated once per EOS token,
    since the sampler may end an output with any of them (``Constraint.eos_token_ids``)."""
    from tether.constraints import TokenVocab
    from tether.constraints.base import enumerate_outputs

    vocab = TokenVocab(smollm2_vocab.hf, {0, 2})  # <|endoftext|> and <|im_end|>
    c = Constraint.from_spec(Choice(["ab", "b"]), vocab)
    assert c.eos_token_ids == {0, 2}
    outputs = enumerate_outputs(c, max_tokens=4)
    assert {o[-1] for o in outputs} == {0, 2}
    by_text = {}
    for o in outputs:
        assert all(t not in (0, 2) for t in o[:-1])
        by_text.setdefault(vocab.decode(o), set()).add(o[-1])
    assert by_text == {"ab": {0, 2}, "b": {0, 2}}
