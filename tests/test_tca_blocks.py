"""TCA's scheduler half (``tether.decode.tca_blocks``) on vLLM's real KV cache manager.

Part 1 works on a bare ``KVCacheManager`` (40 blocks of 32 tokens, prefix caching on), the way
vLLM's own unit tests drive it: requests are allocated and advanced by hand. Part 2 drives a
real ``Scheduler`` (no engine, no model: the model's output is a sampled token per request)
with a KV connector that calls the scheduler half from the hooks tether's connector uses, to
check the hook order and the lifecycle (admission, preemption, abort) in vLLM's own code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from fractions import Fraction

import pytest
import torch

from tether.decode.tca_blocks import (
    NEVER_HASH,
    CompactionOrder,
    CompactionSettings,
    TCABlocks,
    Verdict,
    compact_blocks,
    decide,
    is_decode_step,
    opts_out,
)
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    SupportsHMA,
)
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    SlidingWindowSpec,
)
from vllm.v1.request import Request, RequestStatus

BS = 32
NUM_BLOCKS = 40  # block 0 is the pool's null block: 39 usable


@pytest.fixture(autouse=True, scope="module")
def _block_hash_seed():
    init_none_hash(sha256)


def kv_cache_config(spec=None, num_blocks: int = NUM_BLOCKS) -> KVCacheConfig:
    spec = spec or FullAttentionSpec(block_size=BS, num_kv_heads=1, head_size=1,
                                     dtype=torch.float32)
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])


def make_manager(caching: bool = True, spec=None) -> KVCacheManager:
    return KVCacheManager(kv_cache_config(spec), max_model_len=2048, scheduler_block_size=BS,
                          hash_block_size=BS, enable_caching=caching)


def make_request(req_id: str, prompt: list[int], extra_args: dict | None = None,
                 resumable: bool = False) -> Request:
    params = SamplingParams(max_tokens=200, extra_args=extra_args)
    return Request(req_id, prompt, params, None, resumable=resumable,
                   block_hasher=get_request_block_hasher(BS, sha256))


PROMPT = [(7 * i + 3) % 1000 for i in range(300)]


def prefill(manager: KVCacheManager, request: Request) -> int:
    """Admit and prefill ``request`` as the scheduler does; returns its prefix-hit length."""
    blocks, hit, _ = manager.get_computed_blocks(request)
    assert manager.allocate_slots(request, request.num_tokens - hit, hit, blocks) is not None
    request.status = RequestStatus.RUNNING
    request.num_computed_tokens = request.num_tokens
    request.append_output_token_ids(1)
    return hit


def decode(manager: KVCacheManager, request: Request, steps: int = 1) -> None:
    """Decode steps: allocate one slot, compute the fed token, sample the next one."""
    for _ in range(steps):
        assert manager.allocate_slots(request, 1) is not None
        request.num_computed_tokens += 1
        request.append_output_token_ids(2)


def row(manager: KVCacheManager, req_id: str):
    return manager.coordinator.single_type_managers[0].req_to_blocks[req_id]


def hashed_ids(manager: KVCacheManager) -> set[int]:
    """Ids of every block the prefix cache can hand out."""
    pool = manager.block_pool
    return {b.block_id for b in pool.blocks if b.block_hash is not None}


def free_ids(manager: KVCacheManager) -> list[int]:
    return [b.block_id for b in manager.block_pool.free_block_queue.get_all_free_blocks()]


# ----------------------------------------------------------------------------- the surgery


@pytest.fixture
def compacted():
    """A 300-token request (10 blocks) compacted from P=0 to P=192."""
    manager = make_manager()
    a = make_request("a", PROMPT)
    prefill(manager, a)
    before = [b.block_id for b in row(manager, "a")]
    assert len(before) == 10 and manager.block_pool.get_num_free_blocks() == 29
    assert math.isclose(manager.usage, 10 / 39)
    assert set(before[:9]) <= hashed_ids(manager)  # 9 full blocks hashed, the 10th partial
    # the decode step: vLLM allocates the fed token's slot, then the surgery, then the forward
    assert manager.allocate_slots(a, 1) is not None
    outcome = compact_blocks(manager, "a", length=300, start_old=0, start_new=192)
    a.num_computed_tokens += 1
    a.append_output_token_ids(2)
    return manager, a, before, outcome


def test_compaction_frees_the_leading_blocks(compacted):
    manager, a, before, (verdict, order) = compacted
    assert verdict is Verdict.COMPACT
    assert order == CompactionOrder("a", 300, 0, 192, tuple(before))
    assert manager.block_pool.get_num_free_blocks() == 35
    assert math.isclose(manager.usage, 4 / 39)
    assert [b.block_id for b in row(manager, "a")] == [0] * 6 + before[6:]
    assert all(b.is_null for b in row(manager, "a")[:6])
    # freed leading blocks keep their hashes (still valid prefixes), kept ones lose theirs
    assert hashed_ids(manager) == set(before[:6])
    assert all(manager.block_pool.blocks[i].ref_cnt == 0 for i in before[:6])
    assert set(before[:6]) <= set(free_ids(manager))
    assert manager.coordinator.single_type_managers[0].num_cached_block["a"] == NEVER_HASH


def test_decode_after_compaction_allocates_logically_and_never_hashes(compacted):
    manager, a, before, _ = compacted
    decode(manager, a, 19)  # L = 319: the fed token 319 still fits in block 9
    assert len(row(manager, "a")) == 10 and manager.block_pool.get_num_free_blocks() == 35
    decode(manager, a, 1)  # feeds token 320: a new block
    assert a.num_computed_tokens == 321 and len(row(manager, "a")) == 11
    assert manager.block_pool.get_num_free_blocks() == 34
    decode(manager, a, 40)  # blocks 10 and 11 fill up: vLLM would hash them
    assert len(row(manager, "a")) == math.ceil(a.num_computed_tokens / BS)
    mine = {b.block_id for b in row(manager, "a") if not b.is_null}
    assert not mine & hashed_ids(manager)
    assert hashed_ids(manager) == set(before[:6])


def test_same_prompt_hits_exactly_the_freed_leading_blocks(compacted):
    manager, _, before, _ = compacted
    b = make_request("b", PROMPT)
    blocks, hit, _ = manager.get_computed_blocks(b)
    assert hit == 192
    assert blocks.get_block_ids() == (before[:6],)
    # without the compaction the same request would hit 9 blocks: check on a fresh manager
    fresh = make_manager()
    prefill(fresh, make_request("a", PROMPT))
    assert fresh.get_computed_blocks(make_request("b", PROMPT))[1] == 288


def test_free_returns_every_block(compacted):
    manager, a, _, _ = compacted
    decode(manager, a, 30)
    b = make_request("b", PROMPT)
    assert prefill(manager, b) == 192
    manager.free(a)
    manager.free(b)
    assert manager.block_pool.get_num_free_blocks() == NUM_BLOCKS - 1
    assert manager.usage == 0.0
    assert 0 not in free_ids(manager) and sorted(free_ids(manager)) == list(range(1, 40))
    assert manager.reset_prefix_cache()  # possible only when no block is held


def test_shared_destination_defers():
    manager = make_manager()
    a = make_request("a", PROMPT)
    prefill(manager, a)
    b = make_request("b", PROMPT)
    assert prefill(manager, b) == 288  # shares a's 9 full blocks
    before = [blk.block_id for blk in row(manager, "a")]
    hashed, free = hashed_ids(manager), manager.block_pool.get_num_free_blocks()
    verdict, order = compact_blocks(manager, "a", length=300, start_old=0, start_new=192)
    assert verdict is Verdict.SHARED_DESTINATION and order is None
    assert [blk.block_id for blk in row(manager, "a")] == before
    assert hashed_ids(manager) == hashed and manager.block_pool.get_num_free_blocks() == free
    assert manager.coordinator.single_type_managers[0].num_cached_block["a"] == 9
    # a shared leading block is fine: only destinations must be private
    manager.free(b)
    c = make_request("c", PROMPT[:200] + [999] * 100)
    assert prefill(manager, c) == 192
    verdict, order = compact_blocks(manager, "a", length=300, start_old=0, start_new=192)
    assert verdict is Verdict.COMPACT and order.block_ids == tuple(before)
    assert [blk.ref_cnt for blk in row(manager, "c")[:6]] == [1] * 6  # c still holds them


def test_preemption_then_readmission_reprefills_the_full_length(compacted):
    manager, a, before, _ = compacted
    decode(manager, a, 30)
    length = a.num_computed_tokens
    # preemption, as Scheduler._preempt_request does it
    manager.free(a)
    a.status, a.num_computed_tokens = RequestStatus.PREEMPTED, 0
    assert manager.block_pool.get_num_free_blocks() == NUM_BLOCKS - 1
    # re-admission: the unmodified leading blocks serve a hit, the rest is recomputed
    hit = prefill(manager, a)
    assert hit == 192
    assert [b.block_id for b in row(manager, "a")][:6] == before[:6]
    assert not any(b.is_null for b in row(manager, "a"))
    assert len(row(manager, "a")) == math.ceil((length + 1) / BS)
    # hashing resumed: every full block of the recomputed (full-attention) KV is cached
    full = (length + 1) // BS
    assert {b.block_id for b in row(manager, "a")[:full]} <= hashed_ids(manager)
    # and a second compaction starts again from P = 0
    verdict, order = compact_blocks(manager, "a", length=length + 1, start_old=0,
                                    start_new=256)
    assert verdict is Verdict.COMPACT and order.start_old == 0


def test_second_compaction_frees_rewritten_blocks_without_hashes(compacted):
    manager, a, before, _ = compacted
    decode(manager, a, 100)  # L = 400
    verdict, order = compact_blocks(manager, "a", length=400, start_old=192, start_new=288)
    assert verdict is Verdict.COMPACT
    assert order.block_ids[:4] == tuple(before[6:]) and len(order.block_ids) == 7
    assert [b.block_id for b in row(manager, "a")[:9]] == [0] * 9
    assert [b.block_id for b in row(manager, "a")[9:]] == list(order.block_ids[3:])
    # rewritten blocks carry no hash: they return as plain free blocks, reused first
    assert not set(before[6:9]) & hashed_ids(manager)
    assert set(free_ids(manager)[:3]) == set(before[6:9])
    assert manager.block_pool.get_num_free_blocks() == 39 - 4  # 13 logical, 9 null


def test_compaction_without_prefix_caching():
    manager = make_manager(caching=False)
    a = make_request("a", PROMPT)
    prefill(manager, a)
    verdict, order = compact_blocks(manager, "a", length=300, start_old=0, start_new=192)
    assert verdict is Verdict.COMPACT and len(order.block_ids) == 10
    assert manager.block_pool.get_num_free_blocks() == 35
    assert "a" not in manager.coordinator.single_type_managers[0].num_cached_block
    decode(manager, a, 21)
    assert len(row(manager, "a")) == 11
    manager.free(a)
    assert manager.block_pool.get_num_free_blocks() == 39


def test_surgery_refuses_inconsistent_input(compacted):
    manager, a, _, _ = compacted
    with pytest.raises(ValueError, match="multiples of the block size"):
        compact_blocks(manager, "a", length=300, start_old=192, start_new=200)
    with pytest.raises(ValueError, match="freed blocks after its start"):
        compact_blocks(manager, "a", length=300, start_old=0, start_new=224)
    with pytest.raises(ValueError, match="real blocks before its start"):
        compact_blocks(manager, "a", length=300, start_old=224, start_new=256)
    with pytest.raises(ValueError, match="start_new < length"):
        compact_blocks(manager, "a", length=300, start_old=192, start_new=320)
    with pytest.raises(ValueError, match="fewer than"):
        compact_blocks(manager, "a", length=400, start_old=192, start_new=256)


def test_unsupported_kv_caches_are_refused():
    swa = SlidingWindowSpec(block_size=BS, num_kv_heads=1, head_size=1, dtype=torch.float32,
                            sliding_window=512)
    with pytest.raises(ValueError, match="full attention"):
        TCABlocks(SETTINGS, make_manager(spec=swa))
    swa_as_full = FullAttentionSpec(block_size=BS, num_kv_heads=1, head_size=1,
                                    dtype=torch.float32, sliding_window=512)
    with pytest.raises(ValueError, match="sliding-window"):
        TCABlocks(SETTINGS, make_manager(spec=swa_as_full))
    with pytest.raises(ValueError, match="differs"):
        TCABlocks(dataclasses.replace(SETTINGS, block_size=16), make_manager())


# ----------------------------------------------------------------------------- the decision

SETTINGS = CompactionSettings(kv_budget=0.4, min_len=256, interval=64, min_keep=64,
                              query_window=32, block_size=BS)


def verdict_of(settings=SETTINGS, length=1000, start=0, since=1000, decode_step=True,
               opted_out=False):
    return decide(settings, length=length, start=start, since_admission=since,
                  decode_step=decode_step, opted_out=opted_out)


def test_target_start_is_block_aligned_and_keeps_the_budget():
    # L = 1000, f = 0.4: K = 400, P = floor(600/32)*32 = 576, so 424 tokens are kept
    assert SETTINGS.target_start(1000) == 576
    for length in range(0, 3000, 7):
        start = SETTINGS.target_start(length)
        keep = max(64, math.ceil(0.4 * length))
        assert start % BS == 0 and 0 <= start
        assert length - start >= min(keep, length)
        assert length - start < keep + BS or start == 0


def test_kv_budget_is_read_as_a_decimal():
    # 0.14 * 50 is 7.000000000000001 in binary floats; the budget means exactly 7 of 50
    tight = dataclasses.replace(SETTINGS, min_keep=1, query_window=1, block_size=1)
    assert dataclasses.replace(tight, kv_budget=0.14).target_start(50) == 43
    for numerator, denominator in ((1, 10), (7, 10), (14, 100), (28, 100), (55, 100), (1, 3)):
        s = dataclasses.replace(tight, kv_budget=numerator / denominator)
        exact = Fraction(str(numerator / denominator))
        for length in range(1, 2000):
            keep = -(-length * exact.numerator // exact.denominator)
            assert s.target_start(length) == length - keep


def test_full_budget_never_compacts():
    s = dataclasses.replace(SETTINGS, kv_budget=1.0, min_keep=32, min_len=0, interval=1)
    for length in range(0, 5000, 13):
        assert s.target_start(length) == 0
        assert verdict_of(s, length=length, since=length)[0] is not Verdict.COMPACT


def test_interval():
    # P = 576 at L = 1000: from 512 it advances 64 (compacts), from 544 only 32 (waits)
    assert verdict_of(start=512) == (Verdict.COMPACT, 576)
    assert verdict_of(start=544) == (Verdict.BELOW_INTERVAL, 576)
    assert verdict_of(start=576) == (Verdict.BELOW_INTERVAL, 576)


def test_min_len_and_query_window():
    assert verdict_of(length=255, since=255)[0] is Verdict.TOO_SHORT
    assert verdict_of(length=256, since=256) == (Verdict.COMPACT, 128)
    assert verdict_of(since=31)[0] is Verdict.WINDOW_NOT_FULL
    assert verdict_of(since=32)[0] is Verdict.COMPACT


def test_min_keep_wins_over_a_small_budget():
    s = dataclasses.replace(SETTINGS, kv_budget=0.05, min_keep=200)
    # ceil(0.05*1000) = 50 < 200: keep 200, P = floor(800/32)*32 = 800
    assert s.target_start(1000) == 800
    assert dataclasses.replace(s, min_keep=50).target_start(1000) == 928


def test_opt_out_and_non_decode_steps():
    assert verdict_of(opted_out=True)[0] is Verdict.OPTED_OUT
    assert verdict_of(decode_step=False)[0] is Verdict.NOT_DECODE


def test_decode_step_is_one_output_token_at_the_end():
    r = make_request("r", PROMPT)
    r.num_computed_tokens = 100  # a prefill chunk of one token is not a decode step
    assert not is_decode_step(r, 1, 0)
    r.num_computed_tokens = 299  # nor is the prompt's last token scheduled alone
    assert not is_decode_step(r, 1, 0)
    r.num_computed_tokens = 300
    r.append_output_token_ids(1)
    assert is_decode_step(r, 1, 0)
    assert not is_decode_step(r, 1, 2)  # speculative tokens
    assert not is_decode_step(r, 2, 0)
    # async scheduling: the fed token was sampled by a step whose output is not back yet
    r.num_computed_tokens, r.num_output_placeholders = 302, 1
    r.append_output_token_ids(1)
    assert is_decode_step(r, 1, 0)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="kv_budget"):
        dataclasses.replace(SETTINGS, kv_budget=0.0)
    with pytest.raises(ValueError, match="kv_budget"):
        dataclasses.replace(SETTINGS, kv_budget=1.5)
    with pytest.raises(ValueError, match="min_keep"):
        dataclasses.replace(SETTINGS, min_keep=16)
    with pytest.raises(ValueError, match="interval"):
        dataclasses.replace(SETTINGS, interval=0)
    with pytest.raises(TypeError, match="min_len"):
        dataclasses.replace(SETTINGS, min_len=256.0)


def test_order_travels_as_pickle_and_json():
    order = CompactionOrder("req-1", 300, 0, 192, [3, 4, 5])
    assert order.block_ids == (3, 4, 5)
    assert pickle.loads(pickle.dumps(order)) == order
    assert CompactionOrder(**json.loads(json.dumps(dataclasses.asdict(order)))) == order
    with pytest.raises(ValueError, match="start_old < start_new"):
        CompactionOrder("r", 300, 192, 192, [1])


def test_opt_out_flag():
    assert not opts_out(make_request("a", [1]))
    assert not opts_out(make_request("a", [1], {"tether_tca": True}))
    assert opts_out(make_request("a", [1], {"tether_tca": False}))
    with pytest.raises(ValueError, match="tether_tca"):
        opts_out(make_request("a", [1], {"tether_tca": "no"}))
    assert opts_out(make_request("a", [1], resumable=True))


# ----------------------------------------------------------------------------- real scheduler


class TCATestMeta(KVConnectorMetadata):
    def __init__(self, orders):
        self.orders = orders


class TCATestConnector(KVConnectorBase_V1, SupportsHMA):
    """The scheduler half wired into vLLM's connector hooks; the worker hooks do nothing."""

    def __init__(self, vllm_config, role, kv_cache_config):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config
        self.settings = CompactionSettings(**extra, block_size=vllm_config.cache_config.block_size)
        self.blocks: TCABlocks | None = None
        self.free_at_meta: list[int] = []  # free blocks right after each step's surgery

    def bind_kv_cache_manager(self, kv_cache_manager):
        super().bind_kv_cache_manager(kv_cache_manager)
        self.blocks = TCABlocks(self.settings, kv_cache_manager)

    def on_new_request(self, request):
        self.blocks.add_request(request)

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        pass

    def build_connector_meta(self, scheduler_output):
        orders = self.blocks.plan_step(scheduler_output)
        self.free_at_meta.append(self._kv_cache_manager.block_pool.get_num_free_blocks())
        return TCATestMeta(orders)

    def request_finished_all_groups(self, request, block_ids):
        self.blocks.finish_request(request.request_id)
        return False, None

    def start_load_kv(self, forward_context, **kwargs):
        pass

    def wait_for_layer_load(self, layer_name):
        pass

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        pass

    def wait_for_save(self):
        pass


