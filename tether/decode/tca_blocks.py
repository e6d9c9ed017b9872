"""TCA-Attention in the engine, scheduler half: when a request compacts, and the block surgery.

A decoding request holds the KV of logical positions ``[P, L)`` in the *last* blocks of its
block row (``docs/tca-engine.md``, "Layout"). Compacting it from ``P_old`` to ``P_new`` (both
multiples of the block size ``bs``) does three things to vLLM's ``KVCacheManager``:

- the row entries of logical blocks ``[P_old/bs, P_new/bs)`` become the pool's ``null_block``
  and their blocks are freed, as sliding-window attention frees blocks that left its window.
  The row keeps its logical length, so the scheduler's arithmetic (blocks needed =
  ``cdiv(tokens, bs) - len(row)``), slot mapping and RoPE positions stay logical;
- the kept blocks (from ``P_new/bs`` on) are about to be rewritten by the worker: their hashes
  leave the prefix cache, and nothing of the request is hashed again (its KV is now pruned
  attention's, no valid prefix). A freed leading block was only read, so its hash stays valid
  and may serve later prefix hits;
- a :class:`CompactionOrder` tells the worker what to move: it reads the kept tokens of
  ``[P_old, L)`` from the row as it was *before* the surgery, in this same step, and writes
  them into ``[P_new, L)``.

A shared destination block (``ref_cnt > 1``, e.g. SMC particles sharing a prompt) is never
written: the compaction is deferred until the block is private.

**When.** ``decide`` is the rule; the order of the checks is the order of the verdicts. With
``f`` the KV budget, ``K_target = max(min_keep, ceil(f*L))`` and
``P_new = max(0, floor((L - K_target)/bs) * bs)``, a request compacts in a step when it did
not opt out, the step feeds it exactly one decode token and no speculative token, ``L >=
min_len``, it computed at least ``query_window`` tokens since its (re)admission (so the
worker's ring buffer of queries is full), and ``P_new - P_old >= interval``. ``f = 1`` gives
``K_target >= L``, so ``P_new = 0`` and it never compacts. ``L`` counts the tokens whose KV is
written: ``num_computed_tokens - num_in_flight_tokens`` (under async scheduling the in-flight
step's tokens are excluded).

**Where, in vLLM 0.32.** ``Scheduler.schedule()`` allocates every running request
(``allocate_slots``, scheduler.py:778), then admits waiting ones (scheduler.py:1256, with
``update_state_after_alloc`` at :1289), builds the step's ``SchedulerOutput`` (new and cached
requests' block ids, :1422-1441; blocks to zero, :1516), and only then calls the connector's
``build_connector_meta`` (:1529) before advancing ``num_computed_tokens``
(``_update_after_schedule``, :1555). :meth:`TCABlocks.plan_step` runs inside
``build_connector_meta``: no allocation of this step can receive the blocks it frees. The next
``schedule()`` may hand them out, but the worker runs steps in order, so this step's worker
has read them (at the start of its ``execute_model``) before a later step writes them.

All vLLM-internal state read or written here: the single-type manager's ``req_to_blocks``,
``num_cached_block`` and ``_remove_blocks_in_range``, the pool's ``null_block`` and
``KVCacheManager.evict_blocks``. vLLM 0.32.x only (``check_vllm_version``).
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from fractions import Fraction
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

OPT_OUT_KEY = "tether_tca"
"""``SamplingParams.extra_args[OPT_OUT_KEY] = False`` keeps a request's KV whole."""

# ``num_cached_block`` for a compacted request: ``cache_blocks`` hashes blocks
# ``[num_cached_block, num_full_blocks)``, so no block of it is hashed again.
NEVER_HASH = sys.maxsize


class Verdict(str, Enum):
    """What the scheduler half decided for one request in one step."""

    COMPACT = "compact"
    OPTED_OUT = "opted out"
    NOT_DECODE = "not a single-token decode step"
    TOO_SHORT = "shorter than min_len"
    WINDOW_NOT_FULL = "fewer than query_window tokens computed since admission"
    BELOW_INTERVAL = "P would advance by less than interval"
    SHARED_DESTINATION = "a destination block is shared"


