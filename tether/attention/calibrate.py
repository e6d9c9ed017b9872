"""Offline TCA calibration: one forward pass, one keep-count profile per layer and KV head.

The last ``observe`` tokens of the calibration text query every layer; their attention,
averaged over the queries and over each KV head's group of query heads, gives the token scores
(as ``select.pooled_scores`` computes them for selection); ``budgets.cheapest_counts`` turns them
into the cheapest profile keeping ``tau`` of the mass (sinks and recent window included).
Without a text, the model writes its own (sampled from it with a fixed seed): data-free
calibration on the model's own distribution.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tether.attention.budgets import OBSERVE, Budgets, cheapest_counts
from tether.attention.hf import Probe, _repeat, kv_shape, load_model
from tether.kernels.tca import token_scores


class ScoreRecorder(Probe):
    """Keeps each layer's token scores ``[Hkv, L]`` of the last ``observe`` queries, pooled
    as selection pools them (``select.pooled_scores``), of batch row 0."""

    def __init__(self, observe: int = 1) -> None:
        super().__init__(observe)
        self.scores: dict[int, torch.Tensor] = {}

    def on_last_queries(self, layer, queries, keys, scaling, visible):
        B, w, H, _ = queries.shape
        Hkv = keys.shape[1]
        z = torch.einsum("bwhd,bhld->bwhl", queries.float(), _repeat(keys.float(), H // Hkv))
        z = (z * scaling).masked_fill(~visible[:, :, None, :], float("-inf"))
        scores = token_scores(z.reshape(B * w, H, -1), Hkv).view(B, w, Hkv, -1).mean(dim=1)
        self.scores[layer] = scores[0].cpu()


def calibration_ids(model, tokenizer, text: str | None, tokens: int, seed: int) -> torch.Tensor:
    if text is not None:
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
        return ids
    print(f"tether calibrate: no --text; sampling {tokens} tokens from the model itself "
          "(data-free calibration)", file=sys.stderr)
    torch.manual_seed(seed)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else \
        tokenizer.eos_token_id
    prompt = torch.tensor([[start]], device=model.device)
    with torch.no_grad():
        return model.generate(prompt, do_sample=True, top_p=0.95, max_new_tokens=tokens - 1,
                              min_new_tokens=tokens - 1, pad_token_id=start).cpu()


def calibrate(model_name: str, *, tau: float = 0.9, block: int = 128, text: str | None = None,
              tokens: int = 2048, sinks: int = 4, window: int = 128, observe: int = OBSERVE,
              seed: int = 0, device: str = "cpu") -> Budgets:
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], not {tau}")
    if block < 1 or block & (block - 1):
        raise ValueError(f"--block must be a power of two, not {block}")
    model, tokenizer = load_model(model_name, device=device)
    ids = calibration_ids(model, tokenizer, text, tokens, seed)
    L = ids.shape[1]
    if L < 2 * block:
        raise ValueError(f"the calibration text has {L} tokens; at least two blocks "
                         f"({2 * block} tokens) are needed")
    recorder = ScoreRecorder(observe)
    with recorder, torch.no_grad():
        model(ids.to(model.device))
    layers, kv_heads = kv_shape(model.config)
    pos = torch.arange(L)
    always = (pos < sinks) | (pos >= L - window)
    profiles, kept = [], []
    for layer in range(layers):
        scores = recorder.scores[layer]
        profiles.append([cheapest_counts(scores[h], block, tau, always)
                         for h in range(kv_heads)])
        kept.append([round((sum(p) + int(always.sum())) / L, 4) for p in profiles[-1]])
    return Budgets(model=model_name, num_layers=layers, num_kv_heads=kv_heads, tau=tau,
                   block=block, sinks=sinks, window=window, observe=observe, tokens=L,
                   profiles=profiles,
                   kept_fraction=kept)


def calibrate_to_file(model_name: str, out: str | Path, **kwargs) -> Budgets:
    budgets = calibrate(model_name, **kwargs)
    budgets.save(out)
    return budgets
