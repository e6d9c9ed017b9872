"""Seeded Gumbel keys, built from the top down: sampling without replacement in one batched
device operation, with noise for a few hundred tokens per row instead of the vocabulary.

Adding independent Gumbel(0, 1) noise G_i to log-probabilities and sorting by the keys
k_i = log p_i + G_i gives a sample *without replacement* from p: the first key is a draw from p,
the second a draw from p with the first removed, and so on (the Gumbel-top-k trick). So the
first token of a set A in key order is an exact draw from p restricted to A, and the token with
the largest key among A is the same token.

Top down (``BlockKeys``). The vocabulary is cut into blocks of ``BLOCK`` tokens. The largest key
of block b is Gumbel(L_b), L_b = log sum of p over the block, and independent across blocks; given
that maximum M, the keys inside the block are drawn exactly by taking independent keys k_i
(T their maximum) and moving them under M:
k'_i = -log(exp(-M) - exp(-T) + exp(-k_i))   (Kool et al. 2019, stochastic beam search),
which keeps their order and gives the maximal token the key M. The joint law is that of
independent keys for every token. The k best keys of a row lie in its k best blocks (a token
outside them is beaten by k block maxima), so ranking needs noise for the blocks and for k
blocks' tokens only: at 100 rows of 49,152 tokens, 8 candidates, about 2,200 values per row
instead of 49,152. A deeper look (``top``) or the full keys (``full``) expand more blocks;
every block's keys are a pure function of the row's (seed, step) and the block, so each
expansion agrees with the others.

Noise is counter-based: the uniform of token (or block) j of a row is a hash of (seed, step, j)
computed with integer tensor operations (``hashed_uniforms``: murmur3's 32-bit finalizer, two
rounds keyed by the row's 64-bit seed), on whatever device holds the logits, for all rows at
once. No generator state exists: every tensor-parallel rank draws the same noise and forces the
same token, and a rerun with the same seed repeats itself. Uniforms have 32 bits, (h + 1/2) / 2^32.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
BLOCK = 256  # tokens per block of the top-down keys


def _fmix64(h: int) -> int:
    """murmur3's 64-bit finalizer (a bijection with full avalanche), on Python ints."""
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _MASK64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _MASK64
    return h ^ (h >> 33)


