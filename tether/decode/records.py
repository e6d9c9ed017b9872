"""Per-particle records written by the AWRS logits processor, and how callers read them.

The processor runs inside vLLM's workers, each of which keeps a module-level store. The caller
reaches it through ``TetherWorkerExtension.tether_pop_records`` via ``collective_rpc``, which
works both with the engine in the caller's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and
with worker processes (every tensor-parallel rank computes the same records; the first answer
is used).

A record keeps one entry per step, keyed by the step index. A step computed for a sample that
vLLM then discards (a partial prefill chunk) is overwritten when the step is computed for real,
so the entries for steps 0..n-1 of an output with n tokens are exactly the decisions behind it;
``ParticleRecord.summary(n)`` truncates to those.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

MAX_RECORDS = 65536  # the oldest unread records are dropped past this


@dataclass
class StepRecord:
    token: int  # the token forced at this step (a stop token for a dead particle)
    log_weight: float  # log W of this step (0.0 for lcd/greedy; -inf for a dead particle)
    checks: int
    rejections: int
    exact: bool  # finished by the full mask (bounded-cost mode)
    untruncated: bool  # redone without top-k/top-p, which left no allowed token
    constraint_s: float  # host time spent in the constraint
    device_s: float  # time in device operations attributed to this row


@dataclass
class ParticleRecord:
    key: str
    steps: dict[int, StepRecord] = field(default_factory=dict)
    dead_step: int | None = None  # first step at which every token was rejected
    error: str | None = None  # an output token the constraint refused (should not happen)

    def summary(self, n_tokens: int | None = None) -> dict:
        """Totals over steps ``0..n_tokens-1`` (all recorded steps if None)."""
        if n_tokens is None:
            n_tokens = (max(self.steps) + 1) if self.steps else 0
        steps = [self.steps[i] for i in range(n_tokens) if i in self.steps]
        log_weights = [s.log_weight for s in steps]
        dead = self.dead_step is not None and self.dead_step < max(n_tokens, 1)
        return {
            "key": self.key,
            "log_weight": -math.inf if dead else math.fsum(log_weights),
            "step_log_weights": log_weights,
            "tokens": len(steps),
            "checks": sum(s.checks for s in steps),
            "rejections": sum(s.rejections for s in steps),
            "exact_steps": sum(s.exact for s in steps),
            "untruncated_steps": sum(s.untruncated for s in steps),
            "constraint_s": sum(s.constraint_s for s in steps),
            "device_s": sum(s.device_s for s in steps),
            "dead": dead,
            "error": self.error,
        }

    def to_dict(self) -> dict:
        return {"key": self.key, "dead_step": self.dead_step, "error": self.error,
                "steps": {i: asdict(s) for i, s in self.steps.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "ParticleRecord":
        return cls(d["key"], {int(i): StepRecord(**s) for i, s in d["steps"].items()},
                   d["dead_step"], d["error"])


_STORE: "OrderedDict[str, ParticleRecord]" = OrderedDict()
_LOCK = threading.Lock()


def record_for(key: str) -> ParticleRecord:
    """The record for ``key``, created on first use (processor side)."""
    with _LOCK:
        rec = _STORE.get(key)
        if rec is None:
            rec = _STORE[key] = ParticleRecord(key)
            while len(_STORE) > MAX_RECORDS:
                _STORE.popitem(last=False)
        return rec


def pop_local(keys: list[str]) -> dict[str, dict]:
    with _LOCK:
        return {k: _STORE.pop(k).to_dict() for k in keys if k in _STORE}


def pop_records(llm_engine, keys: list[str]) -> dict[str, ParticleRecord]:
    """Remove and return the records of ``keys`` from the engine's workers.

    Works in-process and across processes alike: the engine is built with
    ``worker_extension_cls=TetherWorkerExtension`` and answers ``collective_rpc``.
    """
    answers = llm_engine.collective_rpc("tether_pop_records", args=(list(keys),))
    check_ranks_agree(answers)
    raw = answers[0] if answers else {}
    return {k: ParticleRecord.from_dict(v) for k, v in raw.items()}


def _decisions(raw: dict) -> dict:
    return {k: (v["dead_step"], {i: (s["token"], s["log_weight"]) for i, s in v["steps"].items()})
            for k, v in raw.items()}


def check_ranks_agree(answers: list[dict]) -> None:
    """Raise if tensor-parallel ranks made different decisions (tokens or weights).

    Every rank runs the sampler on the same logits with the same seeded noise, so they must
    agree; if they did not, their KV caches would silently diverge.
    """
    if len(answers) < 2:
        return
    first = _decisions(answers[0])
    for rank, other in enumerate(answers[1:], start=1):
        if _decisions(other) != first:
            raise RuntimeError(f"tensor-parallel rank {rank} forced other tokens than rank 0")


def read_local(since: dict[str, int]) -> dict[str, dict]:
    """Steps at or after ``since[key]`` of each record, without removing anything."""
    out = {}
    with _LOCK:
        for key, start in since.items():
            rec = _STORE.get(key)
            if rec is not None:
                out[key] = {"dead_step": rec.dead_step, "error": rec.error,
                            "steps": {i: asdict(s) for i, s in rec.steps.items() if i >= start}}
    return out


def read_steps(llm_engine, since: dict[str, int]) -> dict[str, ParticleRecord]:
    """The steps recorded since ``since[key]`` for each key (the records stay in place)."""
    answers = llm_engine.collective_rpc("tether_read_steps", args=(dict(since),))
    check_ranks_agree(answers)
    raw = answers[0] if answers else {}
    return {k: ParticleRecord.from_dict(dict(v, key=k)) for k, v in raw.items()}


class TetherWorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``) to read records across processes."""

    def tether_pop_records(self, keys: list[str]) -> dict[str, dict]:
        return pop_local(keys)

    def tether_read_steps(self, since: dict[str, int]) -> dict[str, dict]:
        return read_local(since)
