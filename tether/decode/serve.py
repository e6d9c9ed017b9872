"""``tether serve``: vLLM's OpenAI-compatible server, with AWRS (and SMC) structured outputs.

The server is vLLM's own: its argument parser, FastAPI app, endpoints and request handling.
tether adds three things:

1. the AWRS logits processor and the records' worker extension in the engine;
2. ``TetherEngineClient``, a wrapper around vLLM's ``AsyncLLM`` given to vLLM's app in its
   place. With ``--sampler awrs``, a request whose sampling parameters carry a constraint
   (``response_format`` json_schema / json_object, or ``structured_outputs`` json, regex,
   grammar, choice, on /v1/chat/completions and /v1/completions) is decoded by AWRS instead of
   vLLM's masking backend: the wrapper compiles the constraint off the event loop (a bad one
   raises a validation error, which vLLM answers with HTTP 400), and runs the request as one
   particle, or, with ``n > 1`` or ``particles > 1``, as an SMC population of
   max(particles, n) particles whose ``n`` posterior draws become the choices. Requests without
   a constraint pass through untouched.
3. an HTTP middleware (through vLLM's ``--middleware``) that adds a ``tether`` extension field
   to the JSON responses of those requests, and keeps the ``tether_particle_records`` gauge of
   /metrics current.

Limits and bounds (an operator exposes this to clients it does not trust):

* particles and ``n`` are at most ``--max-particles``; a larger or non-positive value is a 400
  naming the limit; a spec over 256 KB or a schema nested deeper than 64 levels is a 400;
* every particle's constraint has a time budget (``--constraint-budget`` seconds, its lineage
  through resampling), and no engine step spends more than ``processor.STEP_LIMIT_S`` on one
  particle's constraint; a request that runs out ends with ``finish_reason: "budget"``;
* sampling parameters that AWRS does not implement (``logprobs``, ``prompt_logprobs``, stop
  strings) are a 400 naming the parameter; the penalties, min-p, top-k and top-p shape the
  distribution AWRS samples from;
* a constraint that fails mid-generation ends its own request (``finish_reason: "error"``,
  the message in the ``tether`` field); the engine and the other requests go on.

Finish reasons in the OpenAI choices: ``stop`` (complete and valid), ``length``
(``max_tokens`` reached), and, where the output is neither, tether's own reason instead of a
misleading one: ``constraint`` (no allowed continuation), ``budget``, ``error``. JSON numbers
that are not finite (the log weight of a dead particle, the log Z of a population with no
complete particle) are sent as null.

Per-request overrides travel in ``vllm_xargs``: ``tether_sampler`` ("awrs" or "default"),
``tether_particles``, ``tether_ess_threshold``, ``tether_max_rejections`` (0: unbounded).

Streaming: with one particle the tokens stream as they are decided. With several, the
population has to finish before a draw can be chosen, so the chosen draw is streamed as one
chunk once SMC ends. Streamed responses carry no ``tether`` field.

A client that disconnects cancels the request: every particle is aborted and every record it
left in the engines is collected.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, AsyncGenerator

from tether.decode.llm import finite_json
from tether.decode.processor import DEFAULT_BUDGET_S, DEFAULT_MAX_REJECTIONS
from tether.decode.records import count_async, exchange_async
from tether.decode.smc import SMCDriver, SMCSettings, prefill_per_resampling
from tether.errors import ConstraintError

log = logging.getLogger("tether.serve")

DEFAULT_MAX_PARTICLES = 64
SIDE_INFO_LIMIT = 4096  # responses whose extension field was not collected are dropped past this


@dataclass
class ServeSettings:
    sampler: str = "default"  # "awrs" or "default" (vLLM's structured outputs)
    particles: int = 1
    ess_threshold: float = 0.5
    max_rejections: int | None = DEFAULT_MAX_REJECTIONS
    max_particles: int = DEFAULT_MAX_PARTICLES
    budget_s: float | None = DEFAULT_BUDGET_S
    pre_align: Any = None  # an alignment.prealign.PreAligner, or None


class RequestError(ConstraintError):
    """A bad request parameter (answered with 400 naming ``parameter``)."""

    def __init__(self, message: str, parameter: str | None = None):
        super().__init__(message)
        self.parameter = parameter


def _metrics():
    from prometheus_client import Counter, Gauge

    names = {"checks": "tether_constraint_checks", "tokens": "tether_tokens",
             "resampling": "tether_resampling_events", "dead": "tether_dead_particles",
             "failed": "tether_failed_requests"}
    helps = {"checks": "Constraint checks made by AWRS", "tokens": "Tokens decided by AWRS",
             "resampling": "SMC resampling events", "dead": "Particles ended by the constraint",
             "failed": "Requests ended by a constraint budget or error"}
    counters = {k: Counter(v, helps[k]) for k, v in names.items()}
    counters["records"] = Gauge("tether_particle_records",
                                "Particle records held in the engines (read at each scrape)")
    return counters


def spec_from_structured_outputs(so: Any) -> Any:
    """vLLM's ``StructuredOutputsParams`` -> a tether spec (None if it carries no constraint)."""
    from tether import Choice, Grammar, JsonSchema, Regex

    if so is None:
        return None
    if so.json is not None:
        if isinstance(so.json, str):
            try:
                return JsonSchema(json.loads(so.json))
            except (ValueError, RecursionError):
                return JsonSchema(so.json)  # normalize() names the problem
        return JsonSchema(so.json)
    if so.json_object:
        return JsonSchema({"type": "object"})
    if so.regex is not None:
        return Regex(so.regex)
    if so.choice is not None:
        return Choice(so.choice)
    if so.grammar is not None:
        from llguidance.gbnf_to_lark import any_to_lark

        try:
            return Grammar(any_to_lark(so.grammar))
        except Exception as e:
            raise ConstraintError(f"invalid grammar: {e}") from None
    if getattr(so, "structural_tag", None) is not None:
        raise ConstraintError("structural_tag is not supported by the awrs sampler")
    return None


