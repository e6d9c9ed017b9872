r"""Sequential Monte Carlo over AWRS particles, driven step by step through vLLM's engine.

Target. For a prompt, a constraint with language L and the model p, the target is
\pi(y) \propto p(y) 1[y \in L] over complete outputs y (ending in EOS) of at most max_tokens
tokens. AWRS draws each token from p restricted to the allowed set A_t and returns a properly
weighted estimate W_t of Z_t = p(A_t); the product of the W_t is then an unbiased importance
weight for the whole output, which corrects the bias of token masking (masking samples the
product of the local p|A_t, not \pi).

Algorithm. Each prompt gets N particles, each an ordinary engine request carrying a
``ParticleConfig``; every engine step advances every live particle by one token. After each
step the driver reads the step weights the processor recorded, and, per prompt, at time t (the
length of the shortest live particle) computes the weights accumulated since the last
resampling and the effective sample size ESS = (sum w)^2 / sum w^2. When ESS < threshold * N it
resamples (systematic by default; ``samplers.resampling``); a threshold of 1 resamples at every
step, 0 never:

* the estimate log Z accumulates log mean(w), and all weights reset to equal;
* a particle chosen c times continues as itself and spawns c - 1 copies; a copy is a new
  request whose prompt is the original prompt plus the ancestor's first t tokens (vLLM's prefix
  cache makes only the unshared tail prefill again; ``prefill_tokens`` in each resampling event
  counts what the engines computed for every copy it made, including copies that a later
  resampling discarded), with the ancestor's tokens as its ``prefix`` so the processor
  rebuilds the constraint state; a particle chosen 0 times is aborted;
* copies of a finished particle are finished copies; no request is needed.

Which weights decide resampling. The ESS is computed from the lowest-variance step weights the
particles carry: the exact allowed masses Z_t where the constraint's mask is cheap (the
``weights="auto"`` default, ``processor.ParticleConfig.weights``), AWRS's unbiased estimates
only where no mask is cheap. Any rule that looks only at the past keeps SMC unbiased; this one
keeps the estimator's noise from triggering resampling by itself. Measured on ``[ab]{2,4}``
(``bench/smc_fidelity.py``, N = 64): with estimated weights the recursive estimator's coin
(E[(W/Z)^2] = 1.99 after ``ab``) pushed the ESS below N/2 at the second step in 0.81 runs of
1, exactly where the step weights point away from the target's mass, and resampling emptied
the right branch (TV 0.087); with exact weights the noise is gone and TV falls to 0.050, the
same as never resampling.

Particles that end at different steps keep their final weight. At max_tokens an unfinished
particle is not in L: it gets weight zero in the final normalization, the posterior and
log Z (whose expectation is then the mass of L among outputs of at most max_tokens tokens).
With every final weight zero, the result says so (no draws; ``finish_reason`` of the
best particle).

The randomness of AWRS is seeded per particle; resampling uses a host generator seeded from
the request seed, so a run repeats itself (given the same logits: vLLM's bf16 CPU kernels
compute a cached prefix and an uncached one slightly differently, enough to flip a near tie).

Records (``decode.records``). After each round of engine outputs the driver collects, in one
exchange with every engine, the new steps of live particles (only where resampling needs them:
populations of more than one particle) and the whole records of particles that finished or
were aborted. A finished particle must have a record for every token it generated, and each
record must be of the token the particle holds at that step: a missing or mismatched one makes
the particle, and its request, fail with the reason ``error``; no weight is ever assumed.
Records are keyed by request ids this driver makes (``run_id``, never a client's id).

Failures. A particle whose constraint ran out of its time budget or raised is ended by the
processor with the reason ``budget`` or ``error``. Its weight is then unknown, so its whole
population fails: the other particles are aborted, there are no draws and no log Z, and the
reason and message are reported (``Group.failure``).

Locality. A copy is submitted to the engine that computed its ancestor (under data
parallelism), where the prefix cache holds the ancestor's prompt and tokens.

Budgets. Each particle's lineage may spend ``budget_s`` seconds in its constraint: a copy gets
what its ancestor's first t steps left.

Front ends. ``run_sync`` drives vLLM's synchronous ``LLMEngine`` step by step (the Python API);
``run_async`` drives ``AsyncLLM`` streams (the server), one round per batch of outputs, and
yields after each round so that a caller can stream.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tether.decode.processor import DEFAULT_BUDGET_S, ParticleConfig
from tether.decode.records import StepRecord, exchange, exchange_async
from tether.samplers import resampling
from tether.samplers.gumbel import mix_seed

log = logging.getLogger("tether.smc")


@dataclass
class SMCSettings:
    particles: int = 1
    ess_threshold: float = 0.5
    resampling: str = "systematic"
    draws: int = 1
    trace: bool = False

    def __post_init__(self):
        if self.particles < 1:
            raise ValueError("particles must be at least 1")
        if not 0.0 <= self.ess_threshold <= 1.0:
            raise ValueError("ess_threshold must be in [0, 1]")
        if self.resampling not in resampling.SCHEMES:
            raise ValueError(f"unknown resampling scheme {self.resampling!r}; use one of "
                             f"{', '.join(resampling.SCHEMES)}")
        if self.draws < 1:
            raise ValueError("n (posterior draws) must be at least 1")


@dataclass
class Particle:
    uid: int
    tokens: list[int] = field(default_factory=list)
    steps: list[StepRecord | None] = field(default_factory=list)  # aligned with tokens
    request_id: str | None = None
    key: str | None = None
    offset: int = 0  # tokens carried in the prompt of the current request
    # stop | length | constraint (dead) | budget | error, once finished
    finish_reason: str | None = None
    prefill_tokens: int | None = None  # prompt tokens the engine computed for this request
    parent: int | None = None
    engine: int | None = None  # data-parallel rank of the engine that ran its last request
    failure: dict | None = None  # {"reason", "message", "step"} when budget or error
    born: dict | None = None  # the resampling event that made this copy
    weights: str | None = None  # "exact" | "estimate" (its records say which), None: none

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def log_weight(self, start: int = 0, end: int | None = None) -> float:
        """Sum of the step log weights over [start, end)."""
        end = len(self.tokens) if end is None else min(end, len(self.tokens))
        if self.finish_reason in ("constraint", "budget", "error") and end >= len(self.tokens):
            return -math.inf
        total = 0.0
        for s in self.steps[start:end]:
            if s is not None:
                total += s.log_weight
        return total


@dataclass
class Group:
    """The particles of one prompt."""

    index: int
    prompt_ids: list[int]
    constraint: Any  # compiled Constraint or None
    seed: int
    particles: list[Particle] = field(default_factory=list)
    last_resample: int = 0  # time of the last resampling (weights accumulate from here)
    checked: int = 0  # last time the ESS was evaluated
    log_z: float = 0.0  # accumulated log mean weights at resampling events
    resamples: list[dict] = field(default_factory=list)
    ess_trace: list[tuple[int, float]] = field(default_factory=list)
    rng: np.random.Generator | None = None
    exhausted: bool = False  # every weight was zero at a resampling time
    failure: dict | None = None  # a particle's budget ran out or its constraint failed


class SMCDriver:
    """The bookkeeping of prompts x particles, independent of how the engine is driven.

    The front end that runs it (``run_sync``: vLLM's ``LLMEngine`` step by step; ``run_async``:
    ``AsyncLLM`` streams) sets ``backend``, which submits and aborts engine requests:
    ``submit(request_id, prompt, params, engine)`` (``engine``: a data-parallel rank to route
    to, or None) and ``abort(request_id)``. Either loop feeds engine outputs to
    ``on_outputs``, exchanges records for ``wanted(changed)`` (steps to read, records to pop),
    and hands them to ``after_read``, which finishes particles and resamples; at the end it
    pops ``unpopped()`` and calls ``finish_run``.

    ``extra_args``: the caller's own ``SamplingParams.extra_args`` (a server request's other
    ``vllm_xargs``), given to every particle's request beside tether's.
    """

    def __init__(self, prompt_ids: list[list[int]], constraints: list[Any],
                 settings: SMCSettings, *, seed: int, max_tokens: int, sampler: str,
                 estimator: str, max_rejections: int | None, sampling: dict,
                 run_id: str | None = None, budget_s: float | None = DEFAULT_BUDGET_S,
                 extra_args: dict | None = None, weights: str = "auto"):
        self.backend: Any = None
        self.settings = settings
        self.max_tokens = max_tokens
        self.sampler, self.estimator, self.max_rejections = sampler, estimator, max_rejections
        self.weights = weights
        self.budget_s = budget_s
        self.sampling = sampling
        self.extra_args = dict(extra_args or {})  # the caller's own, passed to every request
        self.run_id = run_id or uuid.uuid4().hex
        self.uids = itertools.count()
        self.by_request: dict[str, tuple[Group, Particle]] = {}
        self.constrained: set[str] = set()  # record keys of constrained requests not yet popped
        self.aborted: list[str] = []  # keys aborted since the last exchange
        self.groups = [Group(i, ids, c, mix_seed(seed, i),
                             rng=np.random.default_rng(mix_seed(seed, i, 7)))
                       for i, (ids, c) in enumerate(zip(prompt_ids, constraints))]

    # -- requests -----------------------------------------------------------------------------
    def _submit(self, group: Group, particle: Particle, engine: int | None = None) -> None:
        from vllm import SamplingParams
        from vllm.inputs import tokens_input  # an engine input: token ids, already rendered

        remaining = self.max_tokens - len(particle.tokens)
        if remaining <= 0:
            particle.finish_reason = "length"
            return
        request_id = f"{self.run_id}-{group.index}-{particle.uid}"
        extra = dict(self.extra_args) or None
        if group.constraint is not None:
            left = None
            if self.budget_s is not None:  # what the lineage's first steps left
                spent = sum(s.constraint_s for s in particle.steps if s is not None)
                left = max(0.0, self.budget_s - spent)
            cfg = ParticleConfig(spec=group.constraint.spec.to_wire(), key=request_id,
                                 sampler=self.sampler, estimator=self.estimator,
                                 max_rejections=self.max_rejections,
                                 seed=mix_seed(group.seed, particle.uid),
                                 prefix=tuple(particle.tokens), budget_s=left,
                                 population=f"{self.run_id}-{group.index}",
                                 weights=self.weights)
            extra = dict(extra or {}, **cfg.to_extra_args())
            self.constrained.add(request_id)
        # Constrained rows are forced, so vLLM's own generator does not matter for them; the
        # others get a per-request seed (on the CPU, safe with ``cpu_seeds``).
        sampling = dict(self.sampling)
        if group.constraint is not None:
            sampling.pop("seed", None)
        elif "seed" not in sampling:
            sampling["seed"] = mix_seed(group.seed, particle.uid) % (2 ** 31)
        if sampling.get("top_k", 0) <= 0:
            sampling["top_k"] = 0
        params = SamplingParams(max_tokens=remaining, extra_args=extra, **sampling)
        particle.request_id, particle.key, particle.offset = request_id, request_id, \
            len(particle.tokens)
        particle.prefill_tokens = None
        self.by_request[request_id] = (group, particle)
        self.backend.submit(request_id, tokens_input(group.prompt_ids + particle.tokens),
                            params, engine)

    def _abort(self, particle: Particle) -> None:
        if particle.request_id is not None and not particle.finished:
            self.backend.abort(particle.request_id)
            self.by_request.pop(particle.request_id, None)
            if particle.request_id in self.constrained:
                self.aborted.append(particle.request_id)
        particle.request_id = None

    # -- the protocol the loops follow ---------------------------------------------------------
    def start(self) -> None:
        for group in self.groups:
            for _ in range(self.settings.particles):
                particle = Particle(next(self.uids))
                group.particles.append(particle)
                self._submit(group, particle)

    def on_outputs(self, outputs: list[Any]) -> list[tuple]:
        """Fold engine outputs (cumulative) into the particles; returns what changed."""
        changed = []
        for out in outputs:
            entry = self.by_request.get(out.request_id)
            if entry is None:
                continue
            group, particle = entry
            completion = out.outputs[0]
            particle.tokens[particle.offset:] = list(completion.token_ids)
            if particle.prefill_tokens is None:
                prompt_len = len(out.prompt_token_ids or [])
                particle.prefill_tokens = prompt_len - (out.num_cached_tokens or 0)
                if particle.born is not None:
                    particle.born["prefill_tokens"] += particle.prefill_tokens
            changed.append((group, particle, out.finished, completion))
        return changed

    def wanted(self, changed: list[tuple]) -> tuple[dict[str, int], list[str]]:
        """What to exchange after a round: ``read`` (key -> first unread step) for live
        particles whose weights resampling needs, ``pop`` for finished and aborted ones."""
        read, pop = {}, self.aborted
        self.aborted = []
        for _, p, finished, _ in changed:
            if p.key not in self.constrained or p.key not in self.by_request:
                continue
            if finished:
                pop.append(p.key)
            elif self.settings.particles > 1:
                i = p.offset
                while i < len(p.steps) and p.steps[i] is not None:
                    i += 1
                read[p.key] = i
        return read, pop

    def unpopped(self) -> list[str]:
        """Keys whose records are still in the engines (for the final exchange)."""
        return sorted(self.constrained)

    def after_read(self, changed: list[tuple], records: dict) -> None:
        for key, record in records.items():
            if key in self.by_request:
                self._merge(self.by_request[key][1], record)
        for _, particle, finished, completion in changed:
            if finished:
                self._finish(particle, completion, particle.key in records)
        for key, record in records.items():
            if key not in self.by_request:  # popped: an aborted or finished particle
                self.constrained.discard(key)
        for group in self.groups:
            if group.failure is None:
                group.failure = next((p.failure for p in group.particles if p.failure), None)
                if group.failure is not None:
                    for particle in group.particles:
                        if not particle.finished:
                            self._abort(particle)
                            particle.finish_reason = group.failure["reason"]
                    continue
            self._maybe_resample(group)

    @property
    def done(self) -> bool:
        """Every particle finished, or aborted by a failure."""
        return not self.by_request

    def finish_run(self, records: dict) -> list[Group]:
        """The groups, after the last exchange (records of late and aborted particles)."""
        self.constrained.difference_update(records)
        return self.groups

    def _merge(self, particle: Particle | None, record) -> None:
        if particle is None or record is None:
            return
        particle.engine = record.engine if record.engine is not None else particle.engine
        particle.weights = record.weights or particle.weights
        while len(particle.steps) < len(particle.tokens):
            particle.steps.append(None)
        for i, step in record.steps.items():
            if particle.offset <= i < len(particle.tokens):
                if step.token != particle.tokens[i] and particle.failure is None:
                    particle.failure = {
                        "reason": "error", "step": i,
                        "message": f"the record of step {i} of particle {particle.key} is of "
                        f"token {step.token}, the output has {particle.tokens[i]}; its weight "
                        "is unknown"}
                particle.steps[i] = step
        if record.failure is not None and particle.failure is None:
            particle.failure = record.failure
        if record.dead_step is not None and record.dead_step < len(particle.tokens):
            particle.finish_reason = "constraint"

    def _finish(self, particle: Particle, completion: Any, have_record: bool) -> None:
        self.by_request.pop(particle.request_id, None)
        if particle.failure is not None:
            particle.finish_reason = particle.failure["reason"]
            return
        if particle.key in self.constrained:
            missing = [i for i in range(particle.offset, len(particle.tokens))
                       if i >= len(particle.steps) or particle.steps[i] is None]
            if not have_record or missing:
                where = f"step {missing[0]}" if have_record else "any step"
                particle.failure = {"reason": "error", "step": missing[0] if missing else 0,
                                    "message": f"no engine reported the record of {where} of "
                                    f"particle {particle.key}; its weight is unknown"}
                particle.finish_reason = "error"
                return
        if particle.finish_reason == "constraint":
            return
        if completion.finish_reason == "stop" and not isinstance(completion.stop_reason, str):
            particle.finish_reason = "stop"
        elif completion.finish_reason == "length":
            particle.finish_reason = "length"
        else:  # aborted by the engine, or cut by a stop string: not a complete output
            particle.failure = {"reason": "error", "step": len(particle.tokens),
                                "message": f"the engine ended the request ("
                                f"{completion.finish_reason}, {completion.stop_reason!r})"}
            particle.finish_reason = "error"

    # -- resampling ----------------------------------------------------------------------------
    def _maybe_resample(self, group: Group) -> None:
        settings = self.settings
        live = [p for p in group.particles if not p.finished]
        if group.exhausted or group.failure is not None or not live:
            return
        t = min(len(p.tokens) for p in live)
        if t <= group.checked or any(
                any(s is None for s in p.steps[group.last_resample:t]) for p in live):
            return
        group.checked = t
        log_w = np.array([p.log_weight(group.last_resample, t) for p in group.particles])
        ess = resampling.ess(log_w)
        if settings.trace:
            group.ess_trace.append((t, ess))
        always = settings.ess_threshold >= 1.0  # ESS <= N always holds: resample every step
        if settings.particles == 1 or not (always or ess < settings.ess_threshold *
                                           settings.particles):
            return
        if not np.isfinite(log_w).any():
            group.exhausted = True
            return
        group.log_z += resampling.log_mean_exp(log_w)
        ancestors = resampling.resample(resampling.normalize(log_w), group.rng,
                                        settings.resampling)
        counts = np.bincount(ancestors, minlength=len(group.particles))
        survivors, clones = [], []
        for i, particle in enumerate(group.particles):
            if counts[i] == 0:
                self._abort(particle)
                continue
            survivors.append(particle)
            for _ in range(counts[i] - 1):
                clones.append(self._clone(group, particle, t))
        group.particles = survivors + clones
        group.last_resample = t
        event = {"time": t, "ess": ess, "ancestors": [int(a) for a in ancestors],
                 "clones": [(c.uid, c.parent) for c in clones], "prefill_tokens": 0}
        for clone in clones:
            clone.born = event
        group.resamples.append(event)

    def _clone(self, group: Group, parent: Particle, t: int) -> Particle:
        child = Particle(next(self.uids), parent=parent.uid, engine=parent.engine,
                         weights=parent.weights)
        if parent.finished and len(parent.tokens) <= t:
            child.tokens, child.steps = list(parent.tokens), list(parent.steps)
            child.finish_reason = parent.finish_reason
            return child
        child.tokens, child.steps = list(parent.tokens[:t]), list(parent.steps[:t])
        self._submit(group, child, engine=parent.engine)  # where its prefix is cached
        return child


class EngineBackend:
    """Submits to and aborts on vLLM's synchronous ``LLMEngine`` (one engine)."""

    def __init__(self, engine: Any):
        self.engine = engine

    def submit(self, request_id: str, prompt: dict, params: Any, engine: int | None) -> None:
        self.engine.add_request(request_id, prompt, params)

    def abort(self, request_id: str) -> None:
        self.engine.abort_request([request_id])


