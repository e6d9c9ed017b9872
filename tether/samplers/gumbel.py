"""Counter-based Gumbel noise: sampling without replacement as one batched device operation.

Adding independent Gumbel(0, 1) noise G_i to log-probabilities and sorting by the keys
k_i = log p_i + G_i gives a sample *without replacement* from p: the first key is a draw from p,
the second a draw from p with the first removed, and so on (the Gumbel-top-k trick). So the
first token of a set A in key order is an exact draw from p restricted to A, and the token with
the largest key among A is the same token.

The noise is a pure function of (seed, step, token id): a 32-bit integer hash (murmur3's
finalizer over a mix of the three) turned into a uniform u in (0, 1), then G = -log(-log u).
No generator state is carried, so every tensor-parallel rank, and a rerun with the same seed,
draws the same noise, on any device. 32 bits limit G to about [-3.1, 22.2]; the chance that any
of 262,144 tokens hits either end is below 1e-4 per step, far below what the tests can resolve.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer on int64 tensors holding values in [0, 2**32).

    Products can exceed 2**63 and wrap around; the low 32 bits are still exact.
    """
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def mix_seed(*parts: int) -> int:
    """Combine integers (request seed, particle index, ...) into one 32-bit seed, on the host."""
    h = 0
    for part in parts:
        h = int(_fmix32(torch.tensor([(h * 31 + (part & _MASK32) + _GOLDEN) & _MASK32]))[0])
    return h


def uniforms(seeds: torch.Tensor, steps: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, width]`` float64 uniforms in (0, 1), a pure function of (seed, step, column)."""
    device = seeds.device
    row = _fmix32((_fmix32(seeds.to(torch.int64) & _MASK32) + steps.to(torch.int64) * _GOLDEN)
                  & _MASK32)
    col = torch.arange(width, device=device, dtype=torch.int64)
    h = _fmix32((row[:, None] + col[None, :] * 0x27D4EB2F) & _MASK32)
    h = _fmix32(h ^ row[:, None])
    return (h.to(torch.float64) + 0.5) / 4294967296.0


def gumbel_keys(logprobs: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    """Keys ``logprobs + Gumbel noise`` (float64, ``[B, V]``); -inf log-probabilities stay -inf.

    ``noise``: optional ``[B]`` booleans; rows where it is False get no noise (greedy order).
    """
    gumbel = -torch.log(-torch.log(uniforms(seeds, steps, logprobs.shape[-1])))
    if noise is not None:
        gumbel = gumbel * noise[:, None].to(gumbel.dtype)
    return logprobs.to(torch.float64) + gumbel