def _option(overrides: dict, name: str, kind: type, default: Any, low: float | None = None,
            high: float | None = None) -> Any:
    """A ``vllm_xargs`` override, type-checked and range-checked (RequestError: a 400)."""
    if name not in overrides:
        return default
    raw = overrides[name]
    try:
        if isinstance(raw, bool) or (kind is int and isinstance(raw, float) and not
                                     raw.is_integer()):
            raise TypeError
        value = kind(raw)
    except (TypeError, ValueError):
        raise RequestError(f"vllm_xargs.{name} must be a {kind.__name__}, got {raw!r}",
                           name) from None
    if (low is not None and value < low) or (high is not None and value > high) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise RequestError(f"vllm_xargs.{name} must be in [{low}, {high}], got {raw!r}", name)
    return value


_STREAM_END = object()  # a particle's stream has ended (wakes the SMC loop)


class _AsyncBackend:
    """Submits particles as ``AsyncLLM.generate`` streams feeding one queue."""

    def __init__(self, engine: Any, queue: asyncio.Queue, kwargs: dict):
        self.engine, self.queue, self.kwargs = engine, queue, kwargs
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


class TetherEngineClient:
    """Wraps vLLM's ``AsyncLLM``: AWRS for constrained requests, vLLM for the rest."""

    def __init__(self, engine: Any, settings: ServeSettings):
        self._engine = engine
        self._settings = settings
        self._tokenizer_path = engine.model_config.tokenizer
        self.side_info: dict[str, dict] = {}
        self._counters = _metrics()
        # Compilation runs here, off the event loop; the cache (constraints.base) is keyed by
        # the constraint's content and its parse target.
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="tether-compile")
        self._reaping: set[asyncio.Task] = set()
        self.aligner = settings.pre_align
        self.served_name = str(engine.model_config.served_model_name or self._tokenizer_path)
        self.rewriter_client: "TetherEngineClient | None" = None  # a MODEL rewriter's engine
        self._http = None  # a URL rewriter's client
        self._rewrites_in_flight: dict[tuple[str, str], asyncio.Future] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def warm_up(self) -> None:
        """Build the tokenizer's byte tables before the first request needs them."""
        from tether.constraints import vocab_for

        await asyncio.get_running_loop().run_in_executor(self._pool, vocab_for,
                                                         self._tokenizer_path)

    # -- pre-alignment ----------------------------------------------------------------------
    async def pre_align(self, instruction: str) -> Any:
        """The rewrite of ``instruction`` by the configured rewriter (``decode.prealign``): from
        the cache, from a rewrite of the same instruction already under way, or a new one."""
        from tether.decode.prealign import rewriter_id

        aligner = self.aligner
        rid = rewriter_id(aligner, self.served_name)
        hit = aligner.lookup(rid, instruction)
        if hit is not None:
            return hit
        # identical instructions arriving while one is being rewritten share that rewrite
        key = (rid, instruction)
        pending = self._rewrites_in_flight.get(key)
        if pending is not None:
            t0 = time.perf_counter()
            shared = await asyncio.shield(pending)
            return replace(shared, cached=True, seconds=time.perf_counter() - t0)
        task = asyncio.ensure_future(self._rewrite(aligner, rid, instruction))
        self._rewrites_in_flight[key] = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._rewrites_in_flight.pop(key, None)
            else:  # this client left: the others waiting on it still get it
                task.add_done_callback(lambda _: self._rewrites_in_flight.pop(key, None))

    async def _rewrite(self, aligner: Any, rid: str, instruction: str) -> Any:
        """One rewrite by the configured rewriter, judged by the guards (and cached)."""
        from tether.decode.prealign import demanded_span, http_rewrite_async, is_url

        if is_url(aligner.rewriter):
            import httpx

            if self._http is None:
                self._http = httpx.AsyncClient()
            decode = lambda demand: http_rewrite_async(aligner, instruction, self._http, demand)
        else:
            engine = self if aligner.rewriter == "self" else self.rewriter_client
            decode = lambda demand: engine.rewrite_here(aligner, instruction, demand)
        t0 = time.perf_counter()
        try:
            text, error = await decode(True)
            if error and demanded_span(aligner, instruction):
                # the demanding grammar left no way to end: the plain one always has
                text, error = await decode(False)
        except Exception as e:  # the raw instruction is answered; the request goes on
            log.warning("pre-alignment failed: %s", e)
            text, error = None, f"{type(e).__name__}: {str(e)[:200]}"
        seconds = time.perf_counter() - t0
        loop = asyncio.get_running_loop()  # the guards embed sentences: off the event loop
        return await loop.run_in_executor(self._pool, aligner.finish, rid, instruction, text,
                                          seconds, error)

    async def rewrite_here(self, aligner: Any, instruction: str,
                           demand: bool = True) -> tuple[str | None, str | None]:
        """Decode one rewrite on this engine: greedy, under the rewrite grammar (``demand``:
        with the span it demands, ``decode.prealign.grammar_for``)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from tether import Grammar
        from tether.constraints import compile_constraint, vocab_for
        from tether.alignment.prealign import MIN_REWRITE_CHARS, chars_for_tokens
        from tether.decode.prealign import grammar_for, rewriter_prompt_ids

        loop = asyncio.get_running_loop()
        vocab = await loop.run_in_executor(self._pool, vocab_for, self._tokenizer_path)
        prompt_ids = rewriter_prompt_ids(vocab.hf, instruction)
        room = self._engine.model_config.max_model_len - len(prompt_ids)
        if chars_for_tokens(room) < MIN_REWRITE_CHARS:
            return None, "the instruction leaves the rewriter no room for a rewrite"
        grammar = Grammar(grammar_for(aligner, instruction, room, demand))
        constraint = await loop.run_in_executor(self._pool, compile_constraint, grammar,
                                                self._tokenizer_path)
        params = SamplingParams(temperature=0.0, max_tokens=min(aligner.max_tokens, room),
                                seed=0)
        params.output_kind = RequestOutputKind.FINAL_ONLY
        plan = {"constraint": constraint, "extra": {}, "particles": 1, "ess_threshold": 0.5,
                "max_rejections": self._settings.max_rejections}
        final, request_id = None, f"prealign-{uuid.uuid4().hex}"
        async for out in self._awrs({"prompt_token_ids": prompt_ids}, params, request_id,
                                    plan, {}):
            final = out
        self.side_info.pop(request_id, None)  # no HTTP response will collect it
        completion = final.outputs[0]
        if completion.finish_reason != "stop":
            return completion.text, f"the rewrite ended with {completion.finish_reason}"
        return completion.text, None

    # -- planning ---------------------------------------------------------------------------
    async def _plan(self, params: Any) -> dict | None:
        settings = self._settings
        extra = dict(params.extra_args or {})
        sampler = extra.pop("tether_sampler", settings.sampler)
        if sampler not in ("awrs", "default"):
            raise RequestError(f"unknown sampler {sampler!r}; use 'awrs' or 'default'",
                               "tether_sampler")
        overrides = {k: extra.pop(k) for k in list(extra) if k.startswith("tether_")}
        so = params.structured_outputs
        has_constraint = so is not None and any(
            getattr(so, f, None) not in (None, False)
            for f in ("json", "json_object", "regex", "choice", "grammar", "structural_tag"))
        if sampler != "awrs" or not has_constraint:
            if overrides:
                raise RequestError(f"unknown tether options {sorted(overrides)}"
                                   if sampler == "awrs" else
                                   "tether options need the awrs sampler and a constraint",
                                   sorted(overrides)[0])
            return None
        unknown = set(overrides) - {"tether_particles", "tether_ess_threshold",
                                    "tether_max_rejections"}
        if unknown:
            raise RequestError(f"unknown tether options: {', '.join(sorted(unknown))}",
                               sorted(unknown)[0])
        limit = settings.max_particles
        particles = _option(overrides, "tether_particles", int, settings.particles)
        if not 1 <= particles <= limit:
            raise RequestError(f"vllm_xargs.tether_particles must be between 1 and {limit} "
                               f"(the server's --max-particles), got {particles}",
                               "tether_particles")
        if not 1 <= params.n <= limit:
            raise RequestError(f"n must be between 1 and {limit} (the server's "
                               f"--max-particles), got {params.n}", "n")
        ess = _option(overrides, "tether_ess_threshold", float, settings.ess_threshold, 0.0, 1.0)
        max_rejections = _option(overrides, "tether_max_rejections", int,
                                 settings.max_rejections or 0, 0, 1 << 20) or None
        for name, value in (("logprobs", params.logprobs),
                            ("prompt_logprobs", params.prompt_logprobs)):
            if value is not None:
                raise RequestError(f"{name} is not supported with the awrs sampler (it forces "
                                   "the tokens it decides); send vllm_xargs.tether_sampler: "
                                   "'default' for vLLM's structured outputs", name)
        if params.stop:
            raise RequestError("stop strings are not supported with the awrs sampler: the "
                               "constraint decides where the output ends (stop_token_ids "
                               "are, and end the output where the constraint allows)", "stop")
        loop = asyncio.get_running_loop()
        compiled = await loop.run_in_executor(self._pool, self._compile, so)
        return {"constraint": compiled, "extra": extra, "particles": max(particles, params.n),
                "ess_threshold": ess, "max_rejections": max_rejections}

    def _compile(self, so: Any) -> Any:
        from tether.constraints import compile_constraint

        return compile_constraint(spec_from_structured_outputs(so), self._tokenizer_path)

    # -- the EngineClient method vLLM's serving layer calls ------------------------------------
    async def generate(self, prompt: Any, sampling_params: Any, request_id: str,
                       **kwargs: Any) -> AsyncGenerator[Any, None]:
        try:
            plan = await self._plan(sampling_params)
        except ConstraintError as e:
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(str(e), parameter=getattr(e, "parameter", None)) from None
        if plan is None:
            async for out in self._engine.generate(prompt, sampling_params, request_id,
                                                   **kwargs):
                yield out
            return
        async for out in self._awrs(prompt, sampling_params, request_id, plan, kwargs):
            yield out

    async def _awrs(self, prompt: Any, params: Any, request_id: str, plan: dict,
                    kwargs: dict) -> AsyncGenerator[Any, None]:
        from vllm.sampling_params import RequestOutputKind

        prompt_ids = list(prompt["prompt_token_ids"])
        sampling = {"temperature": params.temperature, "top_p": params.top_p,
                    "top_k": params.top_k, "min_p": params.min_p,
                    "repetition_penalty": params.repetition_penalty,
                    "frequency_penalty": params.frequency_penalty,
                    "presence_penalty": params.presence_penalty,
                    "stop_token_ids": params.stop_token_ids, "min_tokens": params.min_tokens,
                    "logit_bias": params.logit_bias, "bad_words": params.bad_words,
                    "allowed_token_ids": params.allowed_token_ids,
                    "skip_special_tokens": params.skip_special_tokens}
        settings = SMCSettings(plan["particles"], plan["ess_threshold"], "systematic",
                               params.n, False)
        queue: asyncio.Queue = asyncio.Queue()
        backend = _AsyncBackend(self._engine, queue, kwargs)
        streaming = params.output_kind == RequestOutputKind.DELTA
        stream_one = plan["particles"] == 1 and streaming
        driver = SMCDriver(backend, [prompt_ids], [plan["constraint"]], settings,
                           seed=params.seed if params.seed is not None else
                           uuid.uuid4().int % (2 ** 32),
                           max_tokens=params.max_tokens, sampler="awrs",
                           estimator="recursive", max_rejections=plan["max_rejections"],
                           sampling={k: v for k, v in sampling.items() if v is not None},
                           run_id=request_id, budget_s=self._settings.budget_s)
        sent, sent_text = 0, ""  # tokens and text already streamed (one particle)
        eos = plan["constraint"].eos_token_ids
        finished = False
        try:
            driver.start()
            while backend.tasks or not queue.empty():
                items = [await queue.get()]
                items += [queue.get_nowait() for _ in range(queue.qsize())]
                for item in items:
                    if isinstance(item, Exception):
                        raise item
                outputs = [item for item in items if item is not _STREAM_END]
                if not outputs:
                    continue
                changed = driver.on_outputs(outputs)
                driver.after_read(changed, await exchange_async(self._engine,
                                                                *driver.wanted(changed)))
                if stream_one and not outputs[-1].finished:
                    particle = driver.groups[0].particles[0]
                    text = self._decode([t for t in particle.tokens if t not in eos])
                    if len(particle.tokens) > sent and not text.endswith("\ufffd"):
                        yield _delta(request_id, prompt_ids, text[len(sent_text):],
                                     particle.tokens[sent:])
                        sent, sent_text = len(particle.tokens), text
            groups = driver.finish_run(await exchange_async(self._engine, {},
                                                            driver.unpopped()))
            finished = True
        finally:
            tasks = backend.cancel_all()
            if not finished:  # cancelled (client gone) or failed: collect what is left behind
                self._reap(tasks, driver.unpopped())
        yield self._final(request_id, prompt_ids, groups[0], settings, sent, sent_text,
                          stream=streaming)

    def _reap(self, tasks: list[asyncio.Task], keys: list[str]) -> None:
        """Once the aborted particles' streams have ended (so that their aborts reached the
        engines first), pop every record they left there."""
        async def reap() -> None:
            await asyncio.gather(*tasks, return_exceptions=True)
            try:
                await exchange_async(self._engine, {}, keys)
            except Exception as e:  # the engine is shutting down
                log.warning("could not collect %d particle records: %s", len(keys), e)

        if keys:
            task = asyncio.ensure_future(reap())
            self._reaping.add(task)
            task.add_done_callback(self._reaping.discard)

    def _final(self, request_id: str, prompt_ids: list[int], group: Any,
               settings: SMCSettings, sent: int, sent_text: str, stream: bool) -> Any:
        """The last RequestOutput: the n draws (or, streaming, the rest of the draw)."""
        from vllm.outputs import CompletionOutput, RequestOutput

        from tether.samplers import resampling

        particles = group.particles
        eos = group.constraint.eos_token_ids
        results = []
        for p in particles:
            steps = [s for s in p.steps if s is not None]
            finish = p.finish_reason or "length"
            log_w = -math.inf if finish in ("constraint", "budget", "error") \
                else math.fsum(s.log_weight for s in steps)
            results.append((p, finish, log_w, steps))
        final = [(p.log_weight(group.last_resample) if f == "stop" else -math.inf)
                 for p, f, _, _ in results]
        failed = group.failure is not None
        weights = resampling.normalize(final)
        if failed:  # the particle that failed first, then the others
            picks = sorted(range(len(results)), key=lambda i: results[i][0].failure is None)
            picks = (picks * settings.draws)[: settings.draws]
        elif settings.particles == 1:
            picks = [0]
        elif weights.sum() > 0:
            picks = list(group.rng.choice(len(results), size=settings.draws, p=weights))
        else:  # nothing complete: the best particles, in order of their weights
            picks = sorted(range(len(results)), key=lambda i: -results[i][2])[: settings.draws]
            picks += [picks[0]] * (settings.draws - len(picks))
        outputs, info = [], []
        for index, i in enumerate(picks):
            p, finish, log_w, steps = results[i]
            text = self._decode([t for t in p.tokens if t not in eos])
            tokens = p.tokens
            if stream:  # what the stream has not carried yet
                tokens, text = p.tokens[sent:], text[len(sent_text):]
            outputs.append(CompletionOutput(
                index=index, text=text, token_ids=list(tokens),
                cumulative_logprob=None, logprobs=None,
                finish_reason=finish,  # stop, length, or tether's reason: never a false "stop"
                stop_reason=None))
            choice = {"index": index, "finish_reason": finish, "log_weight": log_w,
                      "engine": p.engine}
            if p.failure is not None:
                choice["failure"] = p.failure
            info.append(choice)
        checks = sum(s.checks for _, _, _, steps in results for s in steps)
        tokens = sum(len(steps) for _, _, _, steps in results)
        dead = sum(f == "constraint" for _, f, _, _ in results)
        log_z = None
        if not failed:
            log_z = (group.log_z + resampling.log_mean_exp(final)) if any(
                math.isfinite(x) for x in final) else -math.inf
        self._counters["checks"].inc(checks)
        self._counters["tokens"].inc(tokens)
        self._counters["resampling"].inc(len(group.resamples))
        self._counters["dead"].inc(dead)
        self._counters["failed"].inc(int(failed))
        if not stream:  # the middleware collects it from the JSON response
            self._remember(request_id, {
                "choices": info, "particles": len(particles), "log_z": log_z,
                "resampling_events": len(group.resamples), "failure": group.failure,
                # copies made at resampling, and the prompt tokens the engines computed for
                # them (the rest came from the prefix cache)
                "copies": sum(len(e["clones"]) for e in group.resamples),
                "copy_prefill_tokens": sum(prefill_per_resampling(group)),
                "stats": {"checks": checks, "tokens": tokens,
                          "checks_per_token": checks / tokens if tokens else 0.0,
                          "rejections": sum(s.rejections for _, _, _, st in results for s in st),
                          "dead_particles": dead}})
        return RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=prompt_ids,
                             prompt_logprobs=None, outputs=outputs, finished=True)

    def _decode(self, tokens: list[int]) -> str:
        from tether.constraints import vocab_for

        return vocab_for(self._tokenizer_path).hf.decode(tokens, skip_special_tokens=True)

    def _remember(self, request_id: str, info: dict) -> None:
        self.side_info[request_id] = finite_json(info)
        while len(self.side_info) > SIDE_INFO_LIMIT:
            self.side_info.pop(next(iter(self.side_info)))

    def take_side_info(self, response_id: Any) -> dict | list | None:
        """The extension field of response ``response_id``: chat requests run under the
        response's id; /v1/completions runs prompt i as ``{id}-{i}`` (a list for several)."""
        if not isinstance(response_id, str):
            return None
        if response_id in self.side_info:
            return self.side_info.pop(response_id)
        found = []
        for i in range(len(self.side_info)):
            info = self.side_info.pop(f"{response_id}-{i}", None)
            if info is None:
                break
            found.append(info)
        return (found[0] if len(found) == 1 else found) if found else None

    async def count_records(self) -> int:
        count = await count_async(self._engine)
        self._counters["records"].set(count)
        return count


