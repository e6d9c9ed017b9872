"""AWRS against exact answers, without an engine.

Random next-token distributions (vocabularies of 50, 1,000 and 49,152) and random accepted sets
A (a random fifth of the vocabulary, a single token, and sets holding under 0.1% of the mass);
20,000 draws per case with fixed seeds, through the same Gumbel ranking and candidate streams
the engine uses. For each estimator (recursive, geometric), for the bounded-cost mode, and for
exact weights (the mask's best token and Z_A, from ``rank_batch``, as the engine computes them):

* the sampled tokens follow p restricted to A: chi-square test, rare categories pooled so that
  every expected count is at least 5, p-value above 1e-3;
* the mean weight is within 4 standard errors of the exact Z_A;
* proper weighting: for each of the most frequent tokens x, the mean weight of the draws that
  returned x is also within 4 standard errors of Z_A.

Standard errors. The geometric estimator's weights are light-tailed, so the sample standard
deviation is used. The recursive estimator's coin flip returns 1 - R or p(x), and when A is rare
the large outcome carries most of E[W | x] with a small probability: a sample that misses it
shows a near-zero sample deviation. The test therefore uses the exact conditional variance of
each draw, Var(W | path) = (1 - R - p(x))^2 t (1 - t) with t = (Z_A - p(x)) / (1 - R - p(x))
the chance the coin comes up accepted; since E[W | path] = Z_A for every path, the mean's
variance is the average of these over the draws. Exact (mask-finished) draws have none; a
floor of 1e-9 Z_A covers float rounding: exact weights must equal Z_A to that precision.

The unbounded estimators walk the vocabulary until they meet A, which for a rare A in 49,152
tokens means thousands of checks per draw; those cases run in the bounded mode only.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from tether.samplers import awrs
from tether.samplers.candidates import rank_batch

N_DRAWS = 20_000
MAX_COIN_RATIO = 16.0


def make_case(vocab: int, kind: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    logprobs = (torch.randn(vocab, generator=g, dtype=torch.float64) * 2.0).log_softmax(-1)
    p = logprobs.exp().numpy()
    rng = np.random.default_rng(seed)
    allowed = np.zeros(vocab, dtype=bool)
    if kind == "fifth":
        allowed[rng.choice(vocab, size=vocab // 5, replace=False)] = True
    elif kind == "single":
        allowed[rng.integers(vocab)] = True
    elif kind == "rare":  # random tokens while the set holds under 0.1% of the mass
        mass = 0.0
        for t in rng.permutation(np.argsort(p)[: vocab // 2]):
            if mass + p[t] >= 1e-3:
                continue
            allowed[t] = True
            mass += p[t]
            if mass > 5e-4:
                break
    assert allowed.any()
    return logprobs, p, allowed


def run(logprobs, allowed, method, seed):
    vocab = len(allowed)
    batch = max(1, min(2000, 20_000_000 // vocab))
    rng = np.random.default_rng(seed)
    tokens, weights, coins = [], [], []
    checks = 0
    for start in range(0, N_DRAWS, batch):
        b = min(batch, N_DRAWS - start)
        ranked = rank_batch(logprobs[None, :].expand(b, vocab),
                            [seed * 1_000_003 + i for i in range(start, start + b)], [0] * b, 8,
                            masks=[allowed] * b if method == "exact" else None)
        for row in range(b):
            stream = ranked.stream(row)
            accept = allowed.__getitem__
            if method == "exact":
                res = awrs.exact_weight(stream.masked(), accept)
            elif method == "recursive":
                res = awrs.recursive_awrs(stream, accept)
            elif method == "geometric":
                res = awrs.geometric_awrs(stream, accept, rng)
            else:  # bounded
                res = awrs.recursive_awrs(stream, accept, max_rejections=4,
                                          allowed=lambda: allowed, max_coin_ratio=MAX_COIN_RATIO)
            tokens.append(res.token)
            weights.append(math.exp(res.log_weight))
            coins.append(res.coin_high if res.coin_high is not None else math.nan)
            checks += res.checks
    return np.array(tokens), np.array(weights), np.array(coins), checks / N_DRAWS


def chi_square_pvalue(tokens, p, allowed):
    target = np.where(allowed, p, 0.0)
    target /= target.sum()
    counts = np.bincount(tokens, minlength=len(p))
    order = np.argsort(-target)
    order = order[target[order] > 0]
    observed, expected, o, e = [], [], 0.0, 0.0
    for t in order:  # pool from the rarest end upward
        o += counts[t]
        e += target[t] * len(tokens)
        if e >= 5:
            observed.append(o)
            expected.append(e)
            o = e = 0.0
    if e > 0:
        if expected:
            observed[-1] += o
            expected[-1] += e
        else:
            observed.append(o)
            expected.append(e)
    if len(expected) < 2:
        return 1.0
    return stats.chisquare(observed, expected).pvalue


def standard_error(weights, coins, tokens, p, z, method):
    if method == "geometric":
        return weights.std(ddof=1) / math.sqrt(len(weights))
    p_x = p[tokens]
    spread = np.where(np.isnan(coins), 0.0, coins - p_x)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.clip(np.where(spread > 0, (z - p_x) / spread, 0.0), 0.0, 1.0)
    variance = spread ** 2 * t * (1 - t)
    return math.sqrt(variance.sum()) / len(weights)


CASES = [
    (50, "fifth", "recursive"), (50, "fifth", "geometric"), (50, "fifth", "bounded"),
    (50, "single", "recursive"), (50, "single", "geometric"), (50, "single", "bounded"),
    (50, "rare", "recursive"), (50, "rare", "geometric"), (50, "rare", "bounded"),
    (1000, "fifth", "recursive"), (1000, "fifth", "geometric"), (1000, "fifth", "bounded"),
    (1000, "single", "bounded"),
    (1000, "rare", "recursive"), (1000, "rare", "geometric"), (1000, "rare", "bounded"),
    (49152, "fifth", "recursive"), (49152, "fifth", "geometric"), (49152, "fifth", "bounded"),
    (49152, "single", "bounded"), (49152, "rare", "bounded"),
    (50, "fifth", "exact"), (50, "single", "exact"), (50, "rare", "exact"),
    (1000, "fifth", "exact"), (1000, "rare", "exact"),
    (49152, "fifth", "exact"), (49152, "rare", "exact"),
]


@pytest.mark.parametrize("vocab,kind,method", CASES, ids=[f"{v}-{k}-{m}" for v, k, m in CASES])
def test_awrs_against_exact_answers(vocab, kind, method):
    seed = vocab + len(kind)
    logprobs, p, allowed = make_case(vocab, kind, seed)
    z = p[allowed].sum()
    if kind == "rare":
        assert z < 1e-3

    tokens, weights, coins, checks = run(logprobs, allowed, method, seed)
    assert allowed[tokens].all(), "a rejected token was returned"

    assert chi_square_pvalue(tokens, p, allowed) > 1e-3

    floor = 1e-9 * z
    se = max(standard_error(weights, coins, tokens, p, z, method), floor)
    assert abs(weights.mean() - z) <= 4 * se, (weights.mean(), z, se)

    counts = np.bincount(tokens, minlength=vocab)
    for x in np.argsort(-counts)[:3]:
        sel = tokens == x
        if sel.sum() < 30:
            continue
        se_x = max(standard_error(weights[sel], coins[sel], tokens[sel], p, z, method), floor)
        assert abs(weights[sel].mean() - z) <= 4 * se_x, (x, weights[sel].mean(), z, se_x)

    if method == "bounded":
        assert checks <= 4 + 2  # at most R rejections, then the accepted token and its coin
    if method == "exact":
        assert checks == 1  # the mask decides; one check confirms the token
        assert np.allclose(weights, z, rtol=1e-9)  # no estimator noise at all


def test_exact_weight_refuses_a_mask_its_checks_contradict():
    logprobs, _, allowed = make_case(50, "fifth", 5)
    ranked = rank_batch(logprobs[None, :], [1], [0], 8, masks=[allowed])
    with pytest.raises(awrs.InconsistentMask):
        awrs.exact_weight(ranked.stream(0).masked(), lambda token: False)
    nothing = rank_batch(logprobs[None, :], [1], [0], 8, masks=[np.zeros(50, dtype=bool)])
    res = awrs.exact_weight(nothing.stream(0).masked(), allowed.__getitem__)
    assert res.dead and res.log_weight == -math.inf
    # rows without a mask in the same batch keep their plain candidates
    mixed = rank_batch(logprobs[None, :].expand(2, 50), [1, 1], [0, 0], 8, masks=[None, allowed])
    alone = rank_batch(logprobs[None, :], [1], [0], 8)
    assert np.array_equal(mixed.tokens[0], alone.tokens[0])
    assert mixed.masked[1] == ranked.masked[0]
    with pytest.raises(ValueError):
        mixed.stream(0).masked()


def test_exact_draw_where_the_allowed_mass_underflows_float32():
    """Allowed tokens of probability about e^-100 (below float32's smallest normal number):
    p = exp(log p) would round them to 0 and call the particle dead; the draw is redone in
    log space and still returns log Z_A and a draw from p restricted to A."""
    vocab = 1000
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(vocab, generator=g, dtype=torch.float64) * 2.0
    allowed = np.zeros(vocab, dtype=bool)
    allowed[[3, 500, 999]] = True
    logits[[3, 500, 999]] = torch.tensor([-90.0, -91.0, -92.5], dtype=torch.float64)
    logprobs = logits.log_softmax(-1)
    assert bool((logprobs[allowed] < -90).all())
    exact_log_z = float(logprobs[allowed].logsumexp(-1))
    n = 4000
    ranked = rank_batch(logprobs.float()[None, :].expand(n, vocab), list(range(n)), [0] * n, 8,
                        masks=[allowed] * n)
    tokens = []
    for row in range(n):
        res = awrs.exact_weight(ranked.stream(row).masked(), allowed.__getitem__)
        assert abs(res.log_weight - exact_log_z) < 1e-4
        tokens.append(res.token)
    p = logprobs.exp().numpy() / math.exp(exact_log_z)  # p restricted to A, renormalized
    assert chi_square_pvalue(np.array(tokens), np.where(allowed, p, 0.0), allowed) > 1e-3
    with pytest.raises(ValueError):
        ranked.stream(0).next()  # a row with a mask has no candidates to read


def test_lcd_samples_the_masked_distribution():
    logprobs, p, allowed = make_case(1000, "fifth", 7)
    vocab = len(allowed)
    ranked = rank_batch(logprobs[None, :].expand(N_DRAWS, vocab), list(range(N_DRAWS)),
                        [0] * N_DRAWS, 8)
    tokens = np.array([awrs.lcd(ranked.stream(i), allowed.__getitem__).token
                       for i in range(N_DRAWS)])
    assert chi_square_pvalue(tokens, p, allowed) > 1e-3


def test_dead_particle_when_nothing_is_allowed():
    logprobs, _, _ = make_case(50, "fifth", 3)
    allowed = np.zeros(50, dtype=bool)
    ranked = rank_batch(logprobs[None, :], [1], [0], 8)
    for method in ("recursive", "geometric", "bounded", "lcd"):
        stream = ranked.stream(0) if method != "bounded" else ranked.stream(0)
        if method == "recursive":
            res = awrs.recursive_awrs(stream, allowed.__getitem__)
        elif method == "geometric":
            res = awrs.geometric_awrs(stream, allowed.__getitem__, np.random.default_rng(0))
        elif method == "bounded":
            res = awrs.recursive_awrs(stream, allowed.__getitem__, max_rejections=4,
                                      allowed=lambda: allowed)
        else:
            res = awrs.lcd(stream, allowed.__getitem__)
        assert res.dead and res.log_weight == -math.inf, method


def test_keys_are_a_pure_function_of_seed_and_step():
    from tether.samplers.gumbel import BlockKeys

    logprobs = torch.randn(3, 1000, dtype=torch.float64).log_softmax(-1)
    seeds, steps = [1, 2, 1], [5, 5, 6]
    a = BlockKeys(logprobs, seeds, steps).full()
    b = BlockKeys(logprobs.flip(0), seeds[::-1], steps[::-1]).full().flip(0)
    assert torch.equal(a, b)  # no hidden generator state, rows independent of their position
    assert not torch.equal(a[0] - logprobs[0], a[2] - logprobs[2])  # another step, other noise
    g = (a - logprobs).flatten()  # the Gumbel noise itself
    assert stats.kstest(g.numpy(), stats.gumbel_r.cdf).pvalue > 1e-3


def test_shaping_follows_vllm_order():
    from tether.decode.shaping import shape_logits

    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    out = shape_logits(logits, torch.tensor([2.0]), torch.tensor([3]), torch.tensor([0.6]))
    probs = out.softmax(-1)[0]
    scaled = torch.tensor([2.0, 1.5, 1.0])  # temperature 2, then top-k 3
    soft = scaled.softmax(-1)  # [0.506, 0.307, 0.186]: top-p 0.6 keeps the first two
    expected = torch.zeros(5)
    expected[:2] = soft[:2] / soft[:2].sum()
    assert torch.allclose(probs, expected, atol=1e-6)


def test_shaping_never_writes_into_the_logits():
    """Without a temperature, the logits themselves would reach vLLM's in-place top-k/top-p;
    the processor passes a view of vLLM's logits, and a step redone without truncation reads
    them again."""
    from tether.decode.shaping import shape_logits

    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    out = shape_logits(logits, None, torch.tensor([2]), torch.tensor([1.0]))
    assert torch.equal(logits, torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]))
    assert torch.isinf(out).sum() == 3
    assert shape_logits(logits, None, torch.tensor([0]), torch.tensor([1.0])) is logits


def test_bounded_fallback_refuses_a_mask_that_allows_a_rejected_token():
    """The fallback draws afresh from p restricted to the mask, which is right only if the mask
    holds none of the tokens the checks rejected: a mask that does is refused, not used."""
    logprobs, _, allowed = make_case(1000, "single", 7)
    ranked = rank_batch(logprobs[None, :], [3], [0], 8)
    stream = ranked.stream(0)
    first = ranked.tokens[0, 0]
    liar = allowed.copy()
    liar[first] = True  # the mask allows the first candidate, which the check rejects
    with pytest.raises(awrs.InconsistentMask):
        awrs.recursive_awrs(stream, allowed.__getitem__, max_rejections=4, allowed=lambda: liar)
    honest = awrs.recursive_awrs(ranked.stream(0), allowed.__getitem__, max_rejections=4,
                                 allowed=lambda: allowed)
    assert honest.exact and allowed[honest.token]


def test_greedy_fallback_takes_the_most_probable_allowed_token():
    """A greedy row's bounded fallback is deterministic: the most probable allowed token,
    whatever the seed (the engine test of greedy decoding once caught a seeded draw here)."""
    logprobs, p, allowed = make_case(1000, "rare", 9)
    best = int(np.argmax(np.where(allowed, p, -1.0)))
    for seed in range(5):
        ranked = rank_batch(logprobs[None, :], [seed], [0], 8, noise=[False])
        res = awrs.lcd(ranked.stream(0), allowed.__getitem__, max_rejections=4,
                       allowed=lambda: allowed)
        assert res.exact and res.token == best
