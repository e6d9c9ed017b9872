"""What the engines' workers hold for the caller: the per-particle records the AWRS logits
processor writes, and compiled constraints; and how callers reach both.

Where records live. The processor runs inside vLLM's workers; each worker process keeps a
module-level store, keyed by the particle's request id. A record holds one entry per decoding
step (token, log weight, checks, times), the weights it computes (exact or estimated), the
step at which the particle died, a failure
(``budget`` or ``error``) if its constraint could not be checked, and the data-parallel rank of
the engine that computed it.

How they reach the SMC driver, under every layout. The driver asks the workers of *every*
engine it talks to, in one call per round (``tether_exchange``: read the new steps of live
particles, pop the records of finished ones), and merges the answers:

* tensor parallel: every rank of an engine computes the same record (same logits, same seeded
  noise); the answers must agree (``merge``), else the ranks' KV caches would diverge;
* pipeline parallel: only the last stage samples, so only its ranks hold records; the other
  ranks answer without them, and holders alone are compared;
* data parallel (internal load balancing, one or several nodes): a record lives in exactly one
  engine; vLLM's data-parallel client answers ``collective_rpc`` with the first engine's result
  only, so the call goes to each engine itself (``call_utility_all_async``);
* external or hybrid load balancing: each API server talks only to its own engines, which are
  the engines its requests ran on.

This design was chosen over carrying weights inside vLLM's outputs (which have no field for
them; logprobs would have to be repurposed, breaking the ``logprobs`` a user asks for) and over
pinning a whole population to one engine (which would stop a large population from spreading
over engines). Its cost is one call per engine per round, made only when some particle needs
reading: populations of one particle read once, when their particle finishes.

Never a silent default: a particle whose record is missing or lacks a step is an error for its
request (``smc.SMCDriver`` checks completeness), never a weight of 1.

Steps of discarded samples. A step computed for a sample that vLLM then discards (a partial
prefill chunk) is overwritten when the step is computed for real, so the entries for steps
0..n-1 of an output with n tokens are exactly the decisions behind it.

Compiling before a request reaches the engine. A constraint the engine has not seen would be
compiled inside an engine step (``processor._Row``), holding every request of the batch for as
long as that takes. So the server first asks every worker to compile it (``prepare_async``):
each worker compiles in a background thread of its own (one at a time) while the engine keeps
stepping, and answers ``ready`` once the constraint is in its compile cache; only then are the
particles submitted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import math
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

MAX_RECORDS = 65536  # the oldest unread records are dropped past this (a safety net only)


@dataclass
class StepRecord:
    token: int  # the token forced at this step (a stop token for a dead or failed particle)
    log_weight: float  # log W of this step (0.0 for lcd/greedy; -inf for a dead particle)
    checks: int
    rejections: int
    exact: bool  # finished by the full mask (bounded-cost mode)
    untruncated: bool  # redone without top-k/top-p/min-p, which left no allowed token
    constraint_s: float  # host time spent in the constraint
    device_s: float  # time in device operations attributed to this row


@dataclass
class ParticleRecord:
    key: str
    steps: dict[int, StepRecord] = field(default_factory=dict)
    dead_step: int | None = None  # first step at which every token was rejected
    # {"reason": "budget" | "error", "message": ..., "step": ...}: the constraint could not
    # be checked (its time budget ran out, or it raised); the particle was ended at that step
    failure: dict | None = None
    engine: int | None = None  # data-parallel rank of the engine that computed it
    weights: str | None = None  # "exact" | "estimate" | None (no weight: lcd, greedy)

    def summary(self, n_tokens: int | None = None) -> dict:
        """Totals over steps ``0..n_tokens-1`` (all recorded steps if None)."""
        if n_tokens is None:
            n_tokens = (max(self.steps) + 1) if self.steps else 0
        steps = [self.steps[i] for i in range(n_tokens) if i in self.steps]
        log_weights = [s.log_weight for s in steps]
        checks = sum(s.checks for s in steps)
        dead = self.dead_step is not None and self.dead_step < max(n_tokens, 1)
        return {
            "key": self.key,
            "log_weight": -math.inf if dead else math.fsum(log_weights),
            "step_log_weights": log_weights,
            "tokens": len(steps),
            "weights": self.weights,
            "checks": checks,
            "checks_per_token": checks / len(steps) if steps else 0.0,
            "rejections": sum(s.rejections for s in steps),
            "exact_steps": sum(s.exact for s in steps),
            "untruncated_steps": sum(s.untruncated for s in steps),
            "constraint_s": sum(s.constraint_s for s in steps),
            "device_s": sum(s.device_s for s in steps),
            "dead": dead,
            "failure": self.failure,
        }

    def to_dict(self, since: int = 0) -> dict:
        return {"key": self.key, "dead_step": self.dead_step, "failure": self.failure,
                "engine": self.engine, "weights": self.weights,
                "steps": {i: asdict(s) for i, s in self.steps.items() if i >= since}}

    @classmethod
    def from_dict(cls, d: dict) -> "ParticleRecord":
        return cls(d["key"], {int(i): StepRecord(**s) for i, s in d["steps"].items()},
                   d["dead_step"], d["failure"], d["engine"], d.get("weights"))


# -- the worker side ------------------------------------------------------------------------------

_STORE: "OrderedDict[str, ParticleRecord]" = OrderedDict()
_LOCK = threading.Lock()


def record_for(key: str, engine: int | None = None) -> ParticleRecord:
    """The record for ``key``, created on first use (processor side)."""
    with _LOCK:
        rec = _STORE.get(key)
        if rec is None:
            rec = _STORE[key] = ParticleRecord(key, engine=engine)
            while len(_STORE) > MAX_RECORDS:
                _STORE.popitem(last=False)
        return rec


def exchange_local(read: dict[str, int], pop: list[str]) -> dict[str, dict]:
    """Steps at or after ``read[key]`` of those records (left in place), and the whole records
    of ``pop`` (removed). Keys this worker does not hold are absent from the answer."""
    out = {}
    with _LOCK:
        for key, since in read.items():
            rec = _STORE.get(key)
            if rec is not None:
                out[key] = rec.to_dict(since)
        for key in pop:
            rec = _STORE.pop(key, None)
            if rec is not None:
                out[key] = rec.to_dict()
    return out


def count_local() -> int:
    with _LOCK:
        return len(_STORE)


_COMPILER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tether-prepare")
_PREPARED: "OrderedDict[str, concurrent.futures.Future]" = OrderedDict()
MAX_PREPARED = 256  # the compile cache (constraints.base) holds 512


def prepare_local(tokenizer: str, specs: list[dict]) -> list[str]:
    """For each wire spec: "ready" (compiled in this process), "pending" (compiling in the
    background), or "error: ..." (it failed to compile here)."""
    from tether.constraints import Spec, compile_constraint, vocab_for

    answers = []
    with _LOCK:
        for wire in specs:
            key = hashlib.sha256(json.dumps(wire, sort_keys=True).encode()).hexdigest()
            future = _PREPARED.get(key)
            if future is None:
                future = _PREPARED[key] = _COMPILER.submit(
                    lambda w=wire: compile_constraint(Spec.from_wire(w), vocab_for(tokenizer)))
                while len(_PREPARED) > MAX_PREPARED:
                    _PREPARED.popitem(last=False)
            _PREPARED.move_to_end(key)
            if not future.done():
                answers.append("pending")
            elif future.exception() is not None:
                answers.append(f"error: {future.exception()}")
            else:
                answers.append("ready")
    return answers


class TetherWorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``) to reach the records by RPC."""

    def tether_exchange(self, read: dict[str, int], pop: list[str]) -> dict[str, dict]:
        return exchange_local(read, pop)

    def tether_count_records(self) -> int:
        return count_local()

    def tether_prepare(self, specs: list[dict]) -> list[str]:
        return prepare_local(self.vllm_config.model_config.tokenizer, specs)