def _delta(request_id: str, prompt_ids: list[int], text: str, tokens: list[int]) -> Any:
    from vllm.outputs import CompletionOutput, RequestOutput

    completion = CompletionOutput(index=0, text=text, token_ids=list(tokens),
                                  cumulative_logprob=None, logprobs=None, finish_reason=None)
    return RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=prompt_ids,
                         prompt_logprobs=None, outputs=[completion], finished=False)


_CLIENT: TetherEngineClient | None = None  # the server's wrapper, for the middleware below


async def tether_fields(request: Any, call_next: Any) -> Any:
    """HTTP middleware (vLLM's ``--middleware``): pre-aligns chat requests (with
    ``--pre-align``), adds the ``tether`` field to the JSON responses of requests that AWRS
    decoded or that were pre-aligned, and refreshes the records gauge before /metrics."""
    from starlette.responses import Response

    if _CLIENT is not None and request.url.path == "/metrics":
        try:
            await _CLIENT.count_records()
        except Exception as e:  # /metrics must answer even when an engine does not
            log.warning("could not count particle records: %s", e)
    rewrite = None
    if _CLIENT is not None and _CLIENT.aligner is not None and request.method == "POST" and \
            request.url.path.endswith("/chat/completions"):
        rewrite = await _pre_align_body(request)
    response = await call_next(request)
    if _CLIENT is None or not request.url.path.endswith("completions") or \
            response.headers.get("content-type", "").split(";")[0] != "application/json":
        return response
    body = b"".join([chunk async for chunk in response.body_iterator])
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    info = _CLIENT.take_side_info(data.get("id")) if isinstance(data, dict) else None
    if rewrite is not None and isinstance(data, dict):
        info = dict(info if isinstance(info, dict) else {}, pre_align=rewrite.to_dict())
    if info is not None:
        data["tether"] = info
        body = json.dumps(finite_json(data), allow_nan=False).encode()
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    return Response(body, status_code=response.status_code, headers=headers,
                    media_type="application/json")


