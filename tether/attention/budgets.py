r"""Per-head KV budgets for TCA-Attention: what calibration finds and selection uses.

A head's budget is a keep-count profile: ``counts[r]`` tokens are kept in the selection block
ranked r-th by the redundancy score h (see ``tether.kernels.tca``), counts non-increasing,
each a power of two up to the block size (or 0). Calibration measures the profile on one
context of n blocks; a context of m blocks uses ``counts[floor(r * n / m)]`` for its r-th
block, so the profile is a distribution over rank quantiles.

Choosing a profile (``cheapest_counts``): given a head's token scores s (attention of the
last query, summing to 1), the mass kept by a choice c_b per block b is
``K(c) = sum_b top_{c_b}(s in b) + mass(sinks and window)``. Starting from one token per
block, the block whose doubling c_b -> 2 c_b gains the most mass per added token is doubled,
until ``K(c) >= tau``: the greedy solution of the knapsack "fewest tokens keeping tau of the
mass" over power-of-two counts (exact when each block's top-c mass is concave in c, which
sorted scores make it).
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from pathlib import Path

import torch

FORMAT = "tether-tca-budgets/1"
RECENT = 0.75  # share of a KV budget that ``plan`` gives the recent window
OBSERVE = 128  # calibration's default: last queries whose scores are pooled (select.pooled_scores)


class BudgetError(ValueError):
    """A budgets file that does not fit the model or is malformed."""


def cheapest_counts(scores: torch.Tensor, block: int, tau: float,
                    always_kept: torch.Tensor | None = None) -> list[int]:
    """The keep-count profile (non-increasing) of one head: see the module docstring."""
    return sorted(cheapest_assignment(scores, block, tau, always_kept), reverse=True)


def cheapest_assignment(scores: torch.Tensor, block: int, tau: float,
                        always_kept: torch.Tensor | None = None) -> list[int]:
    """Keep count of every block, in block order, chosen greedily (module docstring).

    ``scores [L]``: token scores of the head; ``always_kept [L]`` (bool): sinks and window,
    counted as kept and not charged to any block.
    """
    s = scores.double().clone()
    L = s.numel()
    kept = float(s[always_kept].sum()) if always_kept is not None else 0.0
    if always_kept is not None:
        s[always_kept] = 0.0
    nb = -(-L // block)
    padded = torch.nn.functional.pad(s, (0, nb * block - L)).view(nb, block)
    prefix = torch.cumsum(padded.sort(dim=1, descending=True).values, dim=1)  # top-c mass
    total = float(scores.double().sum())
    counts = [1] * nb
    kept += float(prefix[:, 0].sum())
    heap = []
    for b in range(nb):
        if block > 1:
            heapq.heappush(heap, (-float(prefix[b, 1] - prefix[b, 0]), b))
    while kept < tau * total and heap:
        _, b = heapq.heappop(heap)
        c = counts[b]
        kept += float(prefix[b, 2 * c - 1] - prefix[b, c - 1])
        counts[b] = 2 * c
        if 2 * c < block:
            nxt = float(prefix[b, 4 * c - 1] - prefix[b, 2 * c - 1]) / (2 * c)
            heapq.heappush(heap, (-nxt, b))
    return counts


def counts_for_blocks(profile: list[int], num_blocks: int) -> torch.Tensor:
    """Keep counts of the blocks ranked 0..num_blocks-1 under a profile measured on
    ``len(profile)`` blocks."""
    n = len(profile)
    ranks = torch.arange(num_blocks)
    return torch.tensor(profile)[(ranks * n // max(num_blocks, 1)).clamp_max(n - 1)]


@dataclass
class Budgets:
    """Calibrated budgets of one model: ``profiles[layer][kv_head]`` keep-count profiles."""

    model: str
    num_layers: int
    num_kv_heads: int
    tau: float
    block: int
    sinks: int
    window: int
    tokens: int
    profiles: list
    kept_fraction: list | None = None
    observe: int = 1  # files written before the observation window: the last query alone

    def to_dict(self) -> dict:
        return {"format": FORMAT, **self.__dict__}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path, *, num_layers: int | None = None,
             num_kv_heads: int | None = None, model: str | None = None) -> "Budgets":
        """Read and validate a budgets file; with the model's shape given, check it fits."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BudgetError(f"cannot read budgets file {path}: {exc}") from None
        if data.get("format") != FORMAT:
            raise BudgetError(f"{path}: not a TCA budgets file (format {data.get('format')!r}, "
                              f"expected {FORMAT!r})")
        data.pop("format")
        try:
            budgets = cls(**data)
        except TypeError as exc:
            raise BudgetError(f"{path}: {exc}") from None
        budgets.validate(path)
        if model is not None and budgets.model != model:
            raise BudgetError(f"{path} was calibrated for {budgets.model!r}, not {model!r}")
        if num_layers is not None and budgets.num_layers != num_layers:
            raise BudgetError(f"{path} has budgets for {budgets.num_layers} layers; the model "
                              f"has {num_layers}")
        if num_kv_heads is not None and budgets.num_kv_heads != num_kv_heads:
            raise BudgetError(f"{path} has budgets for {budgets.num_kv_heads} KV heads per "
                              f"layer; the model has {num_kv_heads}")
        return budgets

    def validate(self, where: str | Path = "budgets") -> None:
        if self.block < 1 or self.block & (self.block - 1):
            raise BudgetError(f"{where}: block must be a power of two, not {self.block}")
        if not 0 < self.tau <= 1:
            raise BudgetError(f"{where}: tau must be in (0, 1], not {self.tau}")
        if len(self.profiles) != self.num_layers:
            raise BudgetError(f"{where}: {len(self.profiles)} layers of profiles, "
                              f"num_layers says {self.num_layers}")
        for i, layer in enumerate(self.profiles):
            if len(layer) != self.num_kv_heads:
                raise BudgetError(f"{where}: layer {i} has {len(layer)} heads, num_kv_heads "
                                  f"says {self.num_kv_heads}")
            for h, prof in enumerate(layer):
                if not prof or any(not 0 <= c <= self.block for c in prof) or \
                        any(a < b for a, b in zip(prof, prof[1:])):
                    raise BudgetError(f"{where}: layer {i} head {h}: a profile must be a "
                                      f"non-empty non-increasing list of counts in "
                                      f"[0, {self.block}]")


