"""A constraint's full mask agrees with its token-by-token checks, on random walks.

The bounded-cost AWRS mode mixes both (checks first, the mask to finish a step), so any
disagreement would bias the weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import shared
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


SCHEMAS = sorted(shared("jsonschemabench", "Github_easy").glob("*.json"))[:6]


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


def test_regex_partial_mask_matches_checks(smollm2_vocab):
    c = Constraint.from_spec(Regex(r"^(\w)(\w)(?:\2\1)+$"), smollm2_vocab)
    rng = np.random.default_rng(1)
    for state in random_walk_states(c, rng, steps=4):
        mask = c.mask(state)
        sample = rng.choice(smollm2_vocab.size, size=500, replace=False)
        assert (mask[sample] == np.array([c.allows(state, int(t)) for t in sample])).all()
