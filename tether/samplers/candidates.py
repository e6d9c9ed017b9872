"""Ranked candidates: the device side of AWRS.

For a batch of rows, ``rank_batch`` takes each row's distribution p (log-probabilities, shaped
by the request's sampling parameters beforehand: ``tether.decode.shaping`` does it with vLLM's
operations), perturbs it with counter-based Gumbel noise (``gumbel.gumbel_keys``), and takes
the ``k`` best keys of every row in one batched ``topk``. One copy brings those candidates to the host. Each row then reads its candidates in key order
through a ``CandidateStream``; only a row whose ``k`` candidates were all rejected goes back to
the device for more (``topk`` again, twice as deep), and only the bounded-cost fallback asks the
device for the exact allowed mass (``exact``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from tether.samplers.gumbel import gumbel_keys


@dataclass
class RankedBatch:
    """Device tensors of one step plus the host copy of each row's top candidates."""

    keys: torch.Tensor  # [B, V] Gumbel keys (device)
    logprobs: torch.Tensor  # [B, V] (device)
    tokens: np.ndarray  # [B, k] int64, best keys first
    token_logprobs: np.ndarray  # [B, k] float64
    finite: np.ndarray  # [B, k] bool: key > -inf (the token has positive probability)

    def stream(self, row: int) -> "CandidateStream":
        return CandidateStream(self.keys[row], self.logprobs[row], self.tokens[row],
                               self.token_logprobs[row], self.finite[row])


def rank_batch(logprobs: torch.Tensor, seeds: list[int], steps: list[int], k: int,
               noise: list[bool] | None = None) -> RankedBatch:
    """Gumbel-rank every row and bring the top ``k`` candidates to the host in one copy.

    ``seeds``/``steps``: per row; ``noise``: optional per-row flags, False for greedy rows
    (ranked by probability alone).
    """
    keys = gumbel_keys(logprobs, seeds, steps, noise)
    k = min(k, keys.shape[-1])
    top_keys, top_idx = keys.topk(k, dim=-1)
    top_lp = logprobs.gather(-1, top_idx)
    packed = torch.stack([top_idx.to(torch.float64), top_lp.to(torch.float64),
                          top_keys.to(torch.float64)]).cpu().numpy()
    return RankedBatch(keys, logprobs, packed[0].astype(np.int64), packed[1],
                       np.isfinite(packed[2]))


class CandidateStream:
    """One row's tokens in decreasing key order (a draw without replacement from p).

    ``next()`` returns ``(token, logprob)`` or ``None`` once every token with positive
    probability has been returned. ``exact(allowed)`` returns the token with the largest key
    among the allowed ids and the log of their total probability, or ``None`` if they have none.
    ``device_seconds`` accumulates the time spent in device operations for this row.
    """

    def __init__(self, keys: torch.Tensor, logprobs: torch.Tensor, tokens: np.ndarray,
                 token_logprobs: np.ndarray, finite: np.ndarray):
        self._keys = keys
        self._logprobs = logprobs
        self._tokens = tokens
        self._logps = token_logprobs
        self._finite = finite
        self._pos = 0
        self.device_seconds = 0.0
        self.fetches = 0

    def _fetch_more(self) -> bool:
        have = len(self._tokens)
        vocab = self._keys.shape[-1]
        if have >= vocab or not self._finite[-1]:
            return False
        t0 = time.perf_counter()
        depth = min(vocab, 2 * have)
        top_keys, top_idx = self._keys.topk(depth)
        top_lp = self._logprobs.gather(-1, top_idx)
        packed = torch.stack([top_idx.to(torch.float64), top_lp.to(torch.float64),
                              top_keys.to(torch.float64)])[:, have:].cpu().numpy()
        self._tokens = np.concatenate([self._tokens, packed[0].astype(np.int64)])
        self._logps = np.concatenate([self._logps, packed[1]])
        self._finite = np.concatenate([self._finite, np.isfinite(packed[2])])
        self.device_seconds += time.perf_counter() - t0
        self.fetches += 1
        return True

    def next(self) -> tuple[int, float] | None:
        if self._pos >= len(self._tokens) and not self._fetch_more():
            return None
        i = self._pos
        if not self._finite[i]:
            return None
        self._pos += 1
        return int(self._tokens[i]), float(self._logps[i])

    def exact(self, allowed: np.ndarray) -> tuple[int, float] | None:
        t0 = time.perf_counter()
        vocab = self._keys.shape[-1]
        mask = np.zeros(vocab, dtype=bool)
        n = min(vocab, len(allowed))
        mask[:n] = allowed[:n]
        mask_t = torch.from_numpy(mask).to(self._keys.device)
        keys = self._keys.masked_fill(~mask_t, float("-inf"))
        best = keys.argmax()
        log_mass = self._logprobs.masked_fill(~mask_t, float("-inf")).logsumexp(-1)
        out = torch.stack([best.to(torch.float64), keys[best].to(torch.float64),
                           log_mass.to(torch.float64)]).cpu().numpy()
        self.device_seconds += time.perf_counter() - t0
        if not np.isfinite(out[1]):
            return None
        return int(out[0]), float(out[2])
