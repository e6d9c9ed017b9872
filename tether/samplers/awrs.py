r"""Adaptive weighted rejection sampling (AWRS) for one decoding step.

Notation. p is the model's next-token distribution (already shaped by temperature, top-k and
top-p and normalized), A the set of tokens the constraint allows, and

    Z_A = \sum_{x \in A} p(x)

the local normalizer. The target of one step is \pi(x) = p(x) 1[x \in A] / Z_A; sequential Monte
Carlo over whole outputs needs, besides a draw x ~ \pi, a *properly weighted* estimate W of Z_A:
E[W | x] = Z_A for every x in A (then E[W f(x)] = \sum_{x \in A} p(x) f(x) for any f, which is
what SMC's importance weights require).

Adaptive rejection. Tokens are tested in decreasing order of Gumbel-perturbed log-probabilities
(``candidates.CandidateStream``), which is sampling without replacement from p: each rejected
token is removed together with its mass, and the next candidate is a draw from p restricted to
the untested tokens. The first accepted token x is therefore an exact draw from \pi. Let
r_1, ..., r_k be the rejected tokens before x and R = \sum_i p(r_i) their mass.

Every function here returns a ``StepResult``; when every token with positive probability is
rejected, the token is None and the log weight -inf (the particle is dead, nothing hangs).

Three weight estimators, and the exact weight:

``recursive_awrs`` (default, lower variance). Write t(S) = Z_A / p(S) for the chance that a draw
from p restricted to the untested set S is accepted. Drawing y first,

    t(S) = q_y 1[y \in A] + (1 - q_y) t(S \ {y}),   q_y = p(y) / p(S).

A rejected y contributes the exact factor (1 - q_y); at the accepted x the tail t(S \ {x}) is
estimated without bias by one coin flip: test the next candidate x'. The factors telescope to
p(S) = 1 - R, and the estimate is

    W = 1 - R   if x' is accepted (or x is the last token with positive probability),
    W = p(x)    otherwise.

Unbiased and properly weighted, by induction on |S|: given the first draw y = x, the coin flip
gives E[W] = (1 - R)[(Z_A - p(x)) + (p(S) - Z_A) p(x) / p(S)] / (p(S) - p(x)) = Z_A (the
algebra reduces to Z_A p(S) (p(S) - p(x)) / (p(S) (p(S) - p(x)))), and given a rejected y the
claim for S \ {y} carries over. Cost: the rejections plus two checks.

``geometric_awrs`` (the AWRS paper's estimator). Simulate sampling *with* replacement from p
until the second acceptance and return W = 1 / (N - 1), N the number of draws: for a negative
binomial count of draws until r = 2 successes of probability Z_A, (r - 1) / (N - 1) is the
classical unbiased estimator, and N is independent of which accepted tokens were drawn, so W is
properly weighted. Draws of already-rejected tokens need no check: their number before each new
candidate is geometric, "phantom" rejections counted with a host random generator; only new
candidates (taken in key order) are tested. The first accepted token is the sample.

``exact_weight`` (Rao-Blackwellised, where the constraint's full mask is cheap). The token is
an exact draw from \pi, p restricted to the mask (``candidates.masked_draws``: the inverse CDF
at a seeded uniform), the distribution the rejection loop above samples from. Its weight is
Z_A itself, computed on the device from the mask and the logits in the same pass:
E[W | x] = Z_A holds with no variance at all, where the recursive estimator's coin flip has Var(W | path) = (1 - R - p(x))^2 t (1 - t) (t the
coin's chance of acceptance). That noise is what an SMC population pays for in effective
sample size; this estimator removes it at the cost of one mask per step. One check confirms
the token (a mask that disagrees with the checks raises ``InconsistentMask``).

``lcd`` (``proper_weights=False``): the first accepted token, no weight: locally constrained
decoding, the distribution that token masking samples from, as a baseline.

Bounded cost. With ``max_rejections=R``, ``recursive_awrs`` and ``lcd`` stop testing after R
rejections and finish the step exactly: ``allowed()`` computes the constraint's full mask, the
token is the one with the largest Gumbel key among the allowed ids (the same token the
unbounded loop would reach), and the weight is the exactly known mass Z_A. This stays
unbiased and properly weighted: in the induction above, the base case at the switch returns
t(S) exactly, and the telescoped product of the factors is p(S), so W = p(S) t(S) = Z_A. (The
geometric estimator has no such bounded form: its count N is a function of the whole sequence,
and cutting the sequence at a data-dependent point biases 1 / (N - 1).)

The same mask also tames the coin flip. Its two outcomes, 1 - R and p(x), bracket Z_A; when
they are far apart (1 - R > ``max_coin_ratio`` * p(x)), a rare outcome 1 - R >> Z_A carries
most of the expectation, and the weights become heavy-tailed: an SMC population, or a sample
mean, then underestimates Z_A until that rare event shows up. In that case the bounded mode
computes the mask instead and returns W = Z_A exactly, keeping x (the argmax of the keys over
A, since every earlier candidate was rejected). The choice depends only on what was seen before
the coin, so it is a stopping rule and the estimator stays unbiased and properly weighted; the
cost stays at most R rejections, two checks and one mask per step, and the weights stay within
a factor ``max_coin_ratio`` of Z_A.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

ESTIMATORS = ("recursive", "geometric")
# auto: exact where the constraint's mask is cheap, the estimator elsewhere
WEIGHTS = ("auto", "exact", "estimate")


class Candidates(Protocol):
    def next(self) -> tuple[int, float] | None: ...

    def exact(self, allowed: np.ndarray) -> tuple[int, float] | None: ...

    def read(self) -> list[int]: ...


@dataclass
class StepResult:
    token: int | None  # None: every token with positive probability was rejected
    log_weight: float  # log W; 0.0 for lcd; -inf for a dead particle
    checks: int  # constraint checks (distinct tokens tested)
    rejections: int
    exact: bool = False  # the bounded-cost fallback (full mask) finished the step
    # recursive estimator only: 1 - R when the coin flip decided the weight, the larger of its
    # two outcomes (1 - R or p(x)); None otherwise. Reported for diagnostics and exact variances.
    coin_high: float | None = None

    @property
    def dead(self) -> bool:
        return self.token is None


class InconsistentMask(RuntimeError):
    """The constraint's full mask disagrees with its token-by-token checks."""