def run_sync(driver: SMCDriver, engine: Any) -> list[Group]:
    """Drive ``engine`` (an ``LLMEngine``) step by step until every particle has finished."""
    driver.backend = EngineBackend(engine)
    driver.start()
    try:
        while engine.has_unfinished_requests():
            changed = driver.on_outputs(engine.step())
            driver.after_read(changed, exchange(engine, *driver.wanted(changed)))
    finally:
        for _, particle in list(driver.by_request.values()):  # an exception: stop them all
            driver._abort(particle)
        records = exchange(engine, {}, driver.unpopped())
    return driver.finish_run(records)


# -- the asynchronous front end (the server) ----------------------------------------------------

_STREAM_END = object()  # a particle's stream has ended (wakes the loop)


class AsyncBackend:
    """Submits particles as ``AsyncLLM.generate`` streams feeding one queue."""

    def __init__(self, engine: Any, kwargs: dict):
        self.engine, self.kwargs = engine, kwargs
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: dict[str, asyncio.Task] = {}

    def submit(self, request_id: str, prompt: dict, params: Any, engine: int | None) -> None:
        from vllm.sampling_params import RequestOutputKind

        params.output_kind = RequestOutputKind.CUMULATIVE
        kwargs = dict(self.kwargs)
        local = _local_engine_index(self.engine, engine)
        if local is not None:  # route a copy to the engine that holds its ancestor's prefix
            kwargs["data_parallel_rank"] = local
        self.tasks[request_id] = asyncio.ensure_future(
            self._consume(request_id, prompt, params, kwargs))

    async def _consume(self, request_id: str, prompt: dict, params: Any, kwargs: dict) -> None:
        try:
            async for out in self.engine.generate(prompt, params, request_id, **kwargs):
                self.queue.put_nowait(out)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # validation errors, engine failures: the loop re-raises them
            self.queue.put_nowait(e)
        finally:
            self.tasks.pop(request_id, None)
            self.queue.put_nowait(_STREAM_END)

    def abort(self, request_id: str) -> None:
        task = self.tasks.pop(request_id, None)
        if task is not None:
            task.cancel()  # generate() aborts the engine request when cancelled

    def cancel_all(self) -> list[asyncio.Task]:
        tasks = list(self.tasks.values())
        for request_id in list(self.tasks):
            self.abort(request_id)
        return tasks


