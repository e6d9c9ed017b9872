"""A request's sampling parameters applied to its logits with vLLM's own operations.

AWRS samples from the distribution vLLM's sampler would sample from, restricted to the allowed
tokens. So the shaping is vLLM's, in vLLM's order (``vllm.v1.sample.sampler.Sampler``):

1. penalties on the logits (``penalize``, vLLM's ``apply_all_penalties``): repetition r divides
   a positive logit of a token seen in the prompt or the output by r and multiplies a negative
   one by r; frequency f subtracts f times the token's count in the output; presence q
   subtracts q from every token that occurs in the output;
2. temperature T: logits / T;
3. min-p m: tokens whose probability is below m times the largest are dropped (vLLM's
   ``MinPLogitsProcessor`` rule; that processor keeps per-batch state, so the rule is applied
   here directly and ``tests/test_api.py`` checks it against the processor);
4. top-k and top-p (vLLM's ``apply_top_k_top_p``): top-k keeps the tokens whose logit is at
   least the k-th largest; top-p keeps the smallest set of largest-probability tokens whose
   mass reaches p.

Dropped tokens get -inf. The result is the log-probabilities AWRS draws from up to a constant
per row (``shape_logits`` does not normalize: ``samplers.candidates`` normalizes only where a
row needs it, since a full-vocabulary pass is the largest device cost of a step on a CPU).
The shapes are ``[B, V]`` with per-row parameters ``[B]``.
"""

from __future__ import annotations

import torch
from vllm.utils.torch_utils import make_tensor_with_pad
from vllm.v1.sample.ops.penalties import apply_all_penalties
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p


def penalize(logits: torch.Tensor, prompts: list[list[int]], outputs: list[list[int]],
             penalties: list[tuple[float, float, float]]) -> torch.Tensor:
    """``logits`` (``[B, V]``, fp32) after each row's (repetition, frequency, presence)
    penalties, given its prompt and output token ids. Returns a new tensor."""
    vocab = logits.shape[-1]
    # vLLM pads with the vocabulary size, an id that counts as no token
    prompt_t = make_tensor_with_pad([list(p) for p in prompts], pad=vocab, device="cpu",
                                    dtype=torch.int64).to(logits.device)
    rep, freq, pres = (torch.tensor(col, dtype=logits.dtype, device=logits.device)
                       for col in zip(*penalties))
    return apply_all_penalties(logits.clone(), prompt_t, pres, freq, rep,
                               [list(o) for o in outputs])


def shape_logits(logits: torch.Tensor, temperature: torch.Tensor | None, top_k: torch.Tensor,
                 top_p: torch.Tensor, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (``[B, V]``) after temperature, min-p, top-k and top-p, unnormalized.

    ``temperature``: ``[B]`` (> 0), or None where every row's is 1; ``top_k``: ``[B]`` int (0 or
    >= V means off); ``top_p``: ``[B]`` in (0, 1] (1 means off); ``min_p``: ``[B]`` in [0, 1]
    (0 means off). ``logits`` is never modified; the result may be ``logits`` itself when no
    parameter changes it.
    """
    scaled = logits if temperature is None else \
        logits / temperature[:, None].to(logits.dtype)
    if min_p is not None and bool((min_p > 0).any()):
        probs = scaled.softmax(dim=-1)
        floor = probs.amax(dim=-1, keepdim=True) * min_p[:, None].to(probs.dtype)
        scaled = scaled.masked_fill(probs < floor, float("-inf"))
    vocab = scaled.shape[-1]
    # vLLM's sampler gives a row without top-k the vocabulary size, and no tensor at all
    # to a batch without any
    k = torch.where((top_k <= 0) | (top_k >= vocab), vocab, top_k).to(torch.int64)
    k = k if bool((k < vocab).any()) else None
    p = top_p.to(scaled.dtype) if bool((top_p < 1.0).any()) else None
    if k is not None or p is not None:
        # vLLM's operation works in place: on a copy, never on the caller's logits
        scaled = apply_top_k_top_p(scaled.clone() if scaled is logits else scaled.contiguous(),
                                   k, p)
    return scaled
