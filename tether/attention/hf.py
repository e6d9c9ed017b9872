"""TCA selection inside transformers models, for calibration and the quality harness.

``load_model(name)`` loads a causal LM with the attention implementation ``"tether_tca"``:
SDPA as usual, plus two hooks driven by the active ``Probe`` (``with probe: model(...)``):

* ``probe.on_last_queries(layer, queries, keys, scaling, visible)`` sees every layer's last
  ``probe.observe`` queries ``[B, w, H, D]``, keys ``[B, Hkv, L, D]`` (after RoPE) and which
  keys each of those queries may see ``[B, w, L]``, on each forward: calibration records the
  scores, selection picks the tokens to keep;
* ``probe.keep[layer]``, a bool mask ``[B, Hkv, L0]`` over the first L0 cached positions,
  hides the others from every later query of that layer: the same outputs as dropping them
  from the cache.

No probe active: plain SDPA.
"""

from __future__ import annotations

import torch

_ACTIVE: "Probe | None" = None
NAME = "tether_tca"


class Probe:
    """Base class: does nothing. Subclasses override ``on_last_queries``; ``observe`` is how
    many of the last queries they see."""

    def __init__(self, observe: int = 1) -> None:
        self.keep: dict[int, torch.Tensor] = {}
        self.record = True
        self.observe = observe

    def __enter__(self) -> "Probe":
        global _ACTIVE
        self._previous, _ACTIVE = _ACTIVE, self
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        _ACTIVE = self._previous

    def on_last_queries(self, layer: int, queries: torch.Tensor, keys: torch.Tensor,
                        scaling: float, visible: torch.Tensor) -> None:
        pass


def _repeat(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _as_bool(mask: torch.Tensor | None, q_len: int, k_len: int, device) -> torch.Tensor:
    """Visibility ``[B or 1, 1, q_len, k_len]`` (True = attend) from a transformers mask."""
    if mask is None:  # causal, the queries being the last q_len positions
        q_pos = torch.arange(k_len - q_len, k_len, device=device)
        return (torch.arange(k_len, device=device)[None, :] <= q_pos[:, None])[None, None]
    if mask.dtype == torch.bool:
        return mask[..., -k_len:]
    return mask[..., -k_len:] > torch.finfo(mask.dtype).min / 2


def attention(module, query, key, value, attention_mask, dropout: float = 0.0,
              scaling: float | None = None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    probe, layer = _ACTIVE, module.layer_idx
    if probe is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    B, H, q_len, D = query.shape
    k_len = key.shape[2]
    scaling = D ** -0.5 if scaling is None else scaling
    visible = _as_bool(attention_mask, q_len, k_len, query.device)
    if probe.record:
        w = min(probe.observe, q_len)
        probe.on_last_queries(layer, query[:, :, -w:].transpose(1, 2), key, scaling,
                              visible[:, 0, -w:])
    keep = probe.keep.get(layer)
    if keep is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    groups = H // key.shape[1]
    full = torch.ones(B, key.shape[1], k_len, dtype=torch.bool, device=query.device)
    full[:, :, :keep.shape[-1]] = keep
    mask = visible & _repeat(full, groups)[:, :, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, _repeat(key, groups), _repeat(value, groups), attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def load_model(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) with TCA hooks, from a registered name, HF directory or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tether.models import resolve

    register()
    path = resolve(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=NAME)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(path)


def kv_shape(config) -> tuple[int, int]:
    """(layers, KV heads) of a transformers config (text part for multimodal ones)."""
    config = getattr(config, "text_config", None) or config
    layers = config.num_hidden_layers
    return layers, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