@dataclass(frozen=True)
class CompactionSettings:
    """The decision's parameters.

    ``kv_budget`` (f): the share of a request's ``L`` tokens kept, in (0, 1]; read as the
    decimal it prints as (0.1 is 1/10), so ``ceil(f*L)`` has no binary rounding error.
    ``min_len``: no compaction below this many tokens. ``interval``: the least advance of
    ``P`` (tokens) worth a compaction. ``min_keep``: the least tokens kept, at least
    ``sinks + max(window, query_window)`` of the selection (checked there); here at least
    ``query_window``. ``query_window`` (w): queries the worker scores with.
    ``block_size``: the KV cache block size.
    """

    kv_budget: float
    min_len: int
    interval: int
    min_keep: int
    query_window: int
    block_size: int

    def __post_init__(self) -> None:
        if not 0.0 < self.kv_budget <= 1.0:
            raise ValueError(f"kv_budget must be in (0, 1], got {self.kv_budget}")
        for name in ("min_len", "interval", "min_keep", "query_window", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if self.min_len < 0:
            raise ValueError(f"min_len must be >= 0, got {self.min_len}")
        for name in ("interval", "query_window", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_keep < self.query_window:
            raise ValueError(
                f"min_keep ({self.min_keep}) must be >= query_window ({self.query_window}): "
                "the last query_window tokens are always kept")

    def target_start(self, length: int) -> int:
        """``P_new = max(0, floor((L - K_target)/bs)*bs)``, ``K_target = max(min_keep, ceil(f*L))``.
        """
        keep = max(self.min_keep, math.ceil(Fraction(str(self.kv_budget)) * length))
        return max(0, (length - keep) // self.block_size * self.block_size)


def decide(settings: CompactionSettings, *, length: int, start: int, since_admission: int,
           decode_step: bool, opted_out: bool) -> tuple[Verdict, int]:
    """The verdict for a request holding ``[start, length)``, and its target start ``P_new``.

    ``since_admission``: tokens computed since the request was (re)admitted (its prefix hit
    excluded). ``decode_step``: this step feeds it one decode token and no speculative token.
    """
    if not 0 <= start <= length:
        raise ValueError(f"start {start} outside [0, length {length}]")
    target = settings.target_start(length)
    if opted_out:
        return Verdict.OPTED_OUT, target
    if not decode_step:
        return Verdict.NOT_DECODE, target
    if length < settings.min_len:
        return Verdict.TOO_SHORT, target
    if since_admission < settings.query_window:
        return Verdict.WINDOW_NOT_FULL, target
    if target - start < settings.interval:
        return Verdict.BELOW_INTERVAL, target
    return Verdict.COMPACT, target


@dataclass(frozen=True)
class CompactionOrder:
    """One request's compaction, for the worker: move the kept tokens of ``[start_old,
    length)`` into ``[start_new, length)``.

    ``block_ids[i]`` holds logical block ``start_old/bs + i``, for the blocks up to
    ``cdiv(length, bs) - 1``, as they were before the surgery (the leading ones are freed in
    the same step, after the worker has read them). Plain ints, str and a tuple: it pickles
    and ``dataclasses.asdict`` gives JSON.
    """

    req_id: str
    length: int
    start_old: int
    start_new: int
    block_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_ids", tuple(int(b) for b in self.block_ids))
        if not 0 <= self.start_old < self.start_new < self.length:
            raise ValueError(
                f"need 0 <= start_old < start_new < length, got {self.start_old}, "
                f"{self.start_new}, {self.length}")
        if not self.block_ids:
            raise ValueError("a compaction order needs the request's block ids")


class Outcome(NamedTuple):
    """The verdict of one surgery attempt and, when it compacted, the worker's order."""

    verdict: Verdict
    order: CompactionOrder | None


def _full_attention_manager(kv_cache_manager: KVCacheManager):
    """The only single-type manager, checked to be plain full attention."""
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    managers = kv_cache_manager.coordinator.single_type_managers
    if len(managers) != 1:
        raise ValueError(f"TCA needs one KV cache group, the model has {len(managers)}")
    manager = managers[0]
    spec = manager.kv_cache_spec
    if type(manager) is not FullAttentionManager or not isinstance(spec, FullAttentionSpec):
        raise ValueError(f"TCA needs full attention, the KV cache group is {type(spec).__name__}")
    if spec.sliding_window is not None or spec.attention_chunk_size is not None:
        raise ValueError("TCA refuses models with sliding-window or chunked-local layers")
    if manager.block_size != spec.block_size:
        raise ValueError("TCA does not support decode context parallelism")
    # One group with prefix caching: vLLM's UnitaryKVCacheCoordinator already asserts
    # hash_block_size == block_size, so a block's hash covers exactly its own tokens.
    return manager


def compact_blocks(kv_cache_manager: KVCacheManager, req_id: str, *, length: int,
                   start_old: int, start_new: int) -> Outcome:
    """Move a request's start from ``start_old`` to ``start_new`` in vLLM's block row.

    Frees the blocks of ``[start_old, start_new)`` (their row entries become ``null_block``),
    evicts the kept blocks' hashes, stops all hashing of the request, and returns the order;
    or changes nothing and returns ``SHARED_DESTINATION`` when a kept block has another
    holder. Raises ``ValueError`` when the row disagrees with ``start_old`` or ``length``.
    """
    manager = _full_attention_manager(kv_cache_manager)
    bs = manager.block_size
    if start_old % bs or start_new % bs:
        raise ValueError(
            f"starts must be multiples of the block size {bs}: {start_old}, {start_new}")
    if not 0 <= start_old < start_new < length:
        raise ValueError(f"need 0 <= start_old < start_new < length, got "
                         f"{start_old}, {start_new}, {length}")
    row = manager.req_to_blocks.get(req_id)
    first, cut, end = start_old // bs, start_new // bs, -(-length // bs)
    if row is None or len(row) < end:
        raise ValueError(f"request {req_id!r} holds {0 if row is None else len(row)} blocks, "
                         f"fewer than the {end} of {length} tokens")
    if not all(block.is_null for block in row[:first]):
        raise ValueError(f"request {req_id!r} has real blocks before its start {start_old}")
    if any(block.is_null for block in row[first:]):
        raise ValueError(f"request {req_id!r} has freed blocks after its start {start_old}")

    kept = row[cut:]
    if any(block.ref_cnt > 1 for block in kept):
        return Outcome(Verdict.SHARED_DESTINATION, None)
    order = CompactionOrder(req_id, length, start_old, start_new,
                            tuple(block.block_id for block in row[first:end]))
    hashed = {block.block_id for block in kept if block.block_hash is not None}
    if hashed:
        kv_cache_manager.evict_blocks(hashed)
    if manager.enable_caching:
        manager.num_cached_block[req_id] = NEVER_HASH
    manager._remove_blocks_in_range(req_id, first, cut)
    return Outcome(Verdict.COMPACT, order)


def plan_request(kv_cache_manager: KVCacheManager, settings: CompactionSettings,
                 request: Request, *, start: int, since_admission: int, decode_step: bool,
                 opted_out: bool) -> Outcome:
    """``decide`` for one scheduled request holding ``[start, L)`` (``L``: its tokens whose KV
    is written), then, on ``COMPACT``, the surgery (``compact_blocks``)."""
    length = request.num_computed_tokens - request.num_in_flight_tokens
    verdict, target = decide(settings, length=length, start=start,
                             since_admission=since_admission, decode_step=decode_step,
                             opted_out=opted_out)
    if verdict is not Verdict.COMPACT:
        return Outcome(verdict, None)
    return compact_blocks(kv_cache_manager, request.request_id, length=length,
                          start_old=start, start_new=target)


def is_decode_step(request: Request, num_scheduled: int, num_spec: int) -> bool:
    """Whether this step feeds ``request`` exactly one output token and no speculative token.

    Read before ``_update_after_schedule`` advances ``num_computed_tokens``: the step reaches
    the end of the known sequence (what vLLM calls not a prefill chunk) and its token is not a
    prompt token.
    """
    position = request.num_computed_tokens
    return (num_scheduled == 1 and num_spec == 0
            and position + 1 == request.num_tokens + request.num_output_placeholders
            and position >= request.num_prompt_tokens)


def opts_out(request: Request) -> bool:
    """``extra_args[OPT_OUT_KEY]``: ``False`` opts out, ``True`` or absent opts in.

    Streaming-input sessions (``resumable``) always opt out: vLLM re-admits them as new
    requests that keep their blocks, which this module's lifecycle does not follow.
    """
    if request.resumable:
        return True
    params = request.sampling_params
    extra = params.extra_args if params is not None else None
    if not extra or OPT_OUT_KEY not in extra:
        return False
    value = extra[OPT_OUT_KEY]
    if not isinstance(value, bool):
        raise ValueError(f"extra_args[{OPT_OUT_KEY!r}] must be true or false, got {value!r}")
    return not value


@dataclass
class _RequestState:
    request: Request
    opted_out: bool
    start: int = 0  # P: logical blocks before start // bs are freed
    admitted_at: int | None = None  # tokens computed at (re)admission; None before the first


@dataclass
class TCABlocks:
    """The scheduler half's state and per-step work, for a KV connector to call.

    - ``add_request`` from ``on_new_request``;
    - ``plan_step`` from ``build_connector_meta``: restarts (re)admitted requests at ``P = 0``
      (a preempted request's row was freed whole by vLLM; it re-prefills its full logical
      length when resumed), decides and does the surgery; returns the worker's orders;
    - ``finish_request`` from ``request_finished`` (abort included).
    """

    settings: CompactionSettings
    kv_cache_manager: KVCacheManager = field(repr=False)
    requests: dict[str, _RequestState] = field(default_factory=dict, repr=False)
    verdicts: Counter = field(default_factory=Counter)
    blocks_freed: int = 0

    def __post_init__(self) -> None:
        from tether.decode.engine import check_vllm_version

        check_vllm_version()
        manager = _full_attention_manager(self.kv_cache_manager)
        if manager.block_size != self.settings.block_size:
            raise ValueError(f"settings.block_size {self.settings.block_size} differs from the "
                             f"KV cache's {manager.block_size}")
        if self.kv_cache_manager.coordinator.eagle_group_ids:
            raise ValueError("TCA does not support speculative decoding with EAGLE/MTP")

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request {request.request_id!r} is already tracked")
        self.requests[request.request_id] = _RequestState(request, opts_out(request))

    def finish_request(self, req_id: str) -> None:
        """Forget a finished or aborted request (its blocks are vLLM's to free)."""
        self.requests.pop(req_id, None)

    def start_of(self, req_id: str) -> int:
        """The request's current start ``P``."""
        return self._state(req_id).start

    def plan_step(self, scheduler_output: SchedulerOutput) -> list[CompactionOrder]:
        """Lifecycle updates, then decision and surgery for each request scheduled this step."""
        # A preempted request needs nothing here: vLLM freed its row (nulls included), and
        # it is re-admitted (new or resumed below) to re-prefill its full logical length.
        cached = scheduler_output.scheduled_cached_reqs
        admitted = [new.req_id for new in scheduler_output.scheduled_new_reqs]
        admitted += list(cached.resumed_req_ids)
        for req_id in admitted:
            state = self._state(req_id)
            state.start, state.admitted_at = 0, state.request.num_computed_tokens

        orders = []
        spec = scheduler_output.scheduled_spec_decode_tokens
        for req_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            state = self._state(req_id)
            if state.admitted_at is None:
                raise RuntimeError(f"request {req_id!r} is scheduled but was never seen admitted")
            request = state.request
            length = request.num_computed_tokens - request.num_in_flight_tokens
            verdict, order = plan_request(
                self.kv_cache_manager, self.settings, request, start=state.start,
                since_admission=length - state.admitted_at,
                decode_step=is_decode_step(request, num_scheduled, len(spec.get(req_id, ()))),
                opted_out=state.opted_out)
            if order is not None:
                orders.append(order)
                self.blocks_freed += (order.start_new - state.start) // self.settings.block_size
                state.start = order.start_new
            self.verdicts[verdict] += 1
        return orders

    def stats(self) -> dict[str, Any]:
        """Counts since start: verdicts by name, blocks freed, requests tracked."""
        return {"verdicts": {v.name: n for v, n in self.verdicts.items()},
                "blocks_freed": self.blocks_freed, "tracked": len(self.requests)}

    def _state(self, req_id: str) -> _RequestState:
        try:
            return self.requests[req_id]
        except KeyError:
            raise KeyError(f"request {req_id!r} reached the scheduler half without "
                           "add_request (on_new_request not wired?)") from None


# -- the engine's planner (``tether.decode.tca.PLANNER``) ------------------------------------------

INTERVAL_BLOCKS = 4
"""A compaction frees at least this many blocks: each one rescans the request's held KV in
every layer, so at a budget f the window start advances by about (1 - f) per decoded token and
a request compacts about every ``INTERVAL_BLOCKS * bs / (1 - f)`` tokens."""


def compaction_settings(settings: Any) -> CompactionSettings:
    """The decision's parameters for the engine's ``TCASettings``: the last ``w = observe``
    queries score; at least the selection's tier 0 (``sinks`` and a window covering both the
    calibrated window and the ``w`` observed tokens) is kept; a compaction frees at least
    ``INTERVAL_BLOCKS`` blocks, so no request shorter than that plus ``min_keep`` compacts."""
    budgets = settings.budgets
    query_window = settings.observe
    min_keep = budgets.sinks + max(budgets.window, query_window)
    interval = INTERVAL_BLOCKS * settings.block_size
    return CompactionSettings(kv_budget=settings.kv_budget, min_len=min_keep + interval,
                              interval=interval, min_keep=min_keep,
                              query_window=query_window, block_size=settings.block_size)


def plan_compactions(kv_cache_manager: KVCacheManager, steps: list,
                     settings: Any) -> list[CompactionOrder]:
    """The engine's planner: for each ``TCAStep`` (one TCA request scheduled this step, from
    ``TCAConnector.build_connector_meta``, which tracks the window start ``P`` and the tokens
    ``observed`` since (re)admission and has left out opted-out requests), ``decide`` and, on
    ``COMPACT``, the block surgery; returns the workers' orders. Speculative decoding is
    refused at start-up, so a step schedules no speculative token."""
    rule = compaction_settings(settings)
    orders = []
    for step in steps:
        _, order = plan_request(kv_cache_manager, rule, step.request, start=step.start,
                                since_admission=step.observed,
                                decode_step=is_decode_step(step.request, step.num_new_tokens, 0),
                                opted_out=False)
        if order is not None:
            orders.append(order)
    return orders
