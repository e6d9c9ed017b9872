"""Test support: an operator's own vLLM logits processor, loaded into the test server with
``--logits-processors``. It bans the token ids a request lists in
``vllm_xargs: {"ban_token_ids": [...]}``: a request's other ``vllm_xargs`` must reach it under
the awrs sampler too (tests/test_serve.py)."""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality


class BanTokensProcessor(LogitsProcessor):
    @classmethod
    def validate_params(cls, params: Any) -> None:
        ids = (params.extra_args or {}).get("ban_token_ids")
        if ids is not None and not all(isinstance(i, int) for i in ids):
            raise ValueError("ban_token_ids must be a list of token ids")

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        self.bans: dict[int, list[int]] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.bans.pop(index, None)
        for index, params, _, _ in batch_update.added:
            ids = (params.extra_args or {}).get("ban_token_ids")
            if ids:
                self.bans[index] = list(ids)
            else:
                self.bans.pop(index, None)
        for a, b, direction in batch_update.moved:
            ban_a, ban_b = self.bans.pop(a, None), self.bans.pop(b, None)
            if ban_a is not None:
                self.bans[b] = ban_a
            if direction == MoveDirectionality.SWAP and ban_b is not None:
                self.bans[a] = ban_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, ids in self.bans.items():
            if index < logits.shape[0]:
                logits[index, ids] = float("-inf")
        return logits
