"""Canonical tokenization: outputs spelled with the tokenizer's own encodings.

A model is trained on its tokenizer's encodings, so of the many token sequences that spell one
string it puts nearly all its mass on one (Vieira et al., 2025). A sampler that restricts the
model token by token does not know that: for ``Choice(["red", "blue"])`` the first step allows
"r", "re" and "red", and a locally normalized proposal gives "r" the mass of every output that
starts with r, though the model almost never spells "red" as "r" + "ed". In
``bench/smc_fidelity.py`` (colours) such spellings take 54% of AWRS's proposal and 0.05% of the
target: importance weights put those particles right, but they are spent.

``Canonical(spec)`` filters the tokens the spec allows at every step where the spec
constrains the spelling: where it allows at most ``FILTER_MAX`` tokens (choices, enums, keys,
punctuation between values, short patterns). There a token t is kept when, with the previous
token a, text(a) + text(t) is encoded as [a, t] by the tokenizer (``Bigrams``), or, where no
previous token was chosen by the filter (the first token, or one after an unfiltered step),
when text(t) alone is encoded as [t]. Where the spec allows more tokens (free text in a JSON
string), the proposal is close to the model itself, which spells canonically on its own;
testing every allowed token there would cost tens of thousands of encodings per step, so those
steps are left unfiltered, and the token after them is not tested against them (a pair
across that boundary could leave no allowed continuation). Specs without a cheap mask
(partial matching, predicates) are filtered at every step, on the tokens they check. For
BPE, canonicality of a whole sequence comes down to its pairs (Vieira et al., 2025); a
pre-tokenizer can make it depend on wider context, so the filter approximates canonicality,
and the target is exactly the model restricted to what the filter accepts:

    pi(y) proportional to p(y | prompt) * [spec accepts y] * [y passes the filter].

Enumerating it (``base.enumerate_outputs`` on the canonical constraint) gives that target
exactly: whether a step is filtered depends on the spec's state only (a count of allowed
tokens), never on timing or caches. A pair whose bytes are not valid UTF-8 cannot be encoded
as text; it is accepted.

Dead ends. After "r" (for ``Choice(["red", "blue"])``) every allowed continuation makes a
non-canonical pair: the particle would die a step later. At a filtered step a token is also
refused when no accepted output continues through it, looking up to ``LOOKAHEAD_DEPTH``
tokens ahead while the spec stays narrow (and at most ``LOOKAHEAD_VISITS`` tokens per state: a
count, so the answer never depends on the machine's speed); a filtered step is therefore
never left without a token by the step before it. Refusing a dead end changes no output's
probability under pi (no accepted output passes through it), only where the proposal spends
its particles; dead ends the lookahead cannot prove are left to die (weight 0). The lookahead
needs the spec's mask after each allowed token, so it runs only for specs with a cheap mask
(llguidance).

Cost. A pair test is one encoding (about 7 us in a batch, 20 us alone), cached per previous
token (``ROW_CACHE`` of them); a filtered step tests at most ``FILTER_MAX`` tokens in one
batch, plus the lookahead's spec masks; counting a state's allowed tokens takes the spec's own
mask.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, NamedTuple

import numpy as np

from tether.constraints import budget
from tether.constraints.base import Constraint
from tether.errors import ConstraintError

FILTER_MAX = 64  # the filter runs where the spec allows at most this many tokens
LOOKAHEAD_DEPTH = 3  # dead ends are looked for this many tokens ahead
LOOKAHEAD_VISITS = 256  # ... looking at most at this many tokens per state
ROW_CACHE = 256  # previous tokens whose pair results are kept (a row of int8 per vocab entry)
ROUND_TRIP_SAMPLE = 2000  # tokens checked to encode to themselves before the filter is used
CHUNK = 4096  # pairs encoded per batch (and per check of the time budget)
UNKNOWN, NO, YES = -1, 0, 1


class Bigrams:
    """Which tokens are their own encoding, and which adjacent pairs are, for one tokenizer."""

    def __init__(self, vocab: Any):
        self.vocab = vocab
        self._encoder = vocab.hf.backend_tokenizer
        self._first = np.full(vocab.size, UNKNOWN, dtype=np.int8)
        self._rows: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self._lock = threading.Lock()
        self._check_round_trip()

    def _texts(self, prefix: bytes, tokens: np.ndarray) -> tuple[list[str], np.ndarray]:
        """The text of ``prefix`` + each token's bytes, for the tokens where it is valid UTF-8;
        and those tokens."""
        texts, kept = [], []
        for t in tokens.tolist():
            try:
                texts.append((prefix + self.vocab.token_bytes[t]).decode("utf-8"))
            except UnicodeDecodeError:
                continue
            kept.append(t)
        return texts, np.array(kept, dtype=np.int64)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._encoder.encode_batch(texts, add_special_tokens=False)]

    def _check_round_trip(self) -> None:
        plain = np.flatnonzero([b is not None for b in self.vocab.token_bytes])
        sample = np.random.default_rng(0).choice(plain, min(ROUND_TRIP_SAMPLE, len(plain)),
                                                 replace=False)
        texts, kept = self._texts(b"", sample)
        same = sum(ids == [t] for ids, t in zip(self._encode(texts), kept.tolist()))
        if same < 0.9 * max(1, len(kept)):
            raise ConstraintError(
                f"canonical tokenization needs a tokenizer that encodes a token's text back to "
                f"that token; {self.vocab.name} does so for {same} of {len(kept)} tokens sampled")

    def _fill(self, row: np.ndarray, prefix: bytes, tokens: np.ndarray, pair_of: int | None):
        """Decide ``row[tokens]`` where unknown: YES where the text of ``prefix`` + token
        encodes to [pair_of, token] (to [token] when ``pair_of`` is None). In chunks, each
        under the constraint's time budget (``budget.check``)."""
        todo = tokens[row[tokens] == UNKNOWN]
        head = [] if pair_of is None else [pair_of]
        for start in range(0, len(todo), CHUNK):
            budget.check()
            chunk = todo[start:start + CHUNK]
            texts, kept = self._texts(prefix, chunk)
            row[chunk] = YES  # not valid UTF-8 on its own: cannot be encoded, accepted
            if len(kept):
                row[kept] = [YES if ids == head + [t] else NO
                             for ids, t in zip(self._encode(texts), kept.tolist())]

    def _row(self, previous: int) -> np.ndarray:
        row = self._rows.get(previous)
        if row is None:
            row = self._rows[previous] = np.full(self.vocab.size, UNKNOWN, dtype=np.int8)
            while len(self._rows) > ROW_CACHE:
                self._rows.popitem(last=False)
        else:
            self._rows.move_to_end(previous)
        return row

    def allowed(self, previous: int | None, tokens: np.ndarray) -> np.ndarray:
        """For each of ``tokens`` (plain tokens: not special), whether it may follow
        ``previous`` (None: it is the first token of the output)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        with self._lock:
            if previous is None:
                row, prefix = self._first, b""
            else:
                row, prefix = self._row(previous), self.vocab.token_bytes[previous]
            self._fill(row, prefix, tokens, previous)
            return row[tokens] == YES

    def any_allowed(self, previous: int, tokens: np.ndarray) -> bool:
        """Whether any of ``tokens`` may follow ``previous``: ``allowed(...).any()``, testing
        a few tokens first and stopping at the first that may."""
        tokens = np.asarray(tokens, dtype=np.int64)
        start, size = 0, 16
        while start < len(tokens):
            if self.allowed(previous, tokens[start:start + size]).any():
                return True
            start, size = start + size, size * 4
        return False


_BIGRAMS: dict[int, Bigrams] = {}
_BIGRAMS_LOCK = threading.Lock()


def bigrams_for(vocab: Any) -> Bigrams:
    with _BIGRAMS_LOCK:
        hit = _BIGRAMS.get(id(vocab))
        if hit is None or hit.vocab is not vocab:
            hit = _BIGRAMS[id(vocab)] = Bigrams(vocab)
        return hit


class CanonicalState(NamedTuple):
    inner: Any  # the spec's own state
    previous: int | None  # the last output token, where the filter chose it (None: nothing
    # generated yet, or the last token was chosen where the filter does not run)
    memo: dict  # what was found out about this state: "allowed" (the spec's allowed count),
    # "mask" (its canonical mask, kept where the lookahead ran)


class CanonicalConstraint(Constraint):
    """The spec's constraint, restricted to canonical pairs (see the module docstring)."""

    def __init__(self, spec: Any, inner: Constraint):
        super().__init__(spec, inner.vocab)
        self.inner = inner
        self.engine = f"{inner.engine}+canonical"
        self.cheap_mask = inner.cheap_mask
        self.eos_token_ids = inner.eos_token_ids
        self.bigrams = bigrams_for(inner.vocab)

    def start(self) -> CanonicalState:
        return CanonicalState(self.inner.start(), None, {})

    def advance(self, state: CanonicalState, token_id: int, check: bool = True):
        if check and not self.allows(state, token_id):
            raise ValueError(f"token {token_id} is not allowed here (canonical tokenization)")
        previous = token_id if self._filters(state) else None
        return CanonicalState(self.inner.advance(state.inner, token_id, check=False), previous,
                              {})

    def is_complete(self, state: CanonicalState) -> bool:
        return self.inner.is_complete(state.inner)

    def output_bytes(self, state: CanonicalState) -> bytes:
        return self.inner.output_bytes(state.inner)

    def parse(self, text: str) -> Any:
        return self.inner.parse(text)

    # -- where the filter applies ----------------------------------------------------------
    def _allowed_count(self, state: CanonicalState) -> int | None:
        """How many tokens the spec allows at ``state`` (None: its mask is not cheap)."""
        if not self.cheap_mask:
            return None
        if "allowed" not in state.memo:
            state.memo["allowed"] = int(self.inner.mask(state.inner).sum())
        return state.memo["allowed"]

    def _filters(self, state: CanonicalState) -> bool:
        count = self._allowed_count(state)
        return count is None or count <= FILTER_MAX

    def _pairs(self, previous: int | None, tokens: np.ndarray) -> np.ndarray:
        """``bigrams.allowed`` for plain tokens; special tokens (EOS) pass."""
        tokens = np.asarray(tokens, dtype=np.int64)
        plain = ~self.vocab.special[tokens]
        ok = np.ones(len(tokens), dtype=bool)
        if plain.any():
            ok[plain] = self.bigrams.allowed(previous, tokens[plain])
        return ok

    def _continues(self, state: CanonicalState, token: int, depth: int,
                   visits: list[int]) -> bool:
        """Whether some accepted output goes on through ``token`` after ``state``: it may end
        after it, or the state after it is wide (no filter there), or some token makes a
        canonical pair with it and, looking ``depth`` tokens further while the spec stays
        narrow, continues in turn. Past ``LOOKAHEAD_VISITS`` tokens looked at (``visits``), a
        token with a canonical pair after it counts as continuing: the lookahead refuses only
        what it proves to be a dead end."""
        if self.is_eos(token):
            return True
        after = self.inner.advance(state.inner, token, check=False)
        if self.inner.is_complete(after):
            return True
        nxt = np.flatnonzero(self.inner.mask(after))
        if len(nxt) > FILTER_MAX:  # unfiltered there
            return True
        plain = nxt[~self.vocab.special[nxt]]
        if len(plain) < len(nxt):  # a special token the spec names (structural tags)
            return True
        if depth == 0:
            return self.bigrams.any_allowed(token, plain)
        following = CanonicalState(after, token, {})
        for u in plain[self.bigrams.allowed(token, plain)].tolist():
            visits[0] += 1
            if visits[0] > LOOKAHEAD_VISITS or self._continues(following, u, depth - 1, visits):
                return True
        return False

    # -- the protocol -------------------------------------------------------------------------
    def mask(self, state: CanonicalState) -> np.ndarray:
        if "mask" in state.memo:
            return state.memo["mask"].copy()
        mask = self.inner.mask(state.inner)
        state.memo.setdefault("allowed", int(mask.sum()))
        if not self._filters(state):
            return mask
        allowed = np.flatnonzero(mask)
        mask[allowed] = self._pairs(state.previous, allowed)
        if self.cheap_mask:  # the lookahead needs the spec's masks ahead
            visits = [0]
            for t in np.flatnonzero(mask).tolist():
                mask[t] = self._continues(state, t, LOOKAHEAD_DEPTH, visits)
        state.memo["mask"] = mask.copy()
        return mask

    def allows(self, state: CanonicalState, token_id: int) -> bool:
        if "mask" in state.memo:
            return bool(state.memo["mask"][token_id])
        if not self.inner.allows(state.inner, token_id):
            return False
        if not self._filters(state):
            return True
        if not self._pairs(state.previous, np.array([token_id]))[0]:
            return False
        return not self.cheap_mask or bool(self.mask(state)[token_id])