def make_scheduler(num_blocks: int = NUM_BLOCKS, async_scheduling: bool = False, **tca):
    """A real V1 ``Scheduler`` with prefix caching and the test connector; the embedded
    SmolLM2 gives the model config (no weights are loaded)."""
    from vllm.config import (CacheConfig, KVTransferConfig, ModelConfig, SchedulerConfig,
                             VllmConfig)
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    from tether.models import resolve

    settings = dict(kv_budget=0.4, min_len=256, interval=64, min_keep=64, query_window=32)
    settings.update(tca)
    model = ModelConfig(model=resolve("smollm2"), dtype="float32", seed=0, skip_tokenizer_init=True,
                        max_model_len=2048)
    cache = CacheConfig(block_size=BS, enable_prefix_caching=True)
    cache.num_gpu_blocks = num_blocks
    config = VllmConfig(
        model_config=model,
        scheduler_config=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=2048,
                                         max_model_len=2048, is_encoder_decoder=False,
                                         async_scheduling=async_scheduling),
        cache_config=cache,
        kv_transfer_config=KVTransferConfig(
            kv_connector="TCATestConnector", kv_connector_module_path=__name__,
            kv_role="kv_producer", kv_connector_extra_config=settings))
    scheduler_cls = AsyncScheduler if async_scheduling else Scheduler
    scheduler = scheduler_cls(vllm_config=config, kv_cache_config=kv_cache_config(),
                          structured_output_manager=StructuredOutputManager(config),
                          block_size=BS, log_stats=True)
    assert isinstance(scheduler.connector, TCATestConnector)
    return scheduler


