"""Ranked candidates: the device side of AWRS.

For a batch of rows, ``rank_batch`` takes each row's distribution p (log-probabilities, shaped
by the request's sampling parameters beforehand: ``tether.decode.shaping`` does it with vLLM's
operations), perturbs it with counter-based Gumbel noise and takes the ``k`` best keys of every
row, in batched operations (``gumbel.BlockKeys``: keys built from the top down, noise for the
blocks of 256 tokens and for the tokens of the k best blocks only). One copy brings those
candidates to the host. Each row then reads its candidates in key order through a
``CandidateStream``; only a row whose ``k`` candidates were all rejected goes back to the device
for more (twice as deep), and only the bounded-cost fallback asks the device for the exact
allowed mass (``exact``: a draw from p restricted to the mask and log Z_A, as for rows with a
mask below).

Rows that bring their constraint's full mask (exact weights, ``samplers.awrs.exact_weight``)
need no candidates: they get, in the same copy, a draw from p restricted to the mask and the
log of the allowed mass, log Z_A = log of the sum of p over the mask (``masked_draws``, one
pass over the vocabulary; ``CandidateStream.masked``). They skip the Gumbel noise, which on a
CPU costs more than the rest of the step's device work: at 32 rows of 49,152 tokens, ranking
with Gumbel keys and a masked logsumexp took 33-47 ms, the masked draw 5-8 ms.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from tether.samplers.gumbel import BlockKeys, mix_seed


@dataclass
class RankedBatch:
    """Device tensors of one step plus the host copy of each row's top candidates."""

    keys: BlockKeys | None  # Gumbel keys of the P rows without a mask (device)
    tokens: np.ndarray  # [B, k] int64, best keys first (rows with a mask: -1)
    token_logprobs: np.ndarray  # [B, k] float64
    finite: np.ndarray  # [B, k] bool: key > -inf (the token has positive probability)
    # per row with a mask: (its draw from p restricted to the mask, log Z_A, whether Z_A > 0)
    masked: list[tuple[int, float, bool] | None] | None = None
    key_rows: dict[int, int] | None = None  # row -> its row of ``keys`` (None: the same)

    @property
    def logprobs(self) -> torch.Tensor | None:
        """``[P, V]`` log-probabilities of the rows without a mask (device)."""
        return None if self.keys is None else self.keys.logprobs

    def stream(self, row: int) -> "CandidateStream":
        found = self.masked[row] if self.masked is not None else None
        if found is not None:
            return CandidateStream(None, -1, self.tokens[row, :0], self.token_logprobs[row, :0],
                                   self.finite[row, :0], found)
        key_row = row if self.key_rows is None else self.key_rows[row]
        return CandidateStream(self.keys, key_row, self.tokens[row], self.token_logprobs[row],
                               self.finite[row])


