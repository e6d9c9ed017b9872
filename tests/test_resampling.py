"""Resampling schemes are unbiased: particle i gets N w_i offspring in expectation."""

from __future__ import annotations

import numpy as np
import pytest

from tether.samplers import resampling


@pytest.mark.parametrize("scheme", resampling.SCHEMES)
def test_offspring_counts_are_unbiased(scheme):
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.ones(12) * 0.5)
    n, reps = 12, 20_000
    counts = np.zeros((reps, len(w)))
    for r in range(reps):
        counts[r] = np.bincount(resampling.resample(w, rng, scheme), minlength=len(w))
    assert (counts.sum(axis=1) == n).all()
    mean, se = counts.mean(axis=0), counts.std(axis=0, ddof=1) / np.sqrt(reps)
    se = np.maximum(se, 1e-12)
    assert (np.abs(mean - n * w) <= 4 * se + 1e-9).all(), (mean, n * w)
    if scheme in ("systematic", "residual"):  # never fewer than floor(N w) copies
        assert (counts >= np.floor(n * w) - (scheme == "systematic")).all()


def test_ess_and_log_mean_exp():
    assert resampling.ess(np.zeros(8)) == pytest.approx(8)
    assert resampling.ess(np.array([0.0, -np.inf, -np.inf])) == pytest.approx(1)
    assert resampling.ess(np.full(3, -np.inf)) == 0.0
    assert resampling.log_mean_exp(np.log([1.0, 3.0])) == pytest.approx(np.log(2.0))
    with pytest.raises(ValueError):
        resampling.resample(np.zeros(3), np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown"):
        resampling.resample(np.ones(3), np.random.default_rng(0), "bogus")