def mix_seed(*parts: int) -> int:
    """Combine integers (request seed, particle index, step, ...) into one 63-bit seed."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = _fmix64((h ^ (int(part) & _MASK64)) * 0x100000001B3 & _MASK64)
    return h >> 1


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for int64 tensors holding 32-bit values, without int64 overflow (the
    product is taken in 16-bit halves)."""
    low = (h & 0xFFFF) * c
    high = ((h >> 16) * c) & 0xFFFF
    return (low + (high << 16)) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer on int64 tensors holding 32-bit values."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def hashed_uniforms(row_seeds: torch.Tensor, index: torch.Tensor,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Uniforms in (0, 1) of ``dtype``: entry (r, j) a pure function of ``row_seeds[r]``
    (int64, 63-bit) and ``index[r, j]`` (int64, below 2^32)."""
    lo = (row_seeds & _MASK32)[:, None]
    hi = ((row_seeds >> 31) & _MASK32)[:, None]
    h = _fmix32((_mul32(index & _MASK32, 0x9E3779B1) + lo) & _MASK32)
    h = _fmix32((h ^ hi) + 0x7F4A7C15 & _MASK32)
    u = (h.to(torch.float64) + 0.5) * 2.0 ** -32
    # float32 rounds u near 1 up to 1 (whose Gumbel is inf): keep it below
    return u.to(dtype).clamp_(max=1.0 - torch.finfo(dtype).eps / 2)


def _gumbel(u: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(u))


def _log_expm1(x: torch.Tensor) -> torch.Tensor:
    """log(exp(x) - 1) for x >= 0, without overflow for large x (-inf at 0)."""
    big = x > 20.0
    return torch.where(big, x + torch.log1p(-torch.exp(-x.clamp(min=20.0))),
                       torch.log(torch.expm1(x.clamp(max=20.0))))


class BlockKeys:
    """The Gumbel keys of a batch of rows, built from the top down (see the module docstring).

    ``logprobs``: ``[P, V]`` normalized log-probabilities (device); ``seeds``/``steps``: per row;
    ``noise``: optional per-row flags, False for rows ranked by probability alone (greedy: a
    block's key is then its largest log-probability, a token's its log-probability).
    """

    def __init__(self, logprobs: torch.Tensor, seeds: list[int], steps: list[int],
                 noise: list[bool] | None = None):
        rows, vocab = logprobs.shape
        dev = logprobs.device
        self.vocab = vocab
        self.logprobs = logprobs
        pad = (-vocab) % BLOCK
        padded = torch.nn.functional.pad(logprobs, (0, pad), value=float("-inf")) if pad \
            else logprobs
        self.blocks = padded.view(rows, -1, BLOCK)  # [P, nb, BLOCK]
        self.seeds = [mix_seed(s, t) for s, t in zip(seeds, steps)]  # per row
        self.row_seeds = torch.tensor(self.seeds, dtype=torch.int64, device=dev)
        self.noisy = [True] * rows if noise is None else list(noise)  # per row
        self.noise = torch.tensor(self.noisy, device=dev)
        n_blocks = self.blocks.shape[1]
        mass = self.blocks.logsumexp(-1)  # L_b
        block_ids = torch.arange(n_blocks, device=dev).expand(rows, n_blocks)
        # block uniforms at indices 2^31 + b: apart from every token's index
        g = _gumbel(hashed_uniforms(self.row_seeds, block_ids + 2 ** 31, logprobs.dtype))
        greedy = self.blocks.amax(-1)
        self.block_keys = torch.where(self.noise[:, None], mass + g, greedy)  # [P, nb]

    def expand(self, rows: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """The keys of every token of ``blocks`` (``[R, n]``) of ``rows`` (``[R]``),
        ``[R, n, BLOCK]``: k' = M - log(1 + exp(M - T) expm1(T - k)), its stable form."""
        lp = self.blocks[rows[:, None], blocks]  # [R, n, BLOCK]
        index = blocks[:, :, None] * BLOCK + torch.arange(BLOCK, device=blocks.device)
        u = hashed_uniforms(self.row_seeds[rows], index.flatten(1), lp.dtype).view(index.shape)
        keys = lp + _gumbel(u)
        top = keys.amax(-1, keepdim=True)  # T
        m = self.block_keys[rows[:, None], blocks][:, :, None]  # M
        moved = m - torch.nn.functional.softplus((m - top) + _log_expm1(top - keys))
        moved = torch.where(keys == top, m, moved)  # the block's maximum gets M exactly
        moved = torch.where(torch.isfinite(lp), moved, float("-inf"))
        return torch.where(self.noise[rows][:, None, None], moved, lp)

    def top(self, depth: int, rows: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``depth`` best (keys, tokens) of ``rows`` (default all), best first:
        ``[R, depth]`` keys and int64 tokens (keys -inf past the tokens of positive
        probability)."""
        if rows is None:
            rows = torch.arange(self.block_keys.shape[0], device=self.block_keys.device)
        n_blocks = self.block_keys.shape[1]
        depth = min(depth, self.vocab)
        blocks = self.block_keys[rows].topk(min(depth, n_blocks), dim=-1).indices
        keys = self.expand(rows, blocks).flatten(1)
        tokens = (blocks[:, :, None] * BLOCK
                  + torch.arange(BLOCK, device=blocks.device)).flatten(1)
        best, at = keys.topk(depth, dim=-1)
        return best, tokens.gather(-1, at)

    def full(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Every token's key, ``[R, V]``."""
        if rows is None:
            rows = torch.arange(self.block_keys.shape[0], device=self.block_keys.device)
        n_blocks = self.block_keys.shape[1]
        blocks = torch.arange(n_blocks, device=rows.device).expand(len(rows), n_blocks)
        return self.expand(rows, blocks).flatten(1)[:, : self.vocab]