async def _pre_align_body(request: Any) -> Any:
    """Rewrite the last user turn of a chat request's body in place (``tether_pre_align:
    false`` in ``vllm_xargs`` opts out); returns the Rewrite, or None."""
    from tether.alignment.prealign import replace_last_user_turn, user_text

    try:
        data = json.loads(await request.body())
    except ValueError:
        return None  # vLLM answers the malformed body itself
    if not isinstance(data, dict):
        return None
    xargs = data.get("vllm_xargs")
    enabled = True
    if isinstance(xargs, dict) and "tether_pre_align" in xargs:
        enabled = xargs.pop("tether_pre_align") is not False
    text = user_text(data["messages"]) if isinstance(data.get("messages"), list) else None
    rewrite = None
    if enabled and text is not None:
        rewrite = await _CLIENT.pre_align(text)
        data["messages"] = replace_last_user_turn(data["messages"], rewrite.text)
    body = json.dumps(data).encode()
    request._body = body  # what the app downstream receives (starlette's cached body)
    request.scope["headers"] = [(k, v) for k, v in request.scope["headers"]
                                if k.lower() != b"content-length"] + [
        (b"content-length", str(len(body)).encode())]
    return rewrite


# -- the command ----------------------------------------------------------------------------------

def build_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(
        prog="tether serve",
        description="vLLM's OpenAI-compatible server with AWRS (and SMC) structured outputs. "
        "Takes every `vllm serve` argument, plus the tether options below. MODEL defaults "
        "to the embedded SmolLM2-135M-Instruct and is also the name clients send as "
        "\"model\" (unless --served-model-name is given). vLLM logs at WARNING on stderr; "
        "-v brings its INFO logs back.")
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="registered name, HF directory or hub id (default: smollm2)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="vLLM's INFO logs and uvicorn's access log")
    parser = make_arg_parser(parser)
    group = parser.add_argument_group("tether")
    group.add_argument("--sampler", choices=["default", "awrs"], default="default",
                       help="awrs: decode constrained requests with AWRS instead of vLLM's "
                       "structured-output backend")
    group.add_argument("--particles", type=int, default=1,
                       help="SMC particles per constrained request (at least n)")
    group.add_argument("--ess-threshold", type=float, default=0.5,
                       help="resample when ESS < this share of the particles")
    group.add_argument("--awrs-max-rejections", type=int, default=DEFAULT_MAX_REJECTIONS,
                       help="finish a step from the full mask after R rejections (0: never); "
                       "only for constraints whose mask is cheap (llguidance)")
    group.add_argument("--max-particles", type=int, default=DEFAULT_MAX_PARTICLES,
                       help="the most particles (and n) one request may ask for; more is "
                       "answered with 400")
    group.add_argument("--pre-align", nargs="?", const="self", default=None,
                       metavar="REWRITER",
                       help="rewrite the last user turn of chat requests before answering "
                       "(P-Aligner): self (this model, the default), a model name or "
                       "directory, or the URL of a vLLM or tether server; a request opts out "
                       "with vllm_xargs {\"tether_pre_align\": false}")
    group.add_argument("--pre-align-min-similarity", type=float, default=0.6, metavar="S",
                       help="keep a rewrite only if its embedding similarity to the raw "
                       "instruction reaches S (and it keeps every number, URL, quote, code)")
    group.add_argument("--constraint-budget", type=float, default=DEFAULT_BUDGET_S,
                       metavar="SECONDS",
                       help="constraint time each particle may spend (through resampling); "
                       "a request that runs out ends with finish_reason 'budget'")
    return parser


