"""``tether serve``: vLLM's OpenAI-compatible server with AWRS (and SMC) structured outputs.

The server is vLLM's own: its argument parser, FastAPI app, endpoints and request handling.
tether adds, each in its own module:

* in the engine: the AWRS logits processor (``decode.processor``) and the worker extension
  that hands out its records and compiles constraints ahead of requests (``decode.records``);
* ``decode.server.TetherEngineClient``, given to vLLM's app in place of its ``AsyncLLM``:
  which requests AWRS decodes and what it refuses (``decode.policy``), the SMC driver's async
  front end (``decode.smc.run_async``), the results (``decode.results``), pre-alignment;
* ``decode.http.tether_fields``, a middleware (through vLLM's ``--middleware``): the request
  scope, pre-alignment of chat bodies, the ``tether`` field of JSON responses, the records
  gauge of /metrics;
* this module: the command line. Every tether option is validated at start-up
  (``policy.ServerOptions``): a bad one stops the server with a message naming it, instead of
  failing every request later.

Limits and bounds (an operator exposes this to clients it does not trust): particles and ``n``
are at most ``--max-particles`` per HTTP request (all its prompts together); every particle's
constraint has a time budget (``--constraint-budget`` seconds, its lineage through
resampling); one engine step spends a bounded time on constraints whatever the requests ask
(``processor.StepGrants``); a spec over 256 KB or a schema nested deeper than 64 levels is a
400; pre-alignment runs at most ``--pre-align-concurrency`` rewrites at once.

Finish reasons in the OpenAI choices: ``stop`` (complete and valid), ``length``
(``max_tokens`` reached), and, where the output is neither, tether's own reason instead of a
misleading one: ``constraint`` (no allowed continuation), ``budget``, ``error``. JSON numbers
that are not finite (the log weight of a dead particle, the log Z of a population with no
complete particle) are sent as null.

Per-request overrides travel in ``vllm_xargs``: ``tether_sampler`` ("awrs" or "default"),
``tether_particles``, ``tether_ess_threshold``, ``tether_max_rejections`` (0: unbounded),
``tether_weights`` ("auto", "exact", "estimate"), ``tether_canonical`` (true: outputs spelled
with the tokenizer's own encodings, ``tether.Canonical``), ``tether_pre_align`` (false: opt
out).
"""

from __future__ import annotations

from typing import Any

from tether.decode.policy import DEFAULT_MAX_PARTICLES
from tether.decode.processor import DEFAULT_BUDGET_S, DEFAULT_MAX_REJECTIONS

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
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="vLLM's INFO logs and uvicorn's access log")
    parser = make_arg_parser(parser)
    # vLLM's own parser takes the model as its positional ``model_tag``; a second positional of
    # that name would receive it and then be overwritten by vLLM's default (None)
    (model_tag,) = [a for a in parser._actions if a.dest == "model_tag"]
    model_tag.metavar = "MODEL"
    model_tag.help = "registered name, HF directory or hub id (default: smollm2)"
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
    group.add_argument("--awrs-weights", choices=["auto", "exact", "estimate"], default="auto",
                       help="SMC step weights: exact (the allowed mass, from the constraint's "
                       "full mask), estimate (AWRS's unbiased estimator), auto (exact where "
                       "the mask is cheap: llguidance; the default)")
    group.add_argument("--awrs-canonical", action="store_true",
                       help="spell constrained outputs only with the tokenizer's own encodings "
                       "where the constraint fixes the spelling (choices, enums, keys; "
                       "tether.Canonical); a request chooses with vllm_xargs "
                       "{\"tether_canonical\": true|false}")
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
    group.add_argument("--pre-align-concurrency", type=int, default=4, metavar="N",
                       help="rewrites decoded at once; past 4N waiting, instructions are "
                       "answered as they are (reason 'busy')")
    group.add_argument("--constraint-budget", type=float, default=DEFAULT_BUDGET_S,
                       metavar="SECONDS",
                       help="constraint time each particle may spend (through resampling); "
                       "a request that runs out ends with finish_reason 'budget'")
    group.add_argument("--tca", default=None, metavar="BUDGETS.json",
                       help="TCA-Attention inside the engine, with the budgets written by "
                       "`tether calibrate` (CPU backend); needs --kv-budget; a request opts "
                       "out with vllm_xargs {\"tether_tca\": false}")
    group.add_argument("--kv-budget", type=float, default=None, metavar="F",
                       help="with --tca: the share of each request's KV to keep, in (0, 1]")
    return parser


# policy.ServerOptions field -> the command-line option that sets it
_FLAGS = {("options", "sampler"): "--sampler", ("options", "particles"): "--particles",
          ("options", "ess_threshold"): "--ess-threshold",
          ("options", "max_rejections"): "--awrs-max-rejections",
          ("options", "weights"): "--awrs-weights",
          ("options", "canonical"): "--awrs-canonical",
          ("limits", "max_particles"): "--max-particles",
          ("limits", "constraint_budget"): "--constraint-budget"}