# -- the caller side ------------------------------------------------------------------------------

def _decisions(raw: dict) -> tuple:
    return (raw["dead_step"], {int(i): (s["token"], s["log_weight"])
                               for i, s in raw["steps"].items()})


def merge(answers: list[dict]) -> dict[str, ParticleRecord]:
    """One record per key from the answers of many workers (all engines, all ranks).

    Workers that hold a key must agree on its decisions (tokens and weights): tensor-parallel
    ranks compute the same record. Raises ``RuntimeError`` if they do not.
    """
    merged: dict[str, dict] = {}
    for worker, answer in enumerate(answers):
        for key, raw in answer.items():
            first = merged.get(key)
            if first is None:
                merged[key] = raw
            elif _decisions(first) != _decisions(raw):
                raise RuntimeError(f"worker {worker} forced other tokens than another worker "
                                   f"for particle {key} (tensor-parallel ranks disagree)")
    return {k: ParticleRecord.from_dict(v) for k, v in merged.items()}


def exchange(llm_engine, read: dict[str, int], pop: list[str]) -> dict[str, ParticleRecord]:
    """``tether_exchange`` on every worker of a synchronous ``LLMEngine`` (one engine)."""
    if not read and not pop:
        return {}
    return merge(llm_engine.collective_rpc("tether_exchange", args=(dict(read), list(pop))))


async def exchange_async(async_llm, read: dict[str, int],
                         pop: list[str]) -> dict[str, ParticleRecord]:
    """``tether_exchange`` on every worker of every engine behind an ``AsyncLLM``."""
    if not read and not pop:
        return {}
    per_engine = await _all_engines(async_llm, "tether_exchange", (dict(read), list(pop)))
    return merge([worker for engine in per_engine for worker in engine])


async def count_async(async_llm) -> int:
    """Records held by every engine's workers (first rank of each engine)."""
    per_engine = await _all_engines(async_llm, "tether_count_records", ())
    return sum(workers[0] if workers else 0 for workers in per_engine)


async def prepare_async(async_llm, specs: list[dict], timeout: float) -> None:
    """Return once every worker of every engine has compiled ``specs`` (wire specs); polls
    with a growing interval. Raises ``RuntimeError`` if a worker fails to compile one (the
    caller compiled it already, so that is a worker's fault) and ``TimeoutError`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    wait = 0.002
    while True:
        answers = [a for engine in await _all_engines(async_llm, "tether_prepare", (specs,))
                   for worker in engine for a in worker]
        failed = [a for a in answers if a.startswith("error")]
        if failed:
            raise RuntimeError(f"an engine could not compile the constraint ({failed[0]})")
        if all(a == "ready" for a in answers):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the engines took over {timeout:.0f} s to compile the "
                               "constraint")
        await asyncio.sleep(wait)
        wait = min(0.05, wait * 2)


async def _all_engines(async_llm, method: str, args: tuple) -> list[list]:
    # vLLM 0.32: AsyncLLM.collective_rpc answers with the first engine's workers only under
    # data parallelism; the core client's call_utility_all_async asks each engine it manages.
    core = async_llm.engine_core
    return await core.call_utility_all_async("collective_rpc", method, None, args, None)
