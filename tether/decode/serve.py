"""``tether serve``: vLLM's OpenAI-compatible server, with AWRS (and SMC) structured outputs.

The server is vLLM's own: its argument parser, FastAPI app, endpoints and request handling.
tether adds three things:

1. the AWRS logits processor and the records' worker extension in the engine;
2. ``TetherEngineClient``, a wrapper around vLLM's ``AsyncLLM`` given to vLLM's app in its
   place. With ``--sampler awrs``, a request whose sampling parameters carry a constraint
   (``response_format`` json_schema / json_object, or ``structured_outputs`` json, regex,
   grammar, choice, on /v1/chat/completions and /v1/completions) is decoded by AWRS instead of
   vLLM's masking backend: the wrapper compiles the constraint (a bad one raises a validation
   error, which vLLM answers with HTTP 400), clears vLLM's ``structured_outputs`` and runs the
   request as one particle, or, with ``n > 1`` or ``particles > 1``, as an SMC population of
   max(particles, n) particles whose ``n`` posterior draws become the choices. Requests without
   a constraint pass through untouched.
3. an HTTP middleware (through vLLM's ``--middleware``) that adds a ``tether`` extension field to JSON responses of those requests:
   per choice ``log_weight`` and ``finish_reason`` (tether's: ``stop``, ``length`` or
   ``constraint``), the population's ``log_z``, ``particles`` and ``resampling_events``, and
   constraint statistics (``checks``, ``tokens``, ``checks_per_token``, ``rejections``).

Per-request overrides travel in ``vllm_xargs``: ``tether_sampler`` ("awrs" or "default"),
``tether_particles``, ``tether_ess_threshold``, ``tether_max_rejections`` (0: unbounded).

Streaming: with one particle the tokens stream as they are decided. With several, the
population has to finish before a draw can be chosen, so the chosen draw is streamed as one
chunk once SMC ends.

A client that disconnects cancels the request; every particle of it is aborted.
/metrics adds tether counters: ``tether_constraint_checks_total``, ``tether_tokens_total``,
``tether_resampling_events_total``, ``tether_dead_particles_total``.
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from dataclasses import dataclass
from typing import Any, AsyncGenerator

from tether.decode.processor import DEFAULT_MAX_REJECTIONS
from tether.decode.records import ParticleRecord, check_ranks_agree
from tether.decode.smc import SMCDriver, SMCSettings
from tether.errors import ConstraintError

MAX_SPEC_BYTES = 256 * 1024  # a bigger schema or grammar is refused with a 400
SIDE_INFO_LIMIT = 4096  # responses whose extension field was not collected are dropped past this


@dataclass
class ServeSettings:
    sampler: str = "default"  # "awrs" or "default" (vLLM's structured outputs)
    particles: int = 1
    ess_threshold: float = 0.5
    max_rejections: int | None = DEFAULT_MAX_REJECTIONS


def _metrics():
    from prometheus_client import Counter

    names = {"checks": "tether_constraint_checks", "tokens": "tether_tokens",
             "resampling": "tether_resampling_events", "dead": "tether_dead_particles"}
    helps = {"checks": "Constraint checks made by AWRS", "tokens": "Tokens decided by AWRS",
             "resampling": "SMC resampling events", "dead": "Particles ended by the constraint"}
    return {k: Counter(v, helps[k]) for k, v in names.items()}


def spec_from_structured_outputs(so: Any) -> Any:
    """vLLM's ``StructuredOutputsParams`` -> a tether spec (None if it carries no constraint)."""
    from tether import Choice, Grammar, JsonSchema, Regex

    if so is None:
        return None
    if so.json is not None:
        schema = json.loads(so.json) if isinstance(so.json, str) else so.json
        return JsonSchema(schema)
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


def _spec_size(spec: Any) -> int:
    for attr in ("schema", "pattern", "text", "options"):
        if hasattr(spec, attr):
            return len(json.dumps(getattr(spec, attr)) if attr != "text" else spec.text)
    return 0


_STREAM_END = object()  # a particle's stream has ended (wakes the SMC loop)


class _AsyncBackend:
    """Submits particles as ``AsyncLLM.generate`` streams feeding one queue."""

    def __init__(self, engine: Any, queue: asyncio.Queue, kwargs: dict):
        self.engine, self.queue, self.kwargs = engine, queue, kwargs
        self.tasks: dict[str, asyncio.Task] = {}

    def submit(self, request_id: str, prompt: dict, params: Any) -> None:
        from vllm.sampling_params import RequestOutputKind

        params.output_kind = RequestOutputKind.CUMULATIVE
        self.tasks[request_id] = asyncio.ensure_future(self._consume(request_id, prompt, params))

    async def _consume(self, request_id: str, prompt: dict, params: Any) -> None:
        try:
            async for out in self.engine.generate(prompt, params, request_id, **self.kwargs):
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

    def cancel_all(self) -> None:
        for request_id in list(self.tasks):
            self.abort(request_id)