def model_output(out):
    """What a model that samples token 5 for every request returns for the step ``out``."""
    from vllm.v1.outputs import ModelRunnerOutput

    ids = list(out.num_scheduled_tokens)
    return ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                             sampled_token_ids=[[5] for _ in ids])


def step(scheduler):
    """One engine step; returns the step's output and the ``kv_cache_usage`` it reports."""
    out = scheduler.schedule()
    stats = scheduler.update_from_output(out, model_output(out))
    usage = next(iter(stats.values())).scheduler_stats.kv_cache_usage if stats else None
    return out, usage


def test_scheduler_compacts_after_all_allocations():
    """The step that compacts ``a`` cannot admit ``b`` with the blocks it frees; the next
    step does, and the freed blocks count in the step's ``kv_cache_usage``."""
    scheduler = make_scheduler()
    connector = scheduler.connector
    a = make_request("a", PROMPT)
    scheduler.add_request(a)
    out, _ = step(scheduler)  # prefill: 300 tokens, 10 blocks
    assert out.num_scheduled_tokens == {"a": 300}
    assert out.kv_connector_metadata.orders == []
    a_blocks = [b.block_id for b in row(scheduler.kv_cache_manager, "a")]

    b = make_request("b", [11] * (30 * BS))  # needs 30 blocks: 29 are free
    scheduler.add_request(b)
    out, usage = step(scheduler)  # a's first decode step: L = 300 compacts to P = 160
    assert out.num_scheduled_tokens == {"a": 1}  # b did not fit when blocks were allocated
    [order] = out.kv_connector_metadata.orders
    assert order == CompactionOrder("a", 300, 0, 160, tuple(a_blocks))
    assert connector.free_at_meta[-1] == 29 + 5
    assert math.isclose(usage, 5 / 39)
    assert connector.blocks.start_of("a") == 160

    out, usage = step(scheduler)  # now b fits, on blocks a freed in the previous step
    assert out.num_scheduled_tokens == {"a": 1, "b": 30 * BS}
    b_blocks = [blk.block_id for blk in row(scheduler.kv_cache_manager, "b")]
    # 29 never-used blocks, then the freed block of a that is evicted first (the last one)
    assert set(b_blocks) & set(a_blocks[:5]) == {a_blocks[4]}
    assert out.kv_connector_metadata.orders == []  # a's next interval is 64 tokens away
    assert math.isclose(usage, (5 + 30) / 39)
    stats = connector.blocks.stats()
    assert stats["blocks_freed"] == 5 and stats["verdicts"]["COMPACT"] == 1


