"""Resampling schemes for sequential Monte Carlo, and the effective sample size.

Each scheme maps normalized weights w (length N) to N ancestor indices such that every
particle i is chosen w_i N times in expectation (unbiased resampling):

* multinomial: N independent draws from w;
* stratified: one uniform in each stratum [k/N, (k+1)/N), inverted through the CDF;
* systematic: one uniform u in [0, 1/N), then the points u + k/N (the default: least
  variance in practice, cheapest);
* residual: floor(N w_i) copies deterministically, the remaining slots by multinomial draws on
  the residual weights.
"""

from __future__ import annotations

import numpy as np

SCHEMES = ("systematic", "multinomial", "stratified", "residual")


def normalize(log_weights: np.ndarray) -> np.ndarray:
    """Normalized weights from log weights; all -inf gives all zeros."""
    log_weights = np.asarray(log_weights, dtype=np.float64)
    top = np.max(log_weights) if len(log_weights) else -np.inf
    if not np.isfinite(top):
        return np.zeros(len(log_weights))
    w = np.exp(log_weights - top)
    return w / w.sum()


def ess(log_weights: np.ndarray) -> float:
    """Effective sample size (sum w)^2 / sum w^2; 0 when every weight is zero."""
    w = normalize(log_weights)
    total = float((w ** 2).sum())
    return 1.0 / total if total > 0 else 0.0


def log_mean_exp(log_weights: np.ndarray) -> float:
    log_weights = np.asarray(log_weights, dtype=np.float64)
    top = np.max(log_weights)
    if not np.isfinite(top):
        return -np.inf
    return float(top + np.log(np.mean(np.exp(log_weights - top))))


def _invert(cdf: np.ndarray, points: np.ndarray) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, points, side="right"), len(cdf) - 1)


def resample(weights: np.ndarray, rng: np.random.Generator, scheme: str = "systematic",
             n: int | None = None) -> np.ndarray:
    """Ancestor indices (sorted) for ``n`` (default: len(weights)) offspring."""
    w = np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        raise ValueError("cannot resample: every weight is zero")
    w = w / w.sum()
    n = len(w) if n is None else n
    cdf = np.cumsum(w)
    cdf[-1] = 1.0
    if scheme == "multinomial":
        return np.sort(_invert(cdf, rng.random(n)))
    if scheme == "stratified":
        return _invert(cdf, (np.arange(n) + rng.random(n)) / n)
    if scheme == "systematic":
        return _invert(cdf, (np.arange(n) + rng.random()) / n)
    if scheme == "residual":
        counts = np.floor(n * w).astype(int)
        rest = n - counts.sum()
        if rest > 0:
            residual = n * w - counts
            counts += np.bincount(resample(residual, rng, "multinomial", rest), minlength=len(w))
        return np.repeat(np.arange(len(w)), counts)
    raise ValueError(f"unknown resampling scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