class TetherEngineClient:
    """Wraps vLLM's ``AsyncLLM``: AWRS for constrained requests, vLLM for the rest."""

    def __init__(self, engine: Any, settings: ServeSettings):
        self._engine = engine
        self._settings = settings
        self._tokenizer_path = engine.model_config.tokenizer
        self.side_info: dict[str, dict] = {}
        self._counters = _metrics()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    # -- planning ---------------------------------------------------------------------------
    def _plan(self, params: Any) -> dict | None:
        extra = dict(params.extra_args or {})
        sampler = extra.pop("tether_sampler", self._settings.sampler)
        if sampler not in ("awrs", "default"):
            raise ConstraintError(f"unknown sampler {sampler!r}; use 'awrs' or 'default'")
        overrides = {k: extra.pop(k) for k in list(extra) if k.startswith("tether_")}
        spec = spec_from_structured_outputs(params.structured_outputs)
        if sampler != "awrs" or spec is None:
            if overrides:
                raise ConstraintError(f"unknown tether options {sorted(overrides)}"
                                      if sampler == "awrs" else
                                      "tether options need the awrs sampler and a constraint")
            return None
        unknown = set(overrides) - {"tether_particles", "tether_ess_threshold",
                                    "tether_max_rejections"}
        if unknown:
            raise ConstraintError(f"unknown tether options: {', '.join(sorted(unknown))}")
        if _spec_size(spec) > MAX_SPEC_BYTES:
            raise ConstraintError(f"the constraint is larger than {MAX_SPEC_BYTES} bytes")
        from tether.constraints import compile_constraint

        compiled = compile_constraint(spec, self._tokenizer_path)
        max_rejections = int(overrides.get("tether_max_rejections",
                                           self._settings.max_rejections or 0)) or None
        particles = int(overrides.get("tether_particles", self._settings.particles))
        return {"constraint": compiled, "extra": extra,
                "particles": max(particles, params.n),
                "ess_threshold": float(overrides.get("tether_ess_threshold",
                                                     self._settings.ess_threshold)),
                "max_rejections": max_rejections}

    # -- the EngineClient method vLLM's serving layer calls ------------------------------------
    async def generate(self, prompt: Any, sampling_params: Any, request_id: str,
                       **kwargs: Any) -> AsyncGenerator[Any, None]:
        try:
            plan = self._plan(sampling_params)
        except ConstraintError as e:
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(str(e)) from None
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
                    "top_k": params.top_k, "stop": params.stop,
                    "stop_token_ids": params.stop_token_ids, "min_tokens": params.min_tokens,
                    "logit_bias": params.logit_bias,
                    "skip_special_tokens": params.skip_special_tokens}
        settings = SMCSettings(plan["particles"], plan["ess_threshold"], "systematic",
                               params.n, False)
        queue: asyncio.Queue = asyncio.Queue()
        backend = _AsyncBackend(self._engine, queue, kwargs)
        stream_one = plan["particles"] == 1 and params.output_kind == RequestOutputKind.DELTA
        driver = SMCDriver(backend, [prompt_ids], [plan["constraint"]], settings,
                           seed=params.seed if params.seed is not None else
                           uuid.uuid4().int % (2 ** 32),
                           max_tokens=params.max_tokens, sampler="awrs",
                           estimator="recursive", max_rejections=plan["max_rejections"],
                           sampling={k: v for k, v in sampling.items() if v is not None},
                           run_id=request_id)
        sent, sent_text = 0, ""  # tokens and text already streamed (one particle)
        eos = plan["constraint"].eos_token_ids
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
                since = driver.since(changed)
                records = await self._read(since) if since else {}
                driver.after_read(changed, records)
                if stream_one and outputs and not outputs[-1].finished:
                    particle = driver.groups[0].particles[0]
                    text = self._decode([t for t in particle.tokens if t not in eos])
                    if len(particle.tokens) > sent and not text.endswith("\ufffd"):
                        yield _delta(request_id, prompt_ids, text[len(sent_text):],
                                     particle.tokens[sent:])
                        sent, sent_text = len(particle.tokens), text
            groups = driver.finish_run(await self._pop(driver.keys))
        finally:
            backend.cancel_all()
        yield self._final(request_id, prompt_ids, groups[0], settings, sent, sent_text,
                          stream=params.output_kind == RequestOutputKind.DELTA)

    async def _read(self, since: dict) -> dict:
        answers = await self._engine.collective_rpc("tether_read_steps", args=(since,))
        check_ranks_agree(answers)
        raw = answers[0] if answers else {}
        return {k: ParticleRecord.from_dict(dict(v, key=k)) for k, v in raw.items()}

    async def _pop(self, keys: list[str]) -> dict:
        if not keys:
            return {}
        answers = await self._engine.collective_rpc("tether_pop_records", args=(list(keys),))
        check_ranks_agree(answers)
        raw = answers[0] if answers else {}
        return {k: ParticleRecord.from_dict(v) for k, v in raw.items()}

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
            log_w = -math.inf if finish == "constraint" else math.fsum(s.log_weight for s in steps)
            results.append((p, finish, log_w, steps))
        final = [(p.log_weight(group.last_resample) if f == "stop" else -math.inf)
                 for p, f, _, _ in results]
        weights = resampling.normalize(final)
        if settings.particles == 1:
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
                finish_reason="length" if finish == "length" else "stop",
                stop_reason=None))
            info.append({"index": index, "finish_reason": finish, "log_weight": log_w})
        checks = sum(s.checks for _, _, _, steps in results for s in steps)
        tokens = sum(len(steps) for _, _, _, steps in results)
        dead = sum(f == "constraint" for _, f, _, _ in results)
        log_z = (group.log_z + resampling.log_mean_exp(final)) if any(
            math.isfinite(x) for x in final) else -math.inf
        self._counters["checks"].inc(checks)
        self._counters["tokens"].inc(tokens)
        self._counters["resampling"].inc(len(group.resamples))
        self._counters["dead"].inc(dead)
        self._remember(request_id, {
            "choices": info, "particles": len(particles), "log_z": log_z,
            "resampling_events": len(group.resamples),
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
        self.side_info[request_id] = info
        while len(self.side_info) > SIDE_INFO_LIMIT:
            self.side_info.pop(next(iter(self.side_info)))


def _delta(request_id: str, prompt_ids: list[int], text: str, tokens: list[int]) -> Any:
    from vllm.outputs import CompletionOutput, RequestOutput

    completion = CompletionOutput(index=0, text=text, token_ids=list(tokens),
                                  cumulative_logprob=None, logprobs=None, finish_reason=None)
    return RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=prompt_ids,
                         prompt_logprobs=None, outputs=[completion], finished=False)


_CLIENT: TetherEngineClient | None = None  # the server's wrapper, for the middleware below


async def tether_fields(request: Any, call_next: Any) -> Any:
    """HTTP middleware (vLLM's ``--middleware``): adds the ``tether`` field to the JSON
    responses of requests that AWRS decoded."""
    from starlette.responses import Response

    response = await call_next(request)
    if _CLIENT is None or not request.url.path.endswith("completions") or \
            response.headers.get("content-type", "").split(";")[0] != "application/json":
        return response
    body = b"".join([chunk async for chunk in response.body_iterator])
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("id") in _CLIENT.side_info:
        data["tether"] = _CLIENT.side_info.pop(data["id"])
        body = json.dumps(data).encode()
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    return Response(body, status_code=response.status_code, headers=headers,
                    media_type="application/json")


# -- the command ----------------------------------------------------------------------------------

def build_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(
        prog="tether serve",
        description="vLLM's OpenAI-compatible server with AWRS (and SMC) structured outputs. "
        "Takes every `vllm serve` argument, plus the tether options below. MODEL defaults "
        "to the embedded SmolLM2-135M-Instruct.")
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="registered name, HF directory or hub id (default: smollm2)")
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
                       help="finish a step from the full mask after R rejections (0: never)")
    return parser


