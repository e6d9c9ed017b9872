"""Tokenizer transplantation by OMP: the solver, a synthetic pair, and the real pair."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tether.alignment.omp import batch_omp


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("select", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,d,k", [(40, 16, 3), (300, 64, 8), (500, 32, 12)])
def test_omp_matches_scikit_learn(m, d, k, select):
    """Selection by bfloat16 products (with the float32 shortlist) makes scikit-learn's
    choices, as the float32 selection does."""
    from sklearn.linear_model import orthogonal_mp

    D = unit_rows(m, d, m)
    X = torch.randn(25, d, generator=torch.Generator().manual_seed(d))
    idx, coef = batch_omp(X, D, k, select_dtype=select)
    for b in range(len(X)):
        ref = orthogonal_mp(D.double().numpy().T, X[b].double().numpy(), n_nonzero_coefs=k)
        ours = np.zeros(m)
        ours[idx[b].numpy()] = coef[b].numpy()
        assert np.allclose(ref, ours, atol=1e-4), b


def test_torch_and_numba_orthonormalization_agree(monkeypatch):
    """GPUs take the batched-product path of the orthonormalization, the CPU the numba kernel:
    the same atoms and coefficients."""
    import tether.alignment.omp as omp

    D = unit_rows(700, 48, 5)
    X = torch.randn(40, 48, generator=torch.Generator().manual_seed(6))
    cpu = omp.batch_omp(X, D, 10)
    monkeypatch.setattr(omp, "_numba_kernel", lambda: None)
    other = omp.batch_omp(X, D, 10)
    assert torch.equal(cpu[0], other[0])
    assert torch.allclose(cpu[1], other[1], atol=1e-4)


def test_sparse_combinations_are_recovered_exactly():
    D = unit_rows(400, 64, 1)
    g = torch.Generator().manual_seed(2)
    support = torch.stack([torch.randperm(400, generator=g)[:6] for _ in range(30)])
    weights = torch.randn(30, 6, generator=g)
    X = torch.einsum("bk,bkd->bd", weights, D[support])
    idx, coef = batch_omp(X, D, 6)  # bfloat16 selection still finds them
    for b in range(30):
        assert set(idx[b].tolist()) == set(support[b].tolist())
        order = {a: w for a, w in zip(support[b].tolist(), weights[b].tolist())}
        assert np.allclose([order[a] for a in idx[b].tolist()], coef[b].numpy(), atol=1e-4)


def _tiny_model(path, tokenizer, hidden: int, seed: int) -> torch.Tensor:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model.get_input_embeddings().weight.detach().clone()


def _train_tokenizer(corpus: list[str], vocab_size: int, specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0],
                                   eos_token=specials[1], unk_token=specials[2])


def test_synthetic_pair_recovers_exact_combinations(tmp_path):
    from safetensors.torch import load_file, save_file

    from tether.alignment.transplant import match_vocabularies, transplant
    from tether.constraints import vocab_for

    words = ["cat", "dog", "house", "tree", "river", "mountain", "sky", "stone", "water"]
    other = ["elephant", "giraffe", "volcano", "lantern", "harbour", "meadow", "thunder",
             "orchard", "glacier", "compass", "saddle", "quartz"]
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(words, 12)) for _ in range(400)]
    donor_corpus = [" ".join(rng.choice(words + other, 12)) for _ in range(400)]
    base_tok = _train_tokenizer(corpus, 300, ["<s>", "</s>", "<unk>"])
    donor_tok = _train_tokenizer(donor_corpus, 400, ["<bos>", "<eos>", "<unk>"])
    base_emb = _tiny_model(tmp_path / "base", base_tok, 32, 0)
    _tiny_model(tmp_path / "donor", donor_tok, 48, 1)

    shared, special, new = match_vocabularies(vocab_for(str(tmp_path / "base")),
                                              vocab_for(str(tmp_path / "donor")))
    assert {role for role, _ in special.values()} >= {"bos", "eos", "unk"}
    assert len(shared) > 100 and len(new) > 20
    # rewrite the donor so that 20 new tokens are exact 4-sparse combinations of anchors
    weights_path = tmp_path / "donor" / "model.safetensors"
    weights = load_file(weights_path)
    key = "model.embed_tokens.weight"
    donor_emb = weights[key].clone()
    anchors = list(shared)
    g = torch.Generator().manual_seed(3)
    planted = {}
    for i in new[:20]:
        pick = [anchors[a] for a in torch.randperm(len(anchors), generator=g)[:4].tolist()]
        coef = torch.randn(4, generator=g)
        donor_emb[i] = (coef[:, None] * donor_emb[pick]).sum(0)
        planted[i] = (pick, coef)
    weights[key] = donor_emb
    save_file(weights, weights_path, metadata={"format": "pt"})

    report = transplant(str(tmp_path / "base"), str(tmp_path / "donor"), tmp_path / "out",
                        k=4, device="cpu", progress=False)
    out = load_file(tmp_path / "out" / "model.safetensors")[key]
    for i, (pick, coef) in planted.items():
        expected = (coef[:, None] * base_emb[[shared[p] for p in pick]]).sum(0)
        assert torch.allclose(out[i], expected, atol=1e-4), i
    for d, b in shared.items():
        assert torch.equal(out[d], base_emb[b])
    assert report.copied == len(shared) and report.new == len(new)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == len(donor_tok) and config["eos_token_id"] == \
        donor_tok.eos_token_id


def test_duplicate_spellings_are_shared_once_and_byte_pieces_are_not_anchors():
    """Gemma 3 spells '_' twice ('_' and the byte-fallback '<0x5F>'); only the spelling its
    tokenizer produces takes SmolLM2's '_' row. Byte-fallback pieces are copied (where they
    are the only spelling) but never used as OMP anchors."""
    from tether.alignment.transplant import anchor_pairs, byte_fallback_ids, match_vocabularies
    from tether.constraints import vocab_for
    from tether.models import resolve

    base, donor = vocab_for(resolve("smollm2")), vocab_for(resolve("gemma3"))
    shared, _, new = match_vocabularies(base, donor)
    vocab = donor.hf.get_vocab()
    underscore, byte_piece = vocab["_"], vocab["<0x5F>"]
    assert donor.hf.encode("_", add_special_tokens=False) == [underscore]
    assert shared[underscore] == base.hf.get_vocab()["_"]
    assert byte_piece in new and byte_piece not in shared
    # a byte with no character token of its own (0xCC starts a UTF-8 sequence) is copied
    lone = vocab["<0xCC>"]
    assert base.token_bytes[shared[lone]] == b"\xcc"
    pieces = byte_fallback_ids(donor)
    # all 256 but <0xFF>, which llguidance marks special (no bytes); none in byte-level BPE
    assert len(pieces) == 255 and byte_piece in pieces and not byte_fallback_ids(base)
    anchors = anchor_pairs(shared, base, donor)
    assert lone not in anchors and not pieces & set(anchors)
    assert len(anchors) == len(shared) - len(pieces & set(shared))
    # every base row is copied to one donor token at most
    assert len(set(shared.values())) == len(shared)


@pytest.mark.slow  # about 70 s: a real transplant, then the result served by vLLM
def test_real_pair_subset_loads_and_generates(tmp_path):
    """SmolLM2-135M-Instruct with Gemma 3's tokenizer (first 512 new tokens fitted)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tether.alignment.transplant import transplant
    from tether.models import resolve

    out = tmp_path / "smollm2-gemma3"
    report = transplant("smollm2", "gemma3", out, k=16, limit_new=512, progress=False)
    assert report.special_by_role["eos"] == {"donor": 1, "base": 2}  # <eos> <- <|im_end|>
    assert report.special_by_role["turn_start"] == {"donor": 105, "base": 1}
    assert report.mean_relative_error is not None and report.mean_relative_error < 0.9
    name = "model.embed_tokens.weight"
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        new = fh.get_tensor(name)
    with safe_open(str(resolve("smollm2")) + "/model.safetensors", "pt") as fh:
        old = fh.get_tensor(name)
    tok = AutoTokenizer.from_pretrained(out)
    base_tok = AutoTokenizer.from_pretrained(resolve("smollm2"))
    for word in [" the", " house", "ing"]:  # shared tokens keep their rows
        d = tok.convert_tokens_to_ids(tok.tokenize(word))
        b = base_tok.convert_tokens_to_ids(base_tok.tokenize(word))
        if len(d) == 1 and len(b) == 1:
            assert torch.equal(new[d[0]], old[b[0]])
    assert new.shape[0] == 262144
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5
    # and in vLLM, through the CLI (a second engine cannot share this test process)
    proc = subprocess.run(
        [sys.executable, "-m", "tether.cli", "generate", "--model", str(out), "--regex",
         "[A-Za-z ]{1,12}", "--max-tokens", "6", "--seed", "0", "--no-chat",
         "The capital of France is"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["finish_reason"] in ("stop", "length")
    assert re.fullmatch("[A-Za-z ]{0,12}", result["text"])
