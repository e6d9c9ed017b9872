"""Ranked candidates: the device side of AWRS.

For a batch of rows, ``rank_batch`` takes each row's distribution p (log-probabilities, shaped
by the request's sampling parameters beforehand: ``tether.decode.shaping`` does it with vLLM's
operations), perturbs it with counter-based Gumbel noise (``gumbel.gumbel_keys``), and takes
the ``k`` best keys of every row in one batched ``topk``. One copy brings those candidates to the host. Each row then reads its candidates in key order
through a ``CandidateStream``; only a row whose ``k`` candidates were all rejected goes back to
the device for more (``topk`` again, twice as deep), and only the bounded-cost fallback asks the
device for the exact allowed mass (``exact``).

Rows that bring their constraint's full mask (exact weights, ``samplers.awrs.exact_weight``)
get, in the same batched operation and the same copy, the allowed token with the largest key
and the log of the allowed mass, log Z_A = logsumexp of the row's log-probabilities over the
mask (``CandidateStream.masked``).
"""

from __future__ import annotations

import math
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
    # per row with a mask: (best allowed token, log Z_A, whether that token's key is finite)
    masked: list[tuple[int, float, bool] | None] | None = None

    def stream(self, row: int) -> "CandidateStream":
        return CandidateStream(self.keys[row], self.logprobs[row], self.tokens[row],
                               self.token_logprobs[row], self.finite[row],
                               self.masked[row] if self.masked is not None else None)


def _device_masks(masks: list[np.ndarray], vocab: int, device: torch.device) -> torch.Tensor:
    """Constraint masks (over the tokenizer's ids) as one [len(masks), vocab] bool tensor on
    ``device``, in one copy; ids past the tokenizer's size (padding in the logits) are not
    allowed."""
    full = np.zeros((len(masks), vocab), dtype=bool)
    for row, mask in zip(full, masks):
        n = min(vocab, len(mask))
        row[:n] = mask[:n]
    return torch.from_numpy(full).to(device)


def rank_batch(logprobs: torch.Tensor, seeds: list[int], steps: list[int], k: int,
               noise: list[bool] | None = None,
               masks: list[np.ndarray | None] | None = None) -> RankedBatch:
    """Gumbel-rank every row and bring the top ``k`` candidates to the host in one copy.

    ``seeds``/``steps``: per row; ``noise``: optional per-row flags, False for greedy rows
    (ranked by probability alone); ``masks``: optional per-row allowed masks (None for a row
    without one): those rows also get their best allowed token and log Z_A, in the same copy.
    """
    keys = gumbel_keys(logprobs, seeds, steps, noise)
    k = min(k, keys.shape[-1])
    top_keys, top_idx = keys.topk(k, dim=-1)
    top_lp = logprobs.gather(-1, top_idx)
    columns = [top_idx.to(torch.float64), top_lp.to(torch.float64), top_keys.to(torch.float64)]
    rows = [i for i, m in enumerate(masks or []) if m is not None]
    if rows:  # one more column: (best allowed token, log Z_A, its key)
        index = torch.tensor(rows, device=keys.device)
        allowed = _device_masks([masks[i] for i in rows], keys.shape[-1], keys.device)
        sub_keys = keys[index].masked_fill(~allowed, float("-inf"))
        best = sub_keys.argmax(-1, keepdim=True)
        log_mass = logprobs[index].masked_fill(~allowed, float("-inf")).logsumexp(-1,
                                                                                  keepdim=True)
        extra = [torch.full((keys.shape[0], 1), math.nan, dtype=torch.float64,
                            device=keys.device) for _ in range(3)]
        for column, values in zip(extra, (best, log_mass, sub_keys.gather(-1, best))):
            column[index] = values.to(torch.float64)
        columns = [torch.cat([c, e], dim=-1) for c, e in zip(columns, extra)]
    packed = torch.stack(columns).cpu().numpy()
    masked = None
    if rows:
        masked = [None] * keys.shape[0]
        for i in rows:
            masked[i] = (int(packed[0, i, k]), float(packed[1, i, k]),
                         bool(np.isfinite(packed[2, i, k])))
        packed = packed[:, :, :k]
    return RankedBatch(keys, logprobs, packed[0].astype(np.int64), packed[1],
                       np.isfinite(packed[2]), masked)


class CandidateStream:
    """One row's tokens in decreasing key order (a draw without replacement from p).

    ``next()`` returns ``(token, logprob)`` or ``None`` once every token with positive
    probability has been returned. ``exact(allowed)`` returns the token with the largest key
    among the allowed ids and the log of their total probability, or ``None`` if they have none.
    ``masked()``: the same for the mask the row brought to ``rank_batch``, computed there.
    ``device_seconds`` accumulates the time spent in device operations for this row.
    """

    def __init__(self, keys: torch.Tensor, logprobs: torch.Tensor, tokens: np.ndarray,
                 token_logprobs: np.ndarray, finite: np.ndarray,
                 masked: tuple[int, float, bool] | None = None):
        self._masked = masked
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

    def masked(self) -> tuple[int, float] | None:
        if self._masked is None:
            raise ValueError("this row brought no mask to rank_batch")
        token, log_mass, finite = self._masked
        return (token, log_mass) if finite else None

    def exact(self, allowed: np.ndarray) -> tuple[int, float] | None:
        t0 = time.perf_counter()
        mask_t = _device_masks([allowed], self._keys.shape[-1], self._keys.device)[0]
        keys = self._keys.masked_fill(~mask_t, float("-inf"))
        best = keys.argmax()
        log_mass = self._logprobs.masked_fill(~mask_t, float("-inf")).logsumexp(-1)
        out = torch.stack([best.to(torch.float64), keys[best].to(torch.float64),
                           log_mass.to(torch.float64)]).cpu().numpy()
        self.device_seconds += time.perf_counter() - t0
        if not np.isfinite(out[1]):
            return None
        return int(out[0]), float(out[2])