def _finish_exact(cands: Candidates, allowed: Callable[[], np.ndarray], checks: int,
                  rejections: int, weighted: bool, sample: int | None = None) -> StepResult:
    """Finish a step from the full mask A, weight Z_A.

    Every candidate read so far was rejected, except ``sample`` when given (a token already
    accepted in key order). Without a sample, the token is a fresh draw from p restricted to A
    (``cands.exact``): A holds none of the rejected tokens, so the first allowed token of the
    key order is distributed as p restricted to A whatever was rejected before it, and so is
    that draw. With a sample, the sample is the first allowed token of the key order, so it is
    the token. Either way, a mask that allows a rejected token (or not the sample) contradicts
    the checks: ``InconsistentMask``.
    """
    mask = allowed()
    rejected = [t for t in cands.read() if t != sample]
    if any(mask[t] for t in rejected if t < len(mask)):
        raise InconsistentMask("the mask allows a token its check rejected")
    if sample is not None and not (sample < len(mask) and mask[sample]):
        raise InconsistentMask(f"token {sample} was accepted but the mask does not allow it")
    found = cands.exact(mask)
    if found is None:
        if sample is not None:
            raise InconsistentMask(f"token {sample} was accepted but the mask allows nothing")
        return StepResult(None, -math.inf, checks, rejections, exact=True)
    token, log_mass = found
    if sample is not None:
        token = sample
    return StepResult(token, log_mass if weighted else 0.0, checks, rejections, exact=True)


