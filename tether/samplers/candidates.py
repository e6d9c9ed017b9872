"""Ranked candidates: the device side of AWRS.

For a batch of rows, ``rank_batch`` computes each row's distribution p (temperature, min-p,
top-k and top-p applied to the logits, then a log-softmax), perturbs it with counter-based Gumbel noise
(``gumbel.gumbel_keys``), and takes the ``k`` best keys of every row in one batched ``topk``.
One copy brings those candidates to the host. Each row then reads its candidates in key order
through a ``CandidateStream``; only a row whose ``k`` candidates were all rejected goes back to
the device for more (``topk`` again, twice as deep), and only the bounded-cost fallback asks the
device for the exact allowed mass (``exact``).

The order in which the request's sampling parameters shape p follows vLLM's sampler: the
penalties first, on the logits (``apply_penalties``: repetition, then frequency and presence),
then the logits are divided by the temperature, min-p drops tokens whose probability is below
min_p times the largest, top-k keeps the k largest, and top-p keeps the smallest set of
largest-probability tokens whose mass reaches p; the result is renormalized.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from tether.samplers.gumbel import gumbel_keys


def apply_penalties(logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int],
                    repetition: float, frequency: float, presence: float) -> torch.Tensor:
    """One row's logits (``[V]``) after vLLM's penalties, in vLLM's order.

    Repetition r: the logit of a token seen in the prompt or the output is divided by r where
    positive and multiplied by r where negative. Frequency f and presence q: a token's logit
    loses f times its count in the output, and q if it occurs there at all.
    """
    vocab = logits.shape[-1]
    device = logits.device
    out = torch.tensor([t for t in output_ids if 0 <= t < vocab], dtype=torch.int64,
                       device=device)
    counts = torch.zeros(vocab, dtype=logits.dtype, device=device)
    counts.index_add_(0, out, torch.ones_like(out, dtype=logits.dtype))
    logits = logits.clone()
    if repetition != 1.0:
        seen = counts > 0
        prompt = torch.tensor([t for t in prompt_ids if 0 <= t < vocab], dtype=torch.int64,
                              device=device)
        seen[prompt] = True
        penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, penalized, logits)
    if frequency != 0.0:
        logits -= frequency * counts
    if presence != 0.0:
        logits -= presence * (counts > 0).to(logits.dtype)
    return logits


def shape_logprobs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probabilities (``[B, V]``, the logits' dtype) after temperature, min-p, top-k and
    top-p.

    ``temperature``: ``[B]`` (> 0); ``top_k``: ``[B]`` int (0 or >= V means off); ``top_p``:
    ``[B]`` in (0, 1] (1 means off); ``min_p``: ``[B]`` in [0, 1] (0 means off). Filtered
    tokens get -inf.
    """
    scaled = logits / temperature[:, None].to(logits.dtype)
    if min_p is not None and bool((min_p > 0).any()):
        probs = scaled.softmax(dim=-1)
        floor = probs.amax(dim=-1, keepdim=True) * min_p[:, None].to(probs.dtype)
        scaled = scaled.masked_fill(probs < floor, float("-inf"))
    vocab = scaled.shape[-1]
    k = torch.where((top_k <= 0) | (top_k >= vocab), vocab, top_k).to(torch.int64)
    need_sort = bool(((k < vocab) | (top_p < 1.0)).any())
    if need_sort:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=scaled.device)[None, :]
        drop = ranks >= k[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        # keep a token if the mass strictly before it is below top_p (the first always stays)
        before = probs.cumsum(dim=-1) - probs
        drop = before >= top_p[:, None].to(probs.dtype)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)
    return scaled.log_softmax(dim=-1)


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