def server_settings(args: Any, parser: Any) -> Any:
    """The validated tether settings of ``args`` (``parser.error`` names a bad option)."""
    from pydantic import ValidationError

    from tether.decode.policy import Limits, Options, ServerOptions
    from tether.decode.server import ServeSettings

    try:
        validated = ServerOptions(
            options=Options(sampler=args.sampler, particles=args.particles,
                            ess_threshold=args.ess_threshold,
                            max_rejections=args.awrs_max_rejections,
                            weights=args.awrs_weights, canonical=args.awrs_canonical),
            limits=Limits(max_particles=args.max_particles,
                          constraint_budget=args.constraint_budget))
    except ValidationError as e:
        err = e.errors()[0]
        flag = _FLAGS.get(tuple(err["loc"][:2]), "tether options")
        parser.error(f"{flag}: {err['msg']} (got {err.get('input')!r})")
    if not 0.0 <= args.pre_align_min_similarity <= 1.0:
        parser.error("--pre-align-min-similarity must be in [0, 1]")
    if args.pre_align_concurrency < 1:
        parser.error("--pre-align-concurrency must be at least 1")
    aligner = None
    if args.pre_align is not None:
        from tether.alignment.prealign import PreAligner
        from tether.decode.prealign import is_url
        from tether.models import ModelError, resolve

        rewriter = args.pre_align
        if rewriter != "self" and not is_url(rewriter):
            try:
                rewriter = resolve(rewriter)
            except ModelError as e:
                parser.error(f"--pre-align: {e}")
        aligner = PreAligner(rewriter, min_similarity=args.pre_align_min_similarity)
    return ServeSettings(validated.options, validated.limits, aligner,
                         args.pre_align_concurrency)


def main(argv: list[str] | None = None) -> int:
    import sys

    import uvloop

    from tether.decode.engine import check_vllm_version, configure_environment, on_gpu
    from tether.models import DEFAULT_MODEL, ModelError, resolve

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
    try:
        args.model = resolve(name)
    except ModelError as e:
        parser.error(str(e))
    if not args.served_model_name:
        args.served_model_name = [name]  # clients send the name the operator typed
    # the operator's own processors run first: AWRS samples from what they leave
    args.logits_processors = list(args.logits_processors or []) + [
        "tether.decode.processor:AWRSLogitsProcessor"]
    args.worker_extension_cls = "tether.decode.records.TetherWorkerExtension"
    args.middleware = list(args.middleware or []) + ["tether.decode.http.tether_fields"]
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
    settings = server_settings(args, parser)
    for option in ("api_server_count", "data_parallel_multi_port_external_lb"):
        if getattr(args, option, None) not in (None, 0, 1, False):
            parser.error(f"--{option.replace('_', '-')} is not supported by tether serve: "
                         "its AWRS wrapper lives in one API server process")
    if args.tca is not None or args.kv_budget is not None:
        if args.kv_transfer_config is not None or "--worker-cls" in user_set:
            parser.error("--tca brings its own --kv-transfer-config and --worker-cls")
        from vllm.config import KVTransferConfig

        from tether.decode.tca import engine_overrides

        try:
            tca = engine_overrides(args.tca, args.kv_budget)
        except ValueError as exc:
            parser.error(str(exc))
        args.kv_transfer_config = KVTransferConfig(**tca["kv_transfer_config"])
        args.worker_cls = tca["worker_cls"]
    validate_parsed_serve_args(args)
    if args.headless:  # engines only, for a head node's API server (multi-node launch)
        from vllm.entrypoints.cli.serve import run_headless

        args.api_server_count = 0
        run_headless(args)
        return 0
    uvloop.run(_serve(args, settings))
    return 0


def _explicit_options(argv: list[str]) -> list[str]:
    return [a.split("=")[0] for a in argv if a.startswith("--")]


async def _serve(args: Any, settings: Any) -> None:
    import contextlib
    import sys

    from vllm.entrypoints.launchers.api_server import entry
    from vllm.entrypoints.launchers.launcher import setup_server

    from tether.decode import http
    from tether.decode.prealign import is_url
    from tether.decode.server import TetherEngineClient

    listen_address, sock = setup_server(args, reuse_port=False)
    async with contextlib.AsyncExitStack() as stack:
        engine = await stack.enter_async_context(entry.build_async_engine_client(args))
        client = http.CLIENT = TetherEngineClient(engine, settings)
        await client.warm_up()
        aligner = settings.pre_align
        if aligner is not None and aligner.rewriter != "self" and not is_url(aligner.rewriter):
            client.rewriter_client = await _rewriter_engine(stack, args, aligner.rewriter,
                                                            settings)
        print(f"tether serve: model {args.served_model_name[0]!r} on {listen_address} "
              f"(sampler {settings.options.sampler})", file=sys.stderr, flush=True)
        shutdown = await entry.build_and_serve(client, listen_address, sock, args)
    try:
        await shutdown
    finally:
        sock.close()


async def _rewriter_engine(stack: Any, args: Any, model: str, settings: Any) -> Any:
    """An engine of its own for a rewriter model (its own engine process), with AWRS."""
    import copy
    from dataclasses import replace

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from tether.decode.server import TetherEngineClient

    rewriter_args = copy.copy(args)
    rewriter_args.model = rewriter_args.tokenizer = model
    rewriter_args.served_model_name = None
    rewriter_args.data_parallel_size = 1
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs.from_cli_args(rewriter_args))
    stack.callback(engine.shutdown)
    options = settings.options.model_copy(update={"sampler": "awrs", "particles": 1})
    client = TetherEngineClient(engine, replace(settings, options=options, pre_align=None))
    await client.warm_up()
    return client
