"""The engine client ``tether serve`` gives vLLM's OpenAI server: AWRS for constrained
requests, vLLM for the rest.

``TetherEngineClient`` wraps vLLM's ``AsyncLLM`` and is handed to vLLM's app in its place, so
every endpoint's ``generate`` call comes here. For each call:

1. ``policy.plan`` decides whether AWRS decodes it (and refuses what it cannot honour, as a
   validation error that vLLM answers with HTTP 400);
2. the constraint is compiled off the event loop (a bad one is a 400), then in every engine
   before any particle is submitted (``records.prepare_async``), so that no engine step
   compiles;
3. the SMC driver (``smc.run_async``) runs the request as one particle, or, with ``n > 1`` or
   ``tether_particles > 1``, as a population whose ``n`` posterior draws become the choices;
   records are keyed by an id this client makes, never by the client's request id;
4. ``results.assemble`` turns the population into the choices; the ``tether`` field goes into
   the HTTP request's scope (``policy.RequestScope``), where the middleware (``decode.http``)
   finds it.

Streaming: with one particle the tokens stream as they are decided, with the text vLLM
already decoded. With several, the population has to finish before a draw can be chosen, so
the chosen draw is streamed as one chunk once SMC ends. A stream's ``tether`` field comes in a
chunk of its own, the last before ``[DONE]`` (``decode.http``). A client that disconnects
cancels the request: every particle is aborted and every record it left in the engines is
collected.

Pre-alignment (``--pre-align``) lives here too because it decodes on this engine: a rewrite is
one more constrained request (``decode.prealign`` builds it); rewrites run at most
``concurrency`` at a time, identical instructions of one client in flight share one rewrite,
and the cache is partitioned by client (see ``pre_align``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, AsyncGenerator

from tether.decode import policy
from tether.decode.policy import Limits, Options, RequestScope
from tether.samplers.awrs import check_weights
from tether.decode.records import count_async, prepare_async
from tether.decode.results import Population, assemble
from tether.decode.smc import SMCDriver, SMCSettings, run_async
from tether.errors import ConstraintError, TetherError

log = logging.getLogger("tether.serve")

# the HTTP request being served (set by ``decode.http``'s middleware; None outside HTTP)
REQUEST_SCOPE: contextvars.ContextVar[RequestScope | None] = contextvars.ContextVar(
    "tether_request_scope", default=None)
COMPILE_TIMEOUT_S = 60.0  # an engine that takes longer to compile a constraint fails it
PREPARED_REMEMBERED = 128  # constraints known compiled in every engine (they keep 256)


@dataclass(frozen=True)
class ServeSettings:
    options: Options = Options()
    limits: Limits = Limits()
    pre_align: Any = None  # an alignment.prealign.PreAligner, or None
    pre_align_concurrency: int = 4


def _metrics():
    from prometheus_client import Counter, Gauge

    names = {"checks": "tether_constraint_checks", "tokens": "tether_tokens",
             "resampling": "tether_resampling_events", "dead": "tether_dead_particles",
             "failed": "tether_failed_requests", "rewrites": "tether_prealign_rewrites",
             "rewrite_hits": "tether_prealign_cache_hits"}
    helps = {"checks": "Constraint checks made by AWRS", "tokens": "Tokens decided by AWRS",
             "resampling": "SMC resampling events", "dead": "Particles ended by the constraint",
             "failed": "Requests ended by a constraint budget or error",
             "rewrites": "Instructions pre-aligned (rewritten, shared or from the cache)",
             "rewrite_hits": "Pre-alignments answered from the cache or a rewrite in flight"}
    counters = {k: Counter(v, helps[k]) for k, v in names.items()}
    counters["records"] = Gauge("tether_particle_records",
                                "Particle records held in the engines (read at each scrape)")
    return counters


class TetherEngineClient:
    """Wraps vLLM's ``AsyncLLM``: AWRS for constrained requests, vLLM for the rest."""

    def __init__(self, engine: Any, settings: ServeSettings):
        self._engine = engine
        self.settings = settings
        self.tokenizer_path = engine.model_config.tokenizer
        self.served_name = str(engine.model_config.served_model_name or self.tokenizer_path)
        self.max_model_len = engine.model_config.max_model_len
        self._counters = _metrics()
        # Compilation and the guards' embeddings run here, off the event loop; the compile
        # cache (constraints.base) is keyed by the constraint's content and its parse target.
        self.pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="tether-work")
        self.rewriter_client: "TetherEngineClient | None" = None  # a MODEL rewriter's engine
        self._http = None  # a URL rewriter's client
        self._rewrites_in_flight: dict[tuple, asyncio.Future] = {}
        self._rewrite_slots = asyncio.Semaphore(settings.pre_align_concurrency)
        self._rewrites_waiting = 0
        self._prepared: OrderedDict = OrderedDict()  # specs every engine has compiled

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    @property
    def aligner(self) -> Any:
        return self.settings.pre_align

    async def warm_up(self) -> None:
        """Build the tokenizer's byte tables and import what the first JSON Schema and the
        first request's checks need, before the first request waits for them."""
        from tether.constraints import grammar, vocab_for
        from tether.decode import tca  # noqa: F401  (validate_params reads its opt-out)

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.pool, vocab_for, self.tokenizer_path)
        await loop.run_in_executor(self.pool, grammar.warm_up)

    async def count_records(self) -> int:
        count = await count_async(self._engine)
        self._counters["records"].set(count)
        return count

    # -- the EngineClient method vLLM's serving layer calls ------------------------------------
    async def generate(self, prompt: Any, sampling_params: Any, request_id: str,
                       **kwargs: Any) -> AsyncGenerator[Any, None]:
        scope = REQUEST_SCOPE.get()
        try:
            plan = policy.plan(sampling_params, prompt, self.settings.options,
                               self.settings.limits, scope)
            constraint = None if plan is None else await self._compile(plan.spec)
            if constraint is not None:
                try:
                    check_weights(plan.options.weights, [constraint])
                except ValueError as e:
                    raise policy.RequestError(f"vllm_xargs.tether_weights: {e}",
                                              "tether_weights") from None
        except ConstraintError as e:
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(str(e), parameter=getattr(e, "parameter", None)) from None
        if plan is None:
            async for out in self._engine.generate(prompt, sampling_params, request_id,
                                                   **kwargs):
                yield out
            return
        try:
            async for out in self.decode(prompt["prompt_token_ids"], sampling_params,
                                         request_id, plan, constraint, kwargs, scope):
                yield out
        except ConstraintFailed as e:
            # vLLM would answer a choice finished with "error" by a bare 500 "Internal server
            # error"; the client gets the failure instead (in a stream: vLLM's error event)
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(str(e)) from None

    async def _compile(self, spec: Any) -> Any:
        """Compile ``spec`` here (a bad one raises ``ConstraintError``), then in every engine,
        unless every engine already answered that it has it (each such call waits for an
        engine step; an engine that dropped it since compiles it again in a step)."""
        from tether.constraints import compile_constraint

        loop = asyncio.get_running_loop()
        constraint = await loop.run_in_executor(self.pool, compile_constraint, spec,
                                                self.tokenizer_path)
        if constraint.spec not in self._prepared:
            await prepare_async(self._engine, [constraint.spec.to_wire()], COMPILE_TIMEOUT_S)
            self._prepared[constraint.spec] = None
            while len(self._prepared) > PREPARED_REMEMBERED:
                self._prepared.popitem(last=False)
        self._prepared.move_to_end(constraint.spec)
        return constraint

    async def decode(self, prompt_ids: list[int], params: Any, request_id: str,
                     plan: policy.Plan, constraint: Any, kwargs: dict,
                     scope: RequestScope | None) -> AsyncGenerator[Any, None]:
        """Run one constrained request (``plan``) and yield vLLM ``RequestOutput``s: deltas
        while one particle streams, then the final output; ``ConstraintFailed`` in its place
        when the constraint failed (finish reason "error")."""
        from vllm.sampling_params import RequestOutputKind

        options = plan.options
        settings = SMCSettings(plan.particles, options.ess_threshold, "systematic", params.n)
        sampling = {"temperature": params.temperature, "top_p": params.top_p,
                    "top_k": params.top_k, "min_p": params.min_p,
                    "repetition_penalty": params.repetition_penalty,
                    "frequency_penalty": params.frequency_penalty,
                    "presence_penalty": params.presence_penalty,
                    "stop_token_ids": params.stop_token_ids, "min_tokens": params.min_tokens,
                    "logit_bias": params.logit_bias, "bad_words": params.bad_words,
                    "allowed_token_ids": params.allowed_token_ids,
                    "skip_special_tokens": params.skip_special_tokens,
                    "spaces_between_special_tokens": params.spaces_between_special_tokens}
        driver = SMCDriver([list(prompt_ids)], [constraint], settings,
                           seed=params.seed if params.seed is not None else
                           uuid.uuid4().int % (2 ** 32),
                           max_tokens=params.max_tokens, sampler="awrs",
                           estimator="recursive", max_rejections=options.max_rejections or None,
                           sampling={k: v for k, v in sampling.items() if v is not None},
                           run_id=uuid.uuid4().hex,  # never the client's id
                           budget_s=self.settings.limits.constraint_budget,
                           extra_args=plan.extra_args, weights=options.weights)
        streaming = params.output_kind == RequestOutputKind.DELTA
        stream_one = streaming and plan.particles == 1
        sent_tokens, sent_text = 0, ""
        async for changed in run_async(driver, self._engine, kwargs):
            if not stream_one:
                continue
            for _, particle, finished, completion in changed:
                if finished or len(particle.tokens) <= sent_tokens:
                    continue
                yield _output(request_id, prompt_ids, [(completion.text[len(sent_text):],
                                                        particle.tokens[sent_tokens:], None)],
                              finished=False)
                sent_tokens, sent_text = len(particle.tokens), completion.text
        population = assemble(driver.groups[0], params.n, self._decoder(params))
        self._count(population)
        picks = population.choices(params.n)
        outputs = []
        for index in picks:
            p = population.particles[index]
            # stop, length, or tether's reason: never a false "stop"
            text, tokens = p.text, p.tokens
            if stream_one:  # what the stream has not carried yet
                text = text[len(sent_text):] if text.startswith(sent_text) else ""
                tokens = tokens[sent_tokens:]
            outputs.append((text, tokens, p.finish_reason))
        if any(finish == "error" for _, _, finish in outputs):
            raise ConstraintFailed(population.failure)
        if scope is not None:  # the middleware sends it (a stream: in a chunk of its own)
            scope.fields[request_id] = tether_field(population, picks)
        yield _output(request_id, prompt_ids, outputs, finished=True)

    def _decoder(self, params: Any):
        from tether.constraints import vocab_for

        hf = vocab_for(self.tokenizer_path).hf
        skip = params.skip_special_tokens
        return lambda tokens: hf.decode(tokens, skip_special_tokens=skip)

    def _count(self, population: Population) -> None:
        stats = population.stats
        self._counters["checks"].inc(stats["checks"])
        self._counters["tokens"].inc(stats["tokens"])
        self._counters["resampling"].inc(stats["resampling_events"])
        self._counters["dead"].inc(stats["dead_particles"])
        self._counters["failed"].inc(int(population.failure is not None))

    # -- pre-alignment --------------------------------------------------------------------------
    async def pre_align(self, instruction: str, client: str) -> Any:
        """The rewrite of ``instruction`` for ``client`` (a hash of its credentials): from the
        cache, from a rewrite of the same instruction for the same client already under way,
        or a new one. Clients never share cache entries or rewrites in flight, so a response
        cannot tell one client what another asked. Past ``4 * concurrency`` waiting rewrites,
        the raw instruction is answered (reason ``busy``)."""
        from tether.alignment.prealign import Rewrite
        from tether.decode.prealign import rewriter_id

        aligner = self.aligner
        rid = rewriter_id(aligner, self.served_name)
        self._counters["rewrites"].inc()
        hit = aligner.lookup(rid, instruction, client)
        if hit is not None:
            self._counters["rewrite_hits"].inc()
            return hit
        key = (rid, client, instruction)
        pending = self._rewrites_in_flight.get(key)
        if pending is not None:
            self._counters["rewrite_hits"].inc()
            return await asyncio.shield(pending)
        if self._rewrites_waiting >= 4 * self.settings.pre_align_concurrency:
            return Rewrite(instruction, None, False, "busy: too many rewrites under way")
        task = asyncio.ensure_future(self._rewrite(aligner, rid, instruction, client))
        self._rewrites_in_flight[key] = task
        task.add_done_callback(lambda _: self._rewrites_in_flight.pop(key, None))
        return await asyncio.shield(task)  # a client that leaves does not cancel the others'

    async def _rewrite(self, aligner: Any, rid: str, instruction: str, client: str) -> Any:
        """One rewrite by the configured rewriter, judged by the guards (and cached)."""
        from tether.decode.prealign import http_rewrite_async, is_url, needs_plain_retry

        if is_url(aligner.rewriter):
            import httpx

            if self._http is None:
                self._http = httpx.AsyncClient()
            decode = lambda demand: http_rewrite_async(aligner, instruction, self._http, demand)
        else:
            engine = self if aligner.rewriter == "self" else self.rewriter_client
            decode = lambda demand: engine.rewrite_here(aligner, instruction, demand)
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        self._rewrites_waiting += 1
        try:
            async with self._rewrite_slots:
                try:
                    text, error = await decode(True)
                    if error and await loop.run_in_executor(self.pool, needs_plain_retry,
                                                            aligner, instruction):
                        text, error = await decode(False)
                except Exception as e:  # the raw instruction is answered; the request goes on
                    log.warning("pre-alignment failed: %s", e)
                    text, error = None, f"{type(e).__name__}: {str(e)[:200]}"
        finally:
            self._rewrites_waiting -= 1
        # the guards embed sentences: off the event loop
        return await loop.run_in_executor(self.pool, aligner.finish, rid, instruction, text,
                                          time.perf_counter() - t0, error, client)

    async def rewrite_here(self, aligner: Any, instruction: str,
                           demand: bool = True) -> tuple[str | None, str | None]:
        """Decode one rewrite on this engine (``decode.prealign.rewrite_job``)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from tether.constraints import vocab_for
        from tether.decode.prealign import outcome, rewrite_job

        loop = asyncio.get_running_loop()
        vocab = await loop.run_in_executor(self.pool, vocab_for, self.tokenizer_path)
        job = await loop.run_in_executor(self.pool, rewrite_job, aligner, instruction,
                                         vocab.hf, self.max_model_len, demand)
        if job.error:
            return None, job.error
        constraint = await self._compile(job.grammar)
        params = SamplingParams(temperature=0.0, max_tokens=job.max_tokens, seed=0)
        params.output_kind = RequestOutputKind.FINAL_ONLY
        plan = policy.Plan(job.grammar, self.settings.options, 1, {})
        final = None
        try:
            async for out in self.decode(job.prompt_ids, params,
                                         f"prealign-{uuid.uuid4().hex}", plan, constraint, {},
                                         None):
                final = out
        except ConstraintFailed as e:
            return None, str(e)
        completion = final.outputs[0]
        return outcome(completion.finish_reason, completion.text)


class ConstraintFailed(TetherError):
    """A request's constraint failed mid-generation (a grammar engine that refused to go on,
    a check that raised, a lost record): ``failure`` is the population's (reason, message,
    step); the message keeps its first line."""

    def __init__(self, failure: dict):
        message = str(failure["message"]).split("\n")[0]
        super().__init__(f"the constraint failed (step {failure['step']}): {message}")
        self.failure = failure


def tether_field(population: Population, picks: list[int]) -> dict:
    """The ``tether`` field of a response: each choice's weight and engine, the population's
    estimate and statistics (non-finite numbers become null in ``decode.http``)."""
    choices = []
    for index, i in enumerate(picks):
        p = population.particles[i]
        choice = {"index": index, "finish_reason": p.finish_reason,
                  "log_weight": p.log_weight, "engine": p.engine}
        if p.failure is not None:
            choice["failure"] = p.failure
        choices.append(choice)
    stats = population.stats
    return {"choices": choices, "particles": len(population.particles),
            "log_z": population.log_z, "resampling_events": stats["resampling_events"],
            "failure": population.failure,
            # copies made at resampling, and the prompt tokens the engines computed for all of
            # them (the rest came from the prefix cache)
            "copies": stats["copies"], "copy_prefill_tokens": stats["copy_prefill_tokens"],
            "stats": {"weights": stats["weights"], "checks": stats["checks"],
                      "tokens": stats["tokens"],
                      "checks_per_token": stats["checks"] / stats["tokens"]
                      if stats["tokens"] else 0.0,
                      "rejections": stats["rejections"],
                      "dead_particles": stats["dead_particles"]}}


def _output(request_id: str, prompt_ids: list[int], outputs: list[tuple], finished: bool):
    """A vLLM ``RequestOutput`` of (text, tokens, finish reason) per choice."""
    from vllm.outputs import CompletionOutput, RequestOutput

    completions = [CompletionOutput(index=i, text=text, token_ids=list(tokens),
                                    cumulative_logprob=None, logprobs=None,
                                    finish_reason=finish, stop_reason=None)
                   for i, (text, tokens, finish) in enumerate(outputs)]
    return RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=prompt_ids,
                         prompt_logprobs=None, outputs=completions, finished=finished)