def main(argv: list[str] | None = None) -> int:
    import sys

    import uvloop

    from tether.decode.engine import check_vllm_version, configure_environment, on_gpu
    from tether.models import DEFAULT_MODEL, resolve

    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = "-v" in argv or "--verbose" in argv
    check_vllm_version()
    configure_environment(in_process=False, verbose=verbose)
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    cli_env_setup()
    parser = build_parser()
    args = parser.parse_args(argv)
    user_set = set(_explicit_options(argv))
    name = args.model_tag or (args.model if "--model" in user_set else None) or DEFAULT_MODEL
    args.model = resolve(name)
    if not args.served_model_name:
        args.served_model_name = [name]  # clients send the name the operator typed
    args.logits_processors = ["tether.decode.processor:AWRSLogitsProcessor"]
    args.worker_extension_cls = "tether.decode.records.TetherWorkerExtension"
    args.middleware = list(args.middleware or []) + ["tether.decode.serve.tether_fields"]
    if not verbose:
        if "--uvicorn-log-level" not in user_set:
            args.uvicorn_log_level = "warning"
        args.disable_uvicorn_access_log = True
    if not on_gpu():
        if "--gpu-memory-utilization" not in user_set:
            args.gpu_memory_utilization = 0.5
        if "--block-size" not in user_set:
            args.block_size = 32
        if "--enforce-eager" not in user_set:
            args.enforce_eager = True
    if args.particles < 1:
        parser.error("--particles must be at least 1")
    if args.max_particles < max(1, args.particles):
        parser.error("--max-particles must be at least --particles")
    if not args.constraint_budget > 0:
        parser.error("--constraint-budget must be a positive number of seconds")
    for option in ("api_server_count", "data_parallel_multi_port_external_lb"):
        if getattr(args, option, None) not in (None, 0, 1, False):
            parser.error(f"--{option.replace('_', '-')} is not supported by tether serve: "
                         "its AWRS wrapper lives in one API server process")
    validate_parsed_serve_args(args)
    aligner = None
    if args.pre_align is not None:
        from tether.alignment.prealign import PreAligner
        from tether.decode.prealign import is_url

        rewriter = args.pre_align
        if rewriter != "self" and not is_url(rewriter):
            rewriter = resolve(rewriter)
        aligner = PreAligner(rewriter, min_similarity=args.pre_align_min_similarity)
    settings = ServeSettings(args.sampler, args.particles, args.ess_threshold,
                             args.awrs_max_rejections or None, args.max_particles,
                             args.constraint_budget, aligner)
    if args.headless:  # engines only, for a head node's API server (multi-node launch)
        from vllm.entrypoints.cli.serve import run_headless

        args.api_server_count = 0
        run_headless(args)
        return 0
    uvloop.run(_serve(args, settings))
    return 0