def _device_masks(masks: list[np.ndarray], vocab: int, device: torch.device,
                  dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """Constraint masks (over the tokenizer's ids) as one [len(masks), vocab] tensor on
    ``device`` (bool, or 0/1 of ``dtype``), in one copy of one byte per token; ids past the
    tokenizer's size (padding in the logits) are not allowed. The conversion to ``dtype`` runs
    on the device, from bytes (on a CPU, bool to float32 takes three times as long)."""
    full = np.zeros((len(masks), vocab), dtype=bool)
    for row, mask in zip(full, masks):
        n = min(vocab, len(mask))
        row[:n] = mask[:n]
    on_device = torch.from_numpy(full).to(device=device)
    return on_device if dtype == torch.bool else on_device.view(torch.uint8).to(dtype)


BLOCK = 256  # tokens per block of the two-level inverse CDF (``masked_draws``)


def draw_uniform(seed: int, step: int) -> float:
    """The uniform in [0, 1) of a masked row's draw: a pure function of (seed, step), like the
    Gumbel noise (53 bits of an independent hash)."""
    return (mix_seed(seed, step, 0x5EED) >> 10) * 2.0 ** -53


def _inverse_cdf(mass: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``mass`` (``[M, V]``, >= 0, unnormalized): the token x with
    CDF(x-) <= u Z < CDF(x), Z = the row's sum, u its uniform; so x has probability
    mass(x) / Z exactly. Returns (x, Z) in float64.

    Two levels keep it to one pass over the vocabulary: block sums (``BLOCK`` tokens, in the
    mass's own dtype: float32 sums of 256 terms err by about 1e-7 relative, the precision of
    the float32 logits themselves), their float64 cumulative sum picks the block, then the
    cumulative sum inside that one block picks the token. A block is picked only if its sum
    is positive, and inside it only a token of positive mass (the target stays strictly below
    the block's own total, which its float64 cumulative sum may round differently)."""
    rows, vocab = mass.shape
    pad = (-vocab) % BLOCK
    if pad:
        mass = torch.nn.functional.pad(mass, (0, pad))
    blocks = mass.view(rows, -1, BLOCK)
    cum = blocks.sum(-1).to(torch.float64).cumsum(-1)  # [M, blocks]
    z = cum[:, -1:]
    target = uniforms[:, None] * z
    block = torch.searchsorted(cum, target, right=True).clamp_(max=cum.shape[1] - 1)
    before = torch.where(block > 0, cum.gather(-1, (block - 1).clamp(min=0)), 0.0)
    inner = blocks.gather(1, block[:, :, None].expand(rows, 1, BLOCK))[:, 0]
    inner = inner.to(torch.float64).cumsum(-1)  # [M, BLOCK]
    rest = torch.minimum((target - before).clamp(min=0.0), inner[:, -1:] * (1.0 - 2.0 ** -40))
    offset = torch.searchsorted(inner, rest, right=True).clamp_(max=BLOCK - 1)
    return (block * BLOCK + offset)[:, 0].to(torch.float64), z[:, 0]


def masked_draws(scores: torch.Tensor, masks: list[np.ndarray],
                 uniforms: list[float]) -> torch.Tensor:
    """For each row: a draw from p restricted to its mask A, and log Z_A, on the device.

    ``scores``: ``[M, V]``, each row's log-probabilities up to a constant (shaped logits:
    p = softmax(scores)). Returns ``[3, M]`` float64: the token, log Z_A (Z_A = sum of p over
    A), and Z_A relative to the row's most probable token. One exp pass: e = exp(s - max s)
    (<= 1), then log Z_A = log sum_A e - log sum_V e and the draw is the inverse CDF of e * 1_A
    (``_inverse_cdf``). e underflows to 0 below about 1e-38 in float32, so a row whose allowed
    mass is that small relative to its top token loses it; ``rank_batch`` redoes such rows in
    log space (``_masked_draws_in_log_space``).
    """
    dev = scores.device
    allowed = _device_masks(masks, scores.shape[-1], dev, scores.dtype)
    top = scores.amax(-1, keepdim=True)
    e = (scores - top.clamp(min=torch.finfo(scores.dtype).min)).exp_()
    log_total = e.sum(-1).to(torch.float64).log()
    token, z = _inverse_cdf(e.mul_(allowed), torch.tensor(uniforms, dtype=torch.float64,
                                                          device=dev))
    return torch.stack([token, z.log() - log_total, z])


def _masked_draws_in_log_space(scores: torch.Tensor, masks: list[np.ndarray],
                               uniforms: list[float]) -> torch.Tensor:
    """``masked_draws`` for rows whose allowed mass underflows: e = exp(s - max_A s) on A only
    (so the largest allowed token has e = 1), and log Z_A = log sum_A e + max_A s - logsumexp s."""
    dev = scores.device
    allowed = _device_masks(masks, scores.shape[-1], dev)
    top = scores.masked_fill(~allowed, float("-inf")).amax(-1, keepdim=True)
    e = (scores - top.clamp(min=torch.finfo(scores.dtype).min)).masked_fill_(
        ~allowed, float("-inf")).exp_()
    token, z = _inverse_cdf(e, torch.tensor(uniforms, dtype=torch.float64, device=dev))
    log_z = z.log() + top[:, 0].to(torch.float64) - scores.logsumexp(-1).to(torch.float64)
    return torch.stack([token, log_z, z])


def _redo_underflows(draws: np.ndarray, scores: torch.Tensor, rows: list[int],
                     masks: list[np.ndarray], uniforms: list[float]) -> np.ndarray:
    """``draws`` (``masked_draws``'s host copy for ``rows`` of ``scores``) with the rows whose
    allowed mass, relative to their top token, is near float32's smallest normal (it may have
    lost terms to underflow) redone in log space."""
    floor = torch.finfo(scores.dtype).tiny * scores.shape[-1] * 1e8
    redo = [j for j in range(len(rows)) if draws[2, j] < floor]
    if redo:
        index = torch.tensor([rows[j] for j in redo], device=scores.device)
        draws[:, redo] = _masked_draws_in_log_space(
            scores[index], [masks[j] for j in redo], [uniforms[j] for j in redo]).cpu().numpy()
    return draws


def rank_batch(scores: torch.Tensor, seeds: list[int], steps: list[int], k: int,
               noise: list[bool] | None = None,
               masks: list[np.ndarray | None] | None = None) -> RankedBatch:
    """Gumbel-rank every row and bring the top ``k`` candidates to the host in one copy.

    ``scores``: ``[B, V]``, each row's log-probabilities up to a constant (rows without a mask
    are normalized here: their candidates carry log p). ``seeds``/``steps``: per row;
    ``noise``: optional per-row flags, False for greedy rows (ranked by probability alone);
    ``masks``: optional per-row allowed masks (None for a row without one): those rows get
    their draw from p restricted to the mask and log Z_A instead (``masked_draws``), in the
    same copy, and no candidates (they need none).
    """
    batch, vocab = scores.shape
    dev = scores.device
    masked_rows = [i for i, m in enumerate(masks or []) if m is not None]
    if any(noise is not None and not noise[i] for i in masked_rows):
        raise ValueError("a row with a mask is sampled: greedy rows bring no mask")
    plain = [i for i in range(batch) if masks is None or masks[i] is None]
    k = min(k, vocab)
    parts = []
    keys = None
    if plain:
        sub = scores if len(plain) == batch else scores[torch.tensor(plain, device=dev)]
        keys = BlockKeys(sub.log_softmax(-1), [seeds[i] for i in plain],
                         [steps[i] for i in plain],
                         None if noise is None else [noise[i] for i in plain])
        top_keys, top_idx = keys.top(k)
        top_lp = keys.logprobs.gather(-1, top_idx)
        parts.append(torch.stack([top_idx.to(torch.float64), top_lp.to(torch.float64),
                                  top_keys.to(torch.float64)]).flatten())
    uniforms = [draw_uniform(seeds[i], steps[i]) for i in masked_rows]
    if masked_rows:
        sub = scores if len(masked_rows) == batch else \
            scores[torch.tensor(masked_rows, device=dev)]
        parts.append(masked_draws(sub, [masks[i] for i in masked_rows], uniforms).flatten())
    packed = torch.cat(parts).cpu().numpy()  # the one copy
    tokens = np.full((batch, k), -1, dtype=np.int64)
    token_lp = np.full((batch, k), -np.inf)
    finite = np.zeros((batch, k), dtype=bool)
    if plain:
        cands = packed[: 3 * len(plain) * k].reshape(3, len(plain), k)
        tokens[plain] = cands[0].astype(np.int64)
        token_lp[plain] = cands[1]
        finite[plain] = np.isfinite(cands[2])
    masked = None
    if masked_rows:
        draws = _redo_underflows(packed[3 * len(plain) * k:].reshape(3, len(masked_rows)),
                                 scores, masked_rows, [masks[i] for i in masked_rows], uniforms)
        masked = [None] * batch
        for j, i in enumerate(masked_rows):
            found = bool(np.isfinite(draws[1, j]))
            masked[i] = (int(draws[0, j]) if found else -1, float(draws[1, j]), found)
    key_rows = None if len(plain) == batch else {i: j for j, i in enumerate(plain)}
    return RankedBatch(keys, tokens, token_lp, finite, masked, key_rows)


class CandidateStream:
    """One row's tokens in decreasing key order (a draw without replacement from p).

    ``next()`` returns ``(token, logprob)`` or ``None`` once every token with positive
    probability has been returned. ``exact(allowed)`` returns a draw from p restricted to
    the allowed ids (inverse CDF at a uniform seeded by the row's seed and step) and the log of
    their total probability (a greedy row: the most probable of them), or ``None`` if they
    have none; ``read()`` the tokens ``next()``
    returned (``samplers.awrs`` checks the mask against them). ``masked()``: the same draw for
    the mask the row brought to ``rank_batch``, computed there.
    ``device_seconds`` accumulates the time spent in device operations for this row.
    """

    def __init__(self, keys: BlockKeys | None, key_row: int, tokens: np.ndarray,
                 token_logprobs: np.ndarray, finite: np.ndarray,
                 masked: tuple[int, float, bool] | None = None):
        self._masked = masked
        self._keys = keys
        self._key_row = key_row
        self._full: torch.Tensor | None = None
        self._tokens = tokens
        self._logps = token_logprobs
        self._finite = finite
        self._pos = 0
        self.device_seconds = 0.0
        self.fetches = 0

    def _fetch_more(self) -> bool:
        have = len(self._tokens)
        vocab = self._keys.vocab
        if have >= vocab or not self._finite[-1]:
            return False
        t0 = time.perf_counter()
        depth = min(vocab, 2 * have)
        if self._full is None and 4 * depth < self._keys.block_keys.shape[1]:
            # a few more blocks: expand the best ``depth`` of them again
            row = torch.tensor([self._key_row], device=self._keys.logprobs.device)
            top_keys, top_idx = (t[0] for t in self._keys.top(depth, row))
        else:  # deep: every key of the row, expanded once
            if self._full is None:
                row = torch.tensor([self._key_row], device=self._keys.logprobs.device)
                self._full = self._keys.full(row)[0]
            top_keys, top_idx = self._full.topk(depth)
        top_lp = self._keys.logprobs[self._key_row].gather(-1, top_idx)
        packed = torch.stack([top_idx.to(torch.float64), top_lp.to(torch.float64),
                              top_keys.to(torch.float64)])[:, have:].cpu().numpy()
        self._tokens = np.concatenate([self._tokens, packed[0].astype(np.int64)])
        self._logps = np.concatenate([self._logps, packed[1]])
        self._finite = np.concatenate([self._finite, np.isfinite(packed[2])])
        self.device_seconds += time.perf_counter() - t0
        self.fetches += 1
        return True

    def _ranked(self) -> None:
        if self._keys is None:
            raise ValueError("a row that brought a mask has no candidates: read masked()")

    def next(self) -> tuple[int, float] | None:
        self._ranked()
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

    def read(self) -> list[int]:
        """The tokens ``next()`` has returned so far."""
        return [int(t) for t in self._tokens[: self._pos]]

    def exact(self, allowed: np.ndarray) -> tuple[int, float] | None:
        self._ranked()
        t0 = time.perf_counter()
        logprobs = self._keys.logprobs[self._key_row][None]
        if not self._keys.noisy[self._key_row]:  # greedy: the most probable allowed token
            mask_t = _device_masks([allowed], self._keys.vocab, logprobs.device)
            masked = logprobs.masked_fill(~mask_t, float("-inf"))
            token, log_mass = torch.stack([masked.argmax(-1).to(torch.float64),
                                           masked.logsumexp(-1).to(torch.float64)])[:, 0].tolist()
        else:
            u = draw_uniform(self._keys.seeds[self._key_row], 0xFA11)
            out = _redo_underflows(masked_draws(logprobs, [allowed], [u]).cpu().numpy(),
                                   logprobs, [0], [allowed], [u])
            token, log_mass = out[:2, 0].tolist()
        self.device_seconds += time.perf_counter() - t0
        if not math.isfinite(log_mass):
            return None
        return int(token), log_mass