def kept_tokens(profile: list[int], length: int, block: int, sinks: int, window: int) -> int:
    """Tokens a head keeps of a context of ``length`` under a profile (sinks and window
    counted once)."""
    nb = -(-length // block)
    return min(length, int(counts_for_blocks(profile, nb).sum()) + sinks + window)


def scale_profiles(budgets: "Budgets", length: int, fraction: float,
                   window: int | None = None) -> list:
    """Profiles scaled, one factor per layer, so that every layer keeps ``fraction`` of a
    context of ``length`` tokens and its heads share it in their calibrated proportions (a head
    that needed 3x the tokens of another still gets 3x). Counts are rounded and capped at the
    block size. ``window``: the recent window selection will keep, if not the calibrated one.
    (One factor for the whole model, spreading the budget by calibrated needs across layers,
    starved the later layers: KL 0.27 vs 0.22 at 20% on 1,024-token contexts.)"""
    window = budgets.window if window is None else window

    def scaled(layer: list, factor: float) -> list:
        return [[min(budgets.block, int(round(factor * c))) for c in prof] for prof in layer]

    def mean_kept(layer: list) -> float:
        kept = [kept_tokens(p, length, budgets.block, budgets.sinks, window) for p in layer]
        return sum(kept) / (len(kept) * length)

    def fit(layer: list) -> list:
        lo, hi = 0.0, float(budgets.block)
        for _ in range(40):
            mid = (lo + hi) / 2
            if mean_kept(scaled(layer, mid)) < fraction:
                lo = mid
            else:
                hi = mid
        return scaled(layer, hi)

    return [fit(layer) for layer in budgets.profiles]


def plan(budgets: "Budgets", length: int, fraction: float,
         recent: float = RECENT) -> tuple[list, int]:
    """What selection keeps of a context of ``length`` tokens under a KV budget of
    ``fraction``: ``(profiles, window)``. The recent window takes ``recent`` of the budget
    (at least the calibrated window); every layer gets ``fraction`` and its heads share the
    rest in their calibrated proportions (``scale_profiles``).

    Measured (bench/tca_quality.py, SmolLM2-135M): a quarter of the budget picked by scores
    and three quarters recent beats both a fixed 128-token window and StreamingLLM's all-recent
    cache at 20-60% on 4k and 8k contexts; the continuation leans on recent text."""
    window = min(length, max(budgets.window, int(recent * fraction * length)))
    return scale_profiles(budgets, length, fraction, window=window), window