def _explicit_options(argv: list[str]) -> list[str]:
    return [a.split("=")[0] for a in argv if a.startswith("--")]


async def _serve(args: Any, settings: ServeSettings) -> None:
    global _CLIENT
    import contextlib
    import sys

    from vllm.entrypoints.launchers.api_server import entry
    from vllm.entrypoints.launchers.launcher import setup_server

    listen_address, sock = setup_server(args, reuse_port=False)
    from tether.decode.prealign import is_url

    async with contextlib.AsyncExitStack() as stack:
        engine = await stack.enter_async_context(entry.build_async_engine_client(args))
        _CLIENT = TetherEngineClient(engine, settings)
        await _CLIENT.warm_up()
        aligner = settings.pre_align
        if aligner is not None and aligner.rewriter != "self" and not is_url(aligner.rewriter):
            _CLIENT.rewriter_client = await _rewriter_engine(stack, args, aligner.rewriter,
                                                             settings)
        print(f"tether serve: model {args.served_model_name[0]!r} on {listen_address} "
              f"(sampler {settings.sampler})", file=sys.stderr, flush=True)
        shutdown = await entry.build_and_serve(_CLIENT, listen_address, sock, args)
    try:
        await shutdown
    finally:
        sock.close()


async def _rewriter_engine(stack: Any, args: Any, model: str,
                           settings: ServeSettings) -> TetherEngineClient:
    """An engine of its own for a rewriter model (its own engine process), with AWRS."""
    import copy

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    rewriter_args = copy.copy(args)
    rewriter_args.model = rewriter_args.tokenizer = model
    rewriter_args.served_model_name = None
    rewriter_args.data_parallel_size = 1
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs.from_cli_args(rewriter_args))
    stack.callback(engine.shutdown)
    client = TetherEngineClient(engine, ServeSettings("awrs", budget_s=settings.budget_s))
    await client.warm_up()
    return client
