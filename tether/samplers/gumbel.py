"""Seeded Gumbel noise: sampling without replacement as one batched device operation.

Adding independent Gumbel(0, 1) noise G_i to log-probabilities and sorting by the keys
k_i = log p_i + G_i gives a sample *without replacement* from p: the first key is a draw from p,
the second a draw from p with the first removed, and so on (the Gumbel-top-k trick). So the
first token of a set A in key order is an exact draw from p restricted to A, and the token with
the largest key among A is the same token.

Each row's noise comes from the device's own generator (Philox on CUDA, Mersenne Twister on the
CPU) seeded with a hash of (particle seed, step), so it is a pure function of those two numbers:
every tensor-parallel rank draws the same noise and forces the same token, and a rerun with the
same seed repeats itself. No generator state carries over between steps.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


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


_GENERATORS: dict[torch.device, torch.Generator] = {}


def gumbel_noise(seeds: list[int], steps: list[int], width: int, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[B, width]`` Gumbel(0, 1) noise; row i is a pure function of (seeds[i], steps[i])."""
    device = torch.device(device)
    gen = _GENERATORS.get(device)
    if gen is None:
        gen = _GENERATORS[device] = torch.Generator(device=device)
    out = torch.empty(len(seeds), width, device=device, dtype=dtype)
    for i, (seed, step) in enumerate(zip(seeds, steps)):
        gen.manual_seed(mix_seed(seed, step))
        out[i].uniform_(generator=gen)
    tiny = torch.finfo(dtype).tiny
    return out.clamp_(min=tiny).log_().neg_().log_().neg_()


def gumbel_keys(logprobs: torch.Tensor, seeds: list[int], steps: list[int],
                noise: list[bool] | None = None) -> torch.Tensor:
    """Keys ``logprobs + Gumbel noise`` (``[B, V]``); -inf log-probabilities stay -inf.

    ``noise``: optional per-row flags; rows where it is False get no noise (greedy order).
    """
    gumbel = gumbel_noise(seeds, steps, logprobs.shape[-1], logprobs.device, logprobs.dtype)
    if noise is not None and not all(noise):
        gumbel *= torch.tensor(noise, device=logprobs.device, dtype=gumbel.dtype)[:, None]
    return logprobs + gumbel
