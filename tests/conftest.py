"""Shared fixtures: real tokenizers, the real engine (one per test session), test data.

The suite reads nothing outside the repository: its real inputs are the small committed
fixtures under ``tests/data`` (listed, with their sources and licences, in its README).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"

# The engine runs in-process so that its processor and our test share the same Python state.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def fixture(*parts: str) -> Path:
    """A committed test input under ``tests/data`` (a missing one fails the test)."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"missing test fixture: {path}")
    return path


@pytest.fixture(scope="session", params=["smollm2", "gemma3"])
def vocab(request):
    """Each real tokenizer: byte-level BPE (SmolLM2) and SentencePiece with byte fallback."""
    from tether import vocab_for

    return vocab_for(request.param)


@pytest.fixture(scope="session")
def smollm2_vocab():
    from tether import vocab_for

    return vocab_for("smollm2")


@pytest.fixture(scope="session")
def llm():
    """One real vLLM engine on the embedded SmolLM2-135M-Instruct for the whole session.

    In fp32: the CPU engine's default bf16 computes a prefix's logits differently in prefill
    and in decode (and cached or not), by enough that an exact reference built from prompt
    logprobs is not the distribution decoding samples from (log Z off by about 0.5 nats on a
    10-token output), and that a seeded rerun after a cold cache can flip a near tie. The
    statistical tests compare against exact answers, so they need the engine to compute one
    distribution.
    """
    from tether.decode.llm import LLM

    engine = LLM("smollm2", max_model_len=2048, dtype="float32")
    yield engine
    engine.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TETHER = str(Path(sys.executable).parent / "tether")
# Servers in the tests: fp32 (see ``llm``), 1 GiB of KV space per engine (several engines
# live at once in a test session), and an operator's own logits processor beside AWRS
# (tests/ban_processor.py, importable from the tests folder).
SERVER_ARGS = ["--sampler", "awrs", "--max-model-len", "1024", "--dtype", "float32",
               "--logits-processors", "ban_processor:BanTokensProcessor"]
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def _die_with_parent() -> None:
    """In a child before exec: SIGTERM when the test process dies, even by SIGKILL, so that a
    killed test run leaves no server behind (Linux's PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


@contextlib.contextmanager
def running(cmds: list[list[str]], log_dir: Path, port: int, timeout: float = 600):
    """Start ``cmds`` (the first one serves HTTP on ``port``), wait for /health, yield the base
    URL and the first process's log path; stop them all afterwards."""
    path = os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", PYTHONPATH=path, **SERVER_ENV)
    procs, logs = [], []
    for i, cmd in enumerate(cmds):
        log = log_dir / f"server-{i}.log"
        with open(log, "w") as fh:
            procs.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True, preexec_fn=_die_with_parent))
        logs.append(log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            for proc, log in zip(procs, logs):
                if proc.poll() is not None:
                    pytest.fail(f"server exited: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"server did not come up: {logs[0].read_text()[-3000:]}")
            time.sleep(1)
        yield base, logs[0]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)


@pytest.fixture(scope="session")
def server_dp1(tmp_path_factory):
    """``tether serve --sampler awrs`` on the embedded model, one engine, for the session."""
    port = free_port()
    cmd = [TETHER, "serve", *SERVER_ARGS, "--host", "127.0.0.1", "--port", str(port)]
    with running([cmd], tmp_path_factory.mktemp("serve-dp1"), port) as (base, log):
        yield base, log


def openai_client(base: str, api_key: str = "none"):
    from openai import OpenAI

    return OpenAI(base_url=base + "/v1", api_key=api_key, max_retries=0, timeout=600)


def post(server, path, body, timeout=600):
    """(status, raw body) of a JSON POST, without a client library's parsing."""
    req = urllib.request.Request(server + path, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(server, name) -> float:
    with urllib.request.urlopen(server + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")



def walk(constraint, token_ids):
    """Feed tokens one by one; return (index of the first refused token or None, final state)."""
    state = constraint.start()
    for i, t in enumerate(token_ids):
        if not constraint.allows(state, t):
            return i, state
        state = constraint.advance(state, t)
    return None, state


def encode(vocab, text: str) -> list[int]:
    return list(vocab.hf.encode(text, add_special_tokens=False))


def token_at_byte(vocab, token_ids, byte_pos: int) -> int:
    """Index of the token whose bytes cover ``byte_pos`` of the concatenated output."""
    end = 0
    for i, t in enumerate(token_ids):
        end += len(vocab.token_bytes[t])
        if end > byte_pos:
            return i
    raise ValueError("byte position past the end")