def _local_engine_index(async_llm: Any, rank: int | None) -> int | None:
    """The index, among the engines this API server's client manages, of the engine with
    data-parallel rank ``rank`` (what ``generate(data_parallel_rank=...)`` takes); None when
    there is nothing to route (one engine, or an engine this client does not manage)."""
    if rank is None:
        return None
    core = getattr(async_llm, "engine_core", None)
    if not hasattr(core, "reqs_in_flight"):  # not vLLM's load-balancing data-parallel client
        return None
    identity = int(rank).to_bytes(2, "little")
    engines = getattr(core, "core_engines", [])
    return engines.index(identity) if identity in engines else None


_REAPING: set[asyncio.Task] = set()  # record collections still running after a cancel


async def run_async(driver: SMCDriver, engine: Any, kwargs: dict):
    """Drive ``engine`` (vLLM's ``AsyncLLM``) until every particle has finished; an async
    generator that yields after each round of outputs (for streaming). ``kwargs`` go to every
    ``generate`` call. When it is cancelled (the client left) or fails, every particle is
    aborted and, once the aborts have reached the engines, every record they left is popped.
    The groups are ``driver.groups`` afterwards."""
    backend = AsyncBackend(engine, kwargs)
    driver.backend = backend
    finished = False
    try:
        driver.start()
        while backend.tasks or not backend.queue.empty():
            items = [await backend.queue.get()]
            items += [backend.queue.get_nowait() for _ in range(backend.queue.qsize())]
            for item in items:
                if isinstance(item, Exception):
                    raise item
            outputs = [item for item in items if item is not _STREAM_END]
            if not outputs:
                continue
            changed = driver.on_outputs(outputs)
            driver.after_read(changed, await exchange_async(engine, *driver.wanted(changed)))
            yield changed
        driver.finish_run(await exchange_async(engine, {}, driver.unpopped()))
        finished = True
    finally:
        tasks = backend.cancel_all()
        if not finished:
            _reap(engine, tasks, driver.unpopped())


def _reap(engine: Any, tasks: list[asyncio.Task], keys: list[str]) -> None:
    """Once the aborted particles' streams have ended (so that their aborts reached the
    engines first), pop every record they left there."""
    async def reap() -> None:
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await exchange_async(engine, {}, keys)
        except Exception as e:  # the engine is shutting down
            log.warning("could not collect %d particle records: %s", len(keys), e)

    if keys:
        task = asyncio.ensure_future(reap())
        _REAPING.add(task)
        task.add_done_callback(_REAPING.discard)
