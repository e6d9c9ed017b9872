"""What several bench scripts share: their input data, a loopback port, starting a server, the
versions of the systems a bench ran (every bench prints them with its results)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA_NOTE = ("Inputs are read from ../shared/data beside the checkout (this team's machines and "
             "CI have it; the test suite does not need it). A missing input stops the bench "
             "with an error naming it.")


def shared_data(*parts: str) -> Path:
    """A benchmark input under ``../shared/data``; a missing one ends the bench loudly."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        raise SystemExit(f"benchmark data missing: {path} (benches read ../shared/data beside "
                         "the checkout)")
    return path


def schema_files(subset: str, n: int | None = None) -> list[Path]:
    """The first ``n`` JSON Schemas (by name) of a JSONSchemaBench subset; fewer is an error."""
    files = sorted(shared_data("jsonschemabench", subset).glob("*.json"))
    if not files or (n is not None and len(files) < n):
        raise SystemExit(f"benchmark data: {len(files)} schemas in jsonschemabench/{subset}, "
                         f"{n or 1} wanted")
    return files[:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of ``packages`` in this interpreter ("-" where one is missing)."""
    out = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "-"
    return out


def cpu_name() -> str:
    """The CPU's model name and whether it has AMX / AVX-512 (figures differ by both)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    extras = [f for f in ("amx_bf16", "avx512f", "avx512_bf16") if f in flags]
    return f"{name} ({', '.join(extras) or 'no AMX/AVX-512'})"


def start_server(cmd: list[str], port: int, log: Path, timeout: float = 900,
                 env: dict | None = None) -> subprocess.Popen:
    """Start ``cmd`` and wait until it answers /health on ``port``. The server gets SIGTERM
    when the bench dies, however it dies (Linux's PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, **(env or {})),
                            preexec_fn=lambda: ctypes.CDLL(None).prctl(1, signal.SIGTERM))
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"the server did not start; see {log}") from None
            time.sleep(1)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()


TETHER = str(Path(sys.executable).parent / "tether")