def main(argv: list[str] | None = None) -> int:
    import uvloop

    from tether.decode.engine import check_vllm_version, configure_environment, on_gpu
    from tether.models import resolve

    check_vllm_version()
    configure_environment(in_process=False)
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    cli_env_setup()
    parser = build_parser()
    args = parser.parse_args(argv)
    user_set = set(_explicit_options(argv))
    args.model = resolve(args.model_tag or (args.model if "--model" in user_set else None))
    args.logits_processors = ["tether.decode.processor:AWRSLogitsProcessor"]
    args.worker_extension_cls = "tether.decode.records.TetherWorkerExtension"
    args.middleware = list(args.middleware or []) + ["tether.decode.serve.tether_fields"]
    if not on_gpu():
        if "--gpu-memory-utilization" not in user_set:
            args.gpu_memory_utilization = 0.5
        if "--block-size" not in user_set:
            args.block_size = 32
        if "--enforce-eager" not in user_set:
            args.enforce_eager = True
    if args.particles < 1:
        parser.error("--particles must be at least 1")
    validate_parsed_serve_args(args)
    settings = ServeSettings(args.sampler, args.particles, args.ess_threshold,
                             args.awrs_max_rejections or None)
    uvloop.run(_serve(args, settings))
    return 0


def _explicit_options(argv: list[str] | None) -> list[str]:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    return [a.split("=")[0] for a in argv if a.startswith("--")]


async def _serve(args: Any, settings: ServeSettings) -> None:
    global _CLIENT
    from vllm.entrypoints.launchers.api_server import entry
    from vllm.entrypoints.launchers.launcher import setup_server

    listen_address, sock = setup_server(args, reuse_port=False)
    async with entry.build_async_engine_client(args) as engine:
        _CLIENT = TetherEngineClient(engine, settings)
        shutdown = await entry.build_and_serve(_CLIENT, listen_address, sock, args)
    try:
        await shutdown
    finally:
        sock.close()