def recursive_awrs(cands: Candidates, accept: Callable[[int], bool], *,
                   max_rejections: int | None = None,
                   allowed: Callable[[], np.ndarray] | None = None,
                   max_coin_ratio: float | None = None) -> StepResult:
    """Recursive AWRS (see the module docstring).

    ``allowed`` (the constraint's full mask) is needed with ``max_rejections`` or
    ``max_coin_ratio``; either one alone enables its rule.
    """
    checks = rejections = 0
    rejected_mass = 0.0
    while True:
        if max_rejections is not None and rejections >= max_rejections:
            return _finish_exact(cands, allowed, checks, rejections, weighted=True)
        cand = cands.next()
        if cand is None:
            return StepResult(None, -math.inf, checks, rejections)
        token, logp = cand
        checks += 1
        if not accept(token):
            rejections += 1
            rejected_mass += math.exp(logp)
            continue
        p_x = math.exp(logp)
        if max_coin_ratio is not None and 1.0 - rejected_mass > max_coin_ratio * p_x:
            return _finish_exact(cands, allowed, checks, rejections, weighted=True, sample=token)
        follower = cands.next()
        if follower is None:  # x is the last token with positive probability: Z_A = p(x)
            return StepResult(token, logp, checks, rejections)
        checks += 1
        # 1 - R in exact arithmetic is at least p(x) + p(x'); guard the float rounding
        high = max(1.0 - rejected_mass, p_x + math.exp(follower[1]))
        if accept(follower[0]):
            return StepResult(token, math.log(high), checks, rejections, coin_high=high)
        return StepResult(token, logp, checks, rejections + 1, coin_high=high)


def exact_weight(found: tuple[int, float] | None, accept: Callable[[int], bool]) -> StepResult:
    """The step from the mask: ``found`` is (a draw from p restricted to the mask, log Z_A),
    or None when no allowed token has positive probability (the particle is dead)."""
    if found is None:
        return StepResult(None, -math.inf, 0, 0, exact=True)
    token, log_mass = found
    if not accept(token):
        raise InconsistentMask(f"token {token} is in the mask but its check rejects it")
    return StepResult(token, log_mass, 1, 0, exact=True)


def geometric_awrs(cands: Candidates, accept: Callable[[int], bool],
                   rng: np.random.Generator) -> StepResult:
    """The AWRS paper's estimator W = 1 / (N - 1) (see the module docstring)."""
    checks = rejections = 0
    draws = 0  # N: draws of the simulated with-replacement sequence
    rejected_mass = 0.0  # mass of tokens known to be rejected
    accepted_mass = 0.0  # mass of tokens known to be accepted
    sample: int | None = None
    while True:
        # draws that land on known-rejected tokens before the next draw outside them
        if rejected_mass > 0.0:
            if rejected_mass >= 1.0:
                return StepResult(None, -math.inf, checks, rejections)
            draws += int(rng.geometric(1.0 - rejected_mass)) - 1
        draws += 1
        # that draw lands on a known-accepted token with probability P(accepted) / P(outside)
        if accepted_mass > 0.0 and rng.random() * (1.0 - rejected_mass) < accepted_mass:
            break
        cand = cands.next()
        if cand is None:
            if sample is None:
                return StepResult(None, -math.inf, checks, rejections)
            # Every token with positive probability is known, so the draw outside the rejected
            # ones is on an accepted token (the coin above missed only by float rounding).
            break
        token, logp = cand
        checks += 1
        if accept(token):
            if sample is not None:
                break
            sample = token
            accepted_mass += math.exp(logp)
        else:
            rejections += 1
            rejected_mass += math.exp(logp)
    return StepResult(sample, -math.log(draws - 1), checks, rejections)


def lcd(cands: Candidates, accept: Callable[[int], bool], *, max_rejections: int | None = None,
        allowed: Callable[[], np.ndarray] | None = None) -> StepResult:
    """Locally constrained decoding: the first accepted token in key order, no weight."""
    checks = rejections = 0
    while True:
        if max_rejections is not None and rejections >= max_rejections:
            return _finish_exact(cands, allowed, checks, rejections, weighted=False)
        cand = cands.next()
        if cand is None:
            return StepResult(None, -math.inf, checks, rejections)
        checks += 1
        if accept(cand[0]):
            return StepResult(cand[0], 0.0, checks, rejections)
        rejections += 1


def check_weights(weights: str, constraints: list[Any]) -> None:
    """``ValueError`` for an unknown ``weights`` setting, or "exact" with a constraint whose
    full mask is not cheap (one check per vocabulary entry: partial matching, predicates)."""
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; use one of {', '.join(WEIGHTS)}")
    if weights == "exact":
        for c in constraints:
            if c is not None and not c.cheap_mask:
                raise ValueError(f"weights='exact' needs a constraint whose full mask is cheap "
                                 f"(llguidance: JSON schemas, regular expressions, grammars, "
                                 f"choices); {c.spec.describe()} is checked by {c.engine}: use "
                                 f"weights='auto' or 'estimate'")
