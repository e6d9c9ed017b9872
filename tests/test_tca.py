"""TCA-Attention: torch references, budgets, calibration and the transformers hooks (CPU)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from tether.attention.budgets import (Budgets, BudgetError, cheapest_assignment, cheapest_counts,
                                     counts_for_blocks, kept_tokens, plan)
from tether.attention.select import dense_to_paged, keep_counts, pooled_scores, select
from tether.kernels import tca

from conftest import fixture  # a missing fixture fails the test, never skips it

# calibration text: the first 20,000 characters of WikiText-2's validation split
WIKITEXT_HEAD = fixture("wikitext-2", "valid-head.txt").read_text(encoding="utf-8")


def test_paged_references_equal_dense_attention():
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, L, D = 2, 6, 2, 37, 8
    q = torch.randn(B, H, D, generator=g)
    k = torch.randn(B, Hkv, L, D, generator=g)
    v = torch.randn(B, Hkv, L, D, generator=g)
    kc, table = dense_to_paged(k, page=8)
    vc, _ = dense_to_paged(v, page=8)
    lens = torch.tensor([L, L])
    logits = tca.paged_scores(q, kc, table, lens, impl="torch")
    dense = torch.einsum("bhd,bhld->bhl", q, k.repeat_interleave(3, 1)) * D ** -0.5
    torch.testing.assert_close(logits[:, :, :L], dense)
    assert torch.isinf(logits[:, :, L:]).all()
    everything = torch.ones(B * Hkv, L, dtype=torch.bool)
    idx, cnt = tca.compact(everything)
    out = tca.sparse_paged_attention(q, kc, vc, table, idx.view(B, Hkv, -1),
                                     cnt.view(B, Hkv), impl="torch")
    want = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))[:, :, 0]
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_pooled_scores_average_each_querys_causal_softmax():
    """The observation window: query j of w sits at position L - w + j and sees keys up to
    there; the pooled score is the mean over queries (and the KV head's group) of softmax."""
    g = torch.Generator().manual_seed(1)
    B, w, H, Hkv, L, D = 2, 5, 4, 2, 29, 8
    q = torch.randn(B, w, H, D, generator=g)
    k = torch.randn(B, Hkv, L, D, generator=g)
    kc, table = dense_to_paged(k, page=8)
    pooled = pooled_scores(q, kc, table, torch.tensor([L, L]), impl="torch")
    z = torch.einsum("bwhd,bhld->bwhl", q, k.repeat_interleave(H // Hkv, 1)) * D ** -0.5
    qpos = torch.arange(L - w, L)
    future = torch.arange(L)[None, :] > qpos[:, None]  # [w, L]
    z = z.masked_fill(future[None, :, None, :], float("-inf"))
    want = torch.softmax(z, -1).view(B, w, Hkv, H // Hkv, L).mean(dim=(1, 3))
    torch.testing.assert_close(pooled[:, :, :L], want)
    torch.testing.assert_close(pooled.sum(-1), torch.ones(B, Hkv))
    assert (pooled[:, :, L:] == 0).all()
    with pytest.raises(ValueError, match="at least 5 tokens"):
        pooled_scores(q, kc, table, torch.tensor([L, 4]), impl="torch")


def test_block_stats_formula():
    s = torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    h = tca.block_stats(s, 4, alpha=0.5, impl="torch")
    # block 0: sum 1, 1 - (0.25 + 0.25) / 1 = 0.5 -> 0.5 * 1 + 0.5 * 0.5; block 1 empty -> 0
    torch.testing.assert_close(h, torch.tensor([[0.75, 0.0]]))


def test_block_topk_keeps_the_best_of_each_block():
    g = torch.Generator().manual_seed(1)
    R, W, block = 4, 50, 8
    scores = torch.rand(R, W, generator=g)
    lengths = torch.tensor([50, 47, 20, 9])
    keep = torch.randint(0, block + 1, (R, -(-W // block)), generator=g)
    mask = tca.block_topk(scores, keep, lengths, block, impl="torch")
    for r in range(R):
        for b in range(keep.shape[1]):
            lo, hi = b * block, min((b + 1) * block, int(lengths[r]))
            if hi <= lo:
                assert not mask[r, lo:lo + block].any()
                continue
            kept, seg = mask[r, lo:hi], scores[r, lo:hi]
            assert int(kept.sum()) == min(int(keep[r, b]), hi - lo)
            if kept.any() and (~kept).any():
                assert seg[kept].min() >= seg[~kept].max()
    with_extras = tca.block_topk(scores, torch.zeros_like(keep), lengths, block, sinks=3,
                                 window=5, impl="torch")
    for r in range(R):
        n = int(lengths[r])
        expected = {p for p in range(n) if p < 3 or p >= n - 5}
        assert set(with_extras[r].nonzero().flatten().tolist()) == expected


def test_keep_counts_follow_the_profile_by_rank():
    h = torch.tensor([[0.1, 0.9, 0.5, 7.0]])  # the last block is past the end: ranked last
    keep = keep_counts(h, torch.tensor([48]), torch.tensor([[4, 2, 1]], dtype=torch.int32),
                       torch.tensor([0]), 16, torch.tensor([3]))
    assert keep[0, :3].tolist() == [1, 4, 2]
    # a profile measured on 2 blocks stretched over 4: ranks 0, 1 -> count 0; ranks 2, 3 -> 1
    assert counts_for_blocks([8, 1], 4).tolist() == [8, 8, 1, 1]


def _kept_mass(scores, block, counts_by_block):
    total = 0.0
    for b, c in enumerate(counts_by_block):
        total += float(scores[b * block:(b + 1) * block].sort(descending=True).values[:c].sum())
    return total


def test_cheapest_counts_meets_tau_at_near_minimal_cost():
    g = torch.Generator().manual_seed(2)
    block, nb = 8, 3
    options = [1, 2, 4, 8]
    exact = 0
    trials = 40
    for _ in range(trials):
        scores = torch.rand(nb * block, generator=g) ** 4
        scores /= scores.sum()
        tau = float(torch.rand(1, generator=g)) * 0.6 + 0.35
        profile = cheapest_counts(scores, block, tau)
        best = min((sum(c) for c in itertools.product(options, repeat=nb)
                    if _kept_mass(scores, block, c) >= tau - 1e-12), default=None)
        assignment = cheapest_assignment(scores, block, tau)
        assert _kept_mass(scores, block, assignment) >= tau - 1e-9
        assert profile == sorted(assignment, reverse=True)
        assert sum(profile) <= 1.5 * best
        exact += sum(profile) == best
    assert exact >= 0.8 * trials


def test_budgets_file_is_validated(tmp_path):
    good = Budgets(model="m", num_layers=2, num_kv_heads=1, tau=0.9, block=16, sinks=4,
                   window=8, tokens=64, profiles=[[[16, 4]], [[2, 1]]])
    path = tmp_path / "b.json"
    good.save(path)
    assert Budgets.load(path, num_layers=2, num_kv_heads=1, model="m").profiles == good.profiles
    with pytest.raises(BudgetError, match="2 layers; the model has 3"):
        Budgets.load(path, num_layers=3)
    with pytest.raises(BudgetError, match="calibrated for 'm'"):
        Budgets.load(path, model="other")
    data = json.loads(path.read_text())
    data["profiles"][1][0] = [1, 2]
    path.write_text(json.dumps(data))
    with pytest.raises(BudgetError, match="layer 1 head 0"):
        Budgets.load(path)
    path.write_text("{}")
    with pytest.raises(BudgetError, match="not a TCA budgets file"):
        Budgets.load(path)


def test_plan_gives_the_window_its_share_and_keeps_the_budget():
    """Heads needing 4x the tokens of others keep about 4x the scored tokens; every layer
    keeps the budget; the window is ``recent`` of it, never below the calibrated window."""
    b = Budgets(model="m", num_layers=2, num_kv_heads=2, tau=0.9, block=64, sinks=4,
                window=32, tokens=1024, profiles=[[[16] * 16, [4] * 16], [[8] * 16, [8] * 16]])
    for length, fraction in ((1024, 0.2), (4096, 0.4), (4096, 0.05)):
        profiles, window = plan(b, length, fraction, recent=0.5)
        assert window == max(32, int(0.5 * fraction * length))
        for layer in profiles:
            kept = [kept_tokens(p, length, 64, 4, window) for p in layer]
            share = sum(kept) / (len(kept) * length)  # counts round: one token a block
            assert fraction - 1e-9 <= share <= fraction + (length // 64) / length
        if fraction >= 0.2:
            scored = [sum(counts_for_blocks(p, -(-length // 64)).tolist()) for p in profiles[0]]
            assert 3 < scored[0] / scored[1] < 5
    assert plan(b, 1024, 0.2, recent=0.0)[1] == 32


@pytest.fixture(scope="module")
def smollm2_hf():
    from tether.attention.hf import load_model

    return load_model("smollm2")


def test_keep_mask_equals_dropping_tokens_from_the_cache(smollm2_hf):
    """Hiding cached positions with the probe's keep mask gives the logits of a cache from
    which those positions were removed."""
    from transformers import DynamicCache

    from tether.attention.hf import Probe

    model, tok = smollm2_hf
    ids = tok("The quick brown fox jumps over the lazy dog. " * 6, return_tensors="pt").input_ids
    ctx, cont = ids[:, :48], ids[:, 48:56]
    layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    keep = torch.rand(48, generator=torch.Generator().manual_seed(3)) < 0.5
    keep[:2] = True
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ctx, past_key_values=cache)
        probe = Probe()
        probe.keep = {i: keep.expand(1, kv_heads, 48) for i in range(layers)}
        probe.record = False
        with probe:
            masked = model(cont, past_key_values=cache,
                           position_ids=torch.arange(48, 56)[None]).logits
        dropped = DynamicCache(config=model.config)
        model(ctx, past_key_values=dropped)
        for layer in dropped.layers:
            layer.keys = layer.keys[:, :, keep]
            layer.values = layer.values[:, :, keep]
        want = model(cont, past_key_values=dropped,
                     position_ids=torch.arange(48, 56)[None]).logits
        plain = DynamicCache(config=model.config)
        model(ctx, past_key_values=plain)
        full = model(cont, past_key_values=plain).logits
    torch.testing.assert_close(masked, want, atol=1e-4, rtol=1e-4)
    assert (masked - full).abs().max() > 1e-2  # the mask did change something


def test_calibration_keeps_tau_of_the_mass(smollm2_hf, tmp_path):
    from tether.attention.calibrate import ScoreRecorder, calibrate

    budgets = calibrate("smollm2", tau=0.8, block=32, tokens=256, sinks=4, window=16,
                        observe=8, text=WIKITEXT_HEAD)
    model, tok = smollm2_hf
    assert len(budgets.profiles) == model.config.num_hidden_layers
    assert all(len(p) == model.config.num_key_value_heads for p in budgets.profiles)
    ids = tok(WIKITEXT_HEAD, return_tensors="pt").input_ids[:, :256]
    recorder = ScoreRecorder(observe=8)
    with recorder, torch.no_grad():
        model(ids)
    pos = torch.arange(256)
    always = (pos < 4) | (pos >= 240)
    for layer in (0, 10, 29):
        for h, profile in enumerate(budgets.profiles[layer]):
            s = recorder.scores[layer][h].double()
            assignment = cheapest_assignment(s, 32, 0.8, always)
            assert sorted(assignment, reverse=True) == profile
            rest = s.clone()
            rest[always] = 0
            kept = float(s[always].sum()) + _kept_mass(rest, 32, assignment)
            assert kept >= 0.8 - 1e-6
            assert sum(profile) < 256  # cheaper than keeping everything
    budgets.save(tmp_path / "b.json")
    loaded = Budgets.load(tmp_path / "b.json", num_layers=30, num_kv_heads=3, model="smollm2")
    assert (loaded.tau, loaded.observe) == (0.8, 8)


def test_select_on_a_real_layer_is_consistent(smollm2_hf):
    """Selection of one real layer's keys from a window of its last queries: its pooled scores
    equal calibration's (dense, another code path), sinks and window do not use up keep counts
    (exactly the profile's tokens plus sinks plus window are kept), and the kept tokens carry
    more mass than a uniform choice of the same size."""
    from tether.attention.calibrate import ScoreRecorder

    model, tok = smollm2_hf
    ids = tok("Alice was beginning to get very tired of sitting by her sister on the bank. " * 8,
              return_tensors="pt").input_ids[:, :128]
    keys = {}

    class Grab(ScoreRecorder):
        def on_last_queries(self, layer, queries, k, scaling, visible):
            super().on_last_queries(layer, queries, k, scaling, visible)
            keys[layer] = (queries, k, scaling)

    with Grab(observe=16) as rec, torch.no_grad():
        model(ids)
    queries, k, scaling = keys[5]
    assert queries.shape[:2] == (1, 16)
    kc, table = dense_to_paged(k, page=16)
    torch.testing.assert_close(pooled_scores(queries, kc, table, torch.tensor([128]),
                                             scaling)[0, :, :128], rec.scores[5])
    profiles = [[8, 4, 2, 1]] * k.shape[1]
    idx, cnt, mask = select(queries, kc, table, torch.tensor([128]), profiles, block=32,
                            sinks=2, window=8, scale=scaling)
    assert cnt.tolist() == [[int(m.sum()) for m in mask[0]]]
    for h in range(k.shape[1]):
        s = rec.scores[5][h]
        kept = float(s[mask[0, h, :128]].sum())
        assert kept > float(cnt[0, h]) / 128  # better than uniform
        assert int(cnt[0, h]) == 8 + 4 + 2 + 1 + 2 + 8
        assert mask[0, h, :2].all() and mask[0, h, 120:128].all()


def test_calibrate_cli(tmp_path):
    import subprocess
    import sys

    text = tmp_path / "text.txt"
    text.write_text(WIKITEXT_HEAD)
    out = tmp_path / "budgets.json"
    cmd = [sys.executable, "-m", "tether.cli", "calibrate", "smollm2", "--out", str(out),
           "--text", str(text), "--tokens", "256", "--block", "32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["layers"] == 30 and summary["kv_heads"] == 3
    assert 0 < summary["min_kept_fraction"] <= summary["mean_kept_fraction"] <= 1
    loaded = Budgets.load(out, num_layers=30, num_kv_heads=3)
    assert (loaded.block, loaded.window, loaded.observe) == (32, 128, 128)
    bad = subprocess.run(cmd[:-1] + ["30"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "power of two" in bad.stderr and "Traceback" not in bad.stderr
