"""A TCA engine in a child process of its own, for the engine tests of TCA.

vLLM keeps its distributed state and its KV connector per process, and an in-process engine's
shutdown tears that state down, which would break the session's plain engine; so each TCA test
file runs its engine in a spawned child. The tests send the child the names of scenario
functions of their own module, which run next to the live engine (its connectors, runner and
layers are reachable) and answer with plain data.
"""

from __future__ import annotations

import importlib
import multiprocessing
import traceback


class ChildError(RuntimeError):
    """A scenario raised in the child; the message is its traceback."""


class EngineChild:
    """``tether.LLM(**llm_kwargs)`` in a spawned process; ``call(name)`` runs
    ``module.name(llm, **kwargs)`` there."""

    def __init__(self, module: str, **llm_kwargs):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child_main, args=(child, module, llm_kwargs))
        self.proc.start()
        self._answer()  # the engine is up

    def call(self, name: str, **kwargs):
        self.conn.send((name, kwargs))
        return self._answer()

    def _answer(self):
        if not self.conn.poll(900):
            raise TimeoutError("the TCA engine's process did not answer")
        status, value = self.conn.recv()
        if status == "error":
            raise ChildError(value)
        return value

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(120)
        if self.proc.is_alive():
            self.proc.kill()


def _child_main(conn, module: str, llm_kwargs: dict) -> None:
    from tether.decode.llm import LLM

    try:
        scenarios = importlib.import_module(module)
        llm = LLM(**llm_kwargs)
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))
    while (message := conn.recv()) is not None:
        name, kwargs = message
        try:
            conn.send(("ok", getattr(scenarios, name)(llm, **kwargs)))
        except Exception:
            conn.send(("error", traceback.format_exc()))
    llm.close()


def greedy(llm, prompts, max_tokens=16, **params):
    """vLLM's own generate on the engine under ``tether.LLM``."""
    from vllm import SamplingParams

    return llm.engine.llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=max_tokens, **params), use_tqdm=False)


def parts(llm):
    """(scheduler connector, worker connector, worker) of an in-process engine."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    core = llm.engine.llm.llm_engine.engine_core.engine_core
    return core.scheduler.connector, get_kv_transfer_group(), \
        core.model_executor.driver_worker.worker


def scheduler_of(llm):
    return llm.engine.llm.llm_engine.engine_core.engine_core.scheduler


def spy(events, obj, name, label):
    """Record each call of ``obj.name`` (an instance attribute shadowing the method)."""
    original = getattr(obj, name)

    def call(*args, **kwargs):
        events.append(label(*args) if callable(label) else label)
        return original(*args, **kwargs)

    setattr(obj, name, call)
    return lambda: delattr(obj, name)


def smollm2_budgets():
    """The budgets the TCA engine tests run with: SmolLM2 calibrated on the wikitext fixture
    (blocks of 32, window 16, w = 128 observed queries)."""
    from conftest import fixture
    from tether.attention.calibrate import calibrate

    text = fixture("wikitext-2", "valid-head.txt").read_text(encoding="utf-8")
    return calibrate("smollm2", block=32, tokens=256, window=16, text=text)
