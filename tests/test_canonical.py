"""tether.Canonical: outputs spelled with the tokenizer's own encodings (``constraints.canonical``).

On the real tokenizers: the filter accepts exactly the tokenizer's own encodings among
every tokenization of small languages, it refuses dead ends (every token it allows continues to
an accepted output), the tokenizer's encoding of a free JSON document passes it token by token
while a split token does not, and a large filtered mask obeys the constraint's time budget. On the engine:
SMC over canonical tokenizations matches the exactly enumerated target.
"""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest

from tether import Canonical, Choice, ConstraintError, Regex
from tether.constraints import Spec, budget, compile_constraint, normalize
from tether.constraints.base import enumerate_outputs

COLOURS = ["red", "reddish", "green", "greenish", "blue", "bluish"]
ANIMALS = {"type": "object", "properties": {"animal": {"enum": ["cat", "cattle", "caterpillar",
                                                                  "dog", "dolphin", "hamster"]}},
           "required": ["animal"], "additionalProperties": False}
SPECS = [Choice(COLOURS), Regex("[ab]{2,4}"), ANIMALS]


def own_encoding(vocab, sequence, stops) -> bool:
    body = [t for t in sequence if t not in stops]
    return vocab.hf.encode(vocab.decode(body), add_special_tokens=False) == body


@pytest.mark.parametrize("spec", SPECS, ids=["choice", "regex", "enum"])
def test_accepts_exactly_the_tokenizers_own_encodings(vocab, spec):
    """On both tokenizers: byte-level BPE (SmolLM2), SentencePiece-style BPE (Gemma 3)."""
    plain = compile_constraint(spec, vocab)
    canonical = compile_constraint(Canonical(spec), vocab)
    every = enumerate_outputs(plain, 20)
    accepted = enumerate_outputs(canonical, 20)
    own = [s for s in every if own_encoding(vocab, s, plain.eos_token_ids)]
    assert len(every) > len(accepted)  # the language has other spellings to refuse
    assert sorted(map(tuple, accepted)) == sorted(map(tuple, own))


@pytest.mark.parametrize("spec", SPECS, ids=["choice", "regex", "enum"])
def test_no_dead_ends(smollm2_vocab, spec):
    """Every token the mask allows continues to an accepted output: the allowed tokens after
    each prefix are exactly its children in the trie of accepted sequences."""
    c = compile_constraint(Canonical(spec), smollm2_vocab)
    children = collections.defaultdict(set)
    for s in enumerate_outputs(c, 20):
        for i in range(len(s)):
            children[tuple(s[:i])].add(s[i])
    for prefix, kids in children.items():
        state = c.start()
        for t in prefix:
            state = c.advance(state, t)
        assert set(np.flatnonzero(c.mask(state)).tolist()) == kids
        assert all(c.allows(state, t) for t in kids)


def test_json_follows_the_tokenizer(smollm2_vocab):
    """The tokenizer's encoding of a JSON document passes token by token (free text in the
    string is unfiltered; the key, the enum value and the number are filtered); the enum value
    spelled in other pieces is refused, though the spec alone allows it."""
    schema = {"type": "object", "properties": {
        "colour": {"enum": COLOURS}, "note": {"type": "string"}, "count": {"type": "integer"}},
        "required": ["colour", "note", "count"], "additionalProperties": False}
    c = compile_constraint(Canonical(schema), smollm2_vocab)
    plain = compile_constraint(schema, smollm2_vocab)
    text = '{"colour": "reddish", "note": "Tokenizers: naïve café, 12 cats.", "count": 1234}'
    ids = smollm2_vocab.hf.encode(text, add_special_tokens=False)
    state = c.start()
    for t in ids:
        assert c.allows(state, t), smollm2_vocab.decode([t])
        state = c.advance(state, t)
    assert c.is_complete(state) and c.text(state) == text

    def first_refusal(constraint, tokens):
        state = constraint.start()
        for i, t in enumerate(tokens):
            if not constraint.allows(state, t):
                return i
            state = constraint.advance(state, t)
        return None

    red = smollm2_vocab.hf.encode("red", add_special_tokens=False)
    assert len(red) == 1
    split = [smollm2_vocab.hf.encode(p, add_special_tokens=False) for p in ("re", "d")]
    spelled = ids[:ids.index(red[0])] + split[0] + split[1] + ids[ids.index(red[0]) + 1:]
    assert first_refusal(plain, spelled) is None
    assert first_refusal(c, spelled) is not None


def test_free_text_is_unfiltered_and_pair_tests_obey_the_time_budget(smollm2_vocab):
    """Where the spec allows more than FILTER_MAX tokens, the mask is the spec's own (nothing
    encoded); a large batch of pair tests stops at the constraint's deadline."""
    from tether.constraints.canonical import FILTER_MAX

    schema = {"type": "object", "properties": {"bio": {"type": "string"}}, "required": ["bio"]}
    c = compile_constraint(Canonical(schema), smollm2_vocab)
    plain = compile_constraint(schema, smollm2_vocab)
    state, plain_state = c.start(), plain.start()
    for t in smollm2_vocab.hf.encode('{"bio": "An unusual', add_special_tokens=False):
        state, plain_state = c.advance(state, t), plain.advance(plain_state, t)
    wide = plain.mask(plain_state)
    assert wide.sum() > FILTER_MAX and np.array_equal(c.mask(state), wide)
    fresh = np.flatnonzero(wide)[-20_000:]
    with pytest.raises(budget.BudgetExceeded):
        with budget.deadline(0.001):  # 20,000 encodings: far past a millisecond
            c.bigrams.allowed(state.previous, fresh)


def test_spec_round_trip():
    spec = normalize(Canonical(Regex("[ab]+")))
    assert spec.canonical and spec != normalize(Regex("[ab]+"))
    assert Spec.from_wire(spec.to_wire()) == spec
    assert spec.describe().startswith("canonical regex")
    with pytest.raises(ConstraintError):
        normalize(Canonical(42))


@pytest.mark.engine
def test_smc_matches_the_canonical_target(llm):
    """AWRS-SMC (exact weights) on Canonical(Choice(COLOURS)), 16 runs of 32 particles, pooled:
    within 0.06 TV of pi over canonical spellings (enumerated, scored by the model), and the
    mean of exp(log Z) within 4 standard errors of the exact Z. Without the filter this problem
    loses half its particles to spellings the model almost never makes."""
    spec, prompt, runs = Canonical(Choice(COLOURS)), "Name a colour.", 16
    sequences = enumerate_outputs(llm.constraint(spec), 20)
    scores = llm.logprobs(llm.prompt_ids(prompt), sequences)
    pi = collections.defaultdict(float)
    for seq, lp in zip(sequences, scores):
        pi[llm.tokenizer.decode(seq, skip_special_tokens=True)] += math.exp(lp)
    z = sum(pi.values())
    results = llm.generate([prompt] * runs, spec, particles=32, max_tokens=20, seed=5)
    smc = collections.defaultdict(float)
    for r in results:
        assert r.stats["weights"] == "exact"
        for p in r.particles:
            if p.finish_reason == "stop":
                smc[p.text] += p.normalized_weight / runs
    tv = 0.5 * sum(abs(smc.get(k, 0.0) - pi.get(k, 0.0) / z) for k in set(smc) | set(pi))
    assert tv < 0.06, (dict(smc), {k: v / z for k, v in pi.items()})
    estimates = np.exp([r.log_z for r in results])
    se = estimates.std(ddof=1) / math.sqrt(runs)
    assert abs(estimates.mean() - z) <= 4 * se, (estimates.mean(), z, se)