def test_scheduler_lifecycle_preemption_and_abort():
    scheduler = make_scheduler()
    connector = scheduler.connector
    manager = scheduler.kv_cache_manager
    a = make_request("a", PROMPT)
    keep = make_request("keep", PROMPT[::-1], {"tether_tca": False})
    scheduler.add_request(a)
    scheduler.add_request(keep)
    step(scheduler)  # both prefill
    out, _ = step(scheduler)
    assert [o.req_id for o in out.kv_connector_metadata.orders] == ["a"]  # keep opted out
    assert connector.blocks.verdicts[Verdict.OPTED_OUT] == 2  # its prefill and decode steps
    for _ in range(20):
        step(scheduler)
    assert len(row(manager, "a")) == math.ceil((a.num_computed_tokens + 1) / BS)

    # RLHF-style reset: every running request is preempted and re-admitted in one step
    assert scheduler.reset_prefix_cache(reset_running_requests=True)
    assert manager.block_pool.get_num_free_blocks() == NUM_BLOCKS - 1
    length = a.num_tokens
    out, _ = step(scheduler)
    assert out.preempted_req_ids == {"a", "keep"}
    assert out.num_scheduled_tokens["a"] == length  # the full logical length again
    assert not any(blk.is_null for blk in row(manager, "a"))
    assert connector.blocks.start_of("a") == 0
    # the ring buffer is refilled by the re-prefill: a compacts again on its next decode step
    out, _ = step(scheduler)
    [order] = out.kv_connector_metadata.orders
    assert order.req_id == "a" and order.start_old == 0 and order.length == length

    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert "a" not in connector.blocks.requests
    scheduler.finish_requests("keep", RequestStatus.FINISHED_ABORTED)
    assert manager.block_pool.get_num_free_blocks() == NUM_BLOCKS - 1
    assert connector.blocks.requests == {}


def test_async_scheduling_compacts_on_the_processed_length():
    """Under async scheduling a step is scheduled before the previous one's output is back:
    ``L`` excludes the in-flight tokens, whose KV is written by the in-flight step."""
    scheduler = make_scheduler(async_scheduling=True)
    a = make_request("a", PROMPT)
    scheduler.add_request(a)
    first = scheduler.schedule()  # prefill
    second = scheduler.schedule()  # first decode, scheduled while the prefill is in flight
    assert second.num_scheduled_tokens == {"a": 1}
    assert second.kv_connector_metadata.orders == []  # L = 0 tokens processed yet
    scheduler.update_from_output(first, model_output(first))
    third = scheduler.schedule()
    [order] = third.kv_connector_metadata.orders
    assert (order.length, order.start_old, order.start_new) == (300, 0, 160)
    assert a.num_computed_tokens == 302 and a.num_in_flight_tokens == 2
    scheduler.update_from_output(second, model_output(second))
    scheduler.update_from_output(third, model_output(third))
    assert len(row(scheduler.kv_cache_manager, "a")) == 10
    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == NUM_BLOCKS - 1
