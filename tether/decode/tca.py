"""TCA-Attention inside vLLM 0.32 (V1 model runner, CPU_ATTN): the engine skeleton.

Three plug-ins carry it (``docs/tca-engine.md``); this module holds all of their vLLM-internal
code and nothing of the tensor work, which plugs in through two callables:

* **the planner** (scheduler process): ``planner(manager, steps, settings) -> [order, ...]``,
  called once per scheduler step after every allocation of the step, with vLLM's
  ``KVCacheManager`` and one ``TCAStep`` per TCA request scheduled in the step. It may do
  block surgery on the manager and returns compaction orders: objects with the fields
  ``req_id, length, start_old, start_new, block_ids`` (picklable: they travel to the workers
  inside the step's ``SchedulerOutput``). ``start_new`` must be a multiple of the block size.
* **the compactor** (each worker): ``compactor(order, kv_caches, queries, settings, kept)``,
  called for every order at the first hook of the step's ``execute_model``, before the forward and
  before the runner updates its batch. ``kv_caches[layer]`` is vLLM's cache of that layer
  (CPU: ``[num_blocks, H_kv, block, 2 * head]``, K and V packed by the kernel's ISA);
  ``queries[layer]`` is ``[m, H_q, head]``, the request's last ``m = min(w, observed)`` rotated
  queries in order, query ``j`` at position ``order.length - m + j``. It must leave every head's
  kept tokens in logical slots ``[start_new, length)``: from the next forward on, the request
  reads only those (its read window) and attends as if its KV were that window. It returns
  the kept tokens' logical positions ``[layers, H_kv, length - start_new]`` (or None), which
  the worker keeps with the request and hands back as ``kept`` at its next compaction (None
  before the first).

What runs where, per step (hook order verified on the engine: ``tests/test_tca_engine.py``):

1. scheduler: ``TCAConnector.build_connector_meta`` (``Scheduler.schedule``, after the step's
   allocations): lifecycle of the TCA requests, then the planner; the orders go out in a
   ``TCAStepMetadata``.
2. worker: ``TCAConnector.handle_preemptions`` (first hook of ``GPUModelRunner.execute_model``,
   before ``_update_states``): drops and starts request state, runs the compactor per order,
   records each request's new window start ``P``.
3. worker: ``TCABuilder.build`` (``_build_attention_metadata``): rows of TCA requests read
   ``block_table[r, P/bs:]`` and ``seq_len - P`` (new tensors; the CPU block table is the
   runner's master copy), and the step's query-capture plan rides on the metadata.
4. worker: ``TCAImpl.forward``, per layer: stores the plan's queries in each TCA request's ring
   buffer ``[w, H_q, head]`` (one indexed copy per layer for the whole batch), then vLLM's
   CPU attention.

Requests without TCA (opted out with ``SamplingParams.extra_args["tether_tca"] = False``) and
engines without the connector never touch any of it: the builder and the impl are then vLLM's.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                               KVConnectorMetadata,
                                                               KVConnectorRole, SupportsHMA)
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend,
                                                 CPUAttentionBackendImpl,
                                                 CPUAttentionMetadata,
                                                 CPUAttentionMetadataBuilder)
from vllm.v1.worker.cpu_worker import CPUWorker

from tether.attention.budgets import BudgetError, Budgets
from tether.decode.records import TetherWorkerExtension

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

EXTRA_KEY = "tether_tca"  # in kv_connector_extra_config, and the per-request opt-out key
WORKER_CLS = "tether.decode.tca.TCAWorker"
BACKEND_CLS = "tether.decode.tca.TCABackend"
# Where the tensor work lives (the other two parts of issue 22); needed when kv_budget < 1.
PLANNER = "tether.decode.tca_blocks:plan_compactions"
COMPACTOR = "tether.decode.tca_layout:compact_request"


NO_GPU = ("TCA in the engine runs on vLLM's CPU backend only: there is no GPU attention-backend "
          "override yet (FLASH_ATTN / TRITON_ATTN), so a GPU engine could neither shift read "
          "windows nor capture queries")


class TCAUnsupported(ValueError):
    """A configuration TCA in the engine cannot run with; the message names the reason."""


# -- settings ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TCASettings:
    """What both halves know: the budgets, the KV share to keep, the observation window
    ``observe`` (w: the last w queries score the tokens, as calibration pooled them) and the
    model's attention shape. ``scale`` is the layers' softmax scale (known to workers only)."""

    budgets: Budgets
    kv_budget: float
    block_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    scale: float | None = None

    @property
    def observe(self) -> int:
        return self.budgets.observe


def load_budgets(tca: Budgets | dict | str | Path) -> Budgets:
    """A ``Budgets`` from an object, its dict, or a file written by ``tether calibrate``."""
    if isinstance(tca, Budgets):
        budgets = dataclasses.replace(tca)
    elif isinstance(tca, dict):
        try:
            budgets = Budgets(**{k: v for k, v in tca.items() if k != "format"})
        except TypeError as exc:
            raise BudgetError(f"not a TCA budgets dict: {exc}") from None
    elif isinstance(tca, (str, Path)):
        return Budgets.load(tca)
    else:
        raise TypeError(f"tca must be a budgets file, a Budgets or its dict, not "
                        f"{type(tca).__name__}")
    budgets.validate()
    return budgets


def engine_overrides(tca: Budgets | dict | str | Path | None, kv_budget: float | None) -> dict:
    """The ``vllm.LLM`` / ``EngineArgs`` settings that turn TCA on: the connector (with the
    budgets inside its config, so every process gets them) and the worker class."""
    from tether.decode.engine import on_gpu

    if tca is None or kv_budget is None:
        raise ValueError("TCA in the engine needs both the budgets from `tether calibrate` "
                         "(tca, --tca) and the share of each request's KV to keep "
                         "(kv_budget, --kv-budget)")
    if on_gpu():
        raise TCAUnsupported(NO_GPU)
    if not isinstance(kv_budget, (int, float)) or isinstance(kv_budget, bool) or \
            not 0 < kv_budget <= 1:
        raise ValueError(f"kv_budget must be a number in (0, 1] (the share of each request's "
                         f"KV to keep), not {kv_budget!r}")
    budgets = load_budgets(tca)
    extra = {"budgets": budgets.to_dict(), "kv_budget": float(kv_budget)}
    if kv_budget < 1:
        extra["planner"], extra["compactor"] = PLANNER, COMPACTOR
        for name in (PLANNER, COMPACTOR):
            resolve_callable(name)  # fail here, not in the engine
    return {"kv_transfer_config": {"kv_connector": "TCAConnector",
                                   "kv_connector_module_path": __name__,
                                   "kv_role": "kv_producer",
                                   "kv_connector_extra_config": {EXTRA_KEY: extra}},
            "worker_cls": WORKER_CLS}


def resolve_callable(name: str) -> Callable:
    module, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise TCAUnsupported(f"kv_budget < 1 needs in-engine compaction from {name}, which "
                             f"cannot be loaded ({exc}); kv_budget 1.0 runs TCA's capture "
                             "and read windows without pruning") from None


def settings_from(vllm_config: "VllmConfig") -> TCASettings:
    extra = vllm_config.kv_transfer_config.kv_connector_extra_config[EXTRA_KEY]
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    return TCASettings(budgets=load_budgets(extra["budgets"]), kv_budget=extra["kv_budget"],
                       block_size=vllm_config.cache_config.block_size,
                       num_layers=model.get_num_layers(parallel),
                       num_heads=model.get_num_attention_heads(parallel),
                       num_kv_heads=model.get_num_kv_heads(parallel),
                       head_size=model.get_head_size())


# -- refusals ------------------------------------------------------------------------------------

def check_config(vllm_config: "VllmConfig") -> None:
    """Refuse, naming the reason, what TCA in the engine does not support. Called by the worker
    before the model is built and by the connector (both processes)."""
    from vllm.platforms import current_platform

    from tether.decode.engine import check_vllm_version

    check_vllm_version()
    if not current_platform.is_cpu():
        raise TCAUnsupported(NO_GPU)
    if vllm_config.use_v2_model_runner:
        raise TCAUnsupported("TCA in the engine needs vLLM's V1 model runner; Model Runner V2 "
                             "is selected (set VLLM_USE_V2_MODEL_RUNNER=0)")
    if vllm_config.speculative_config is not None:
        raise TCAUnsupported("TCA in the engine does not support speculative decoding: it "
                             "compacts on single-token decode steps only")
    if vllm_config.cache_config.cache_dtype != "auto":
        raise TCAUnsupported(f"TCA in the engine needs an unquantized KV cache; kv_cache_dtype "
                             f"is {vllm_config.cache_config.cache_dtype!r} (use 'auto')")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise TCAUnsupported("TCA in the engine does not support pipeline parallelism")
    text = vllm_config.model_config.hf_text_config
    windows = [t for t in getattr(text, "layer_types", None) or [] if t != "full_attention"]
    if windows or vllm_config.model_config.get_sliding_window() is not None:
        raise TCAUnsupported(
            f"TCA in the engine needs full attention in every layer; this model has "
            f"{len(windows) or 'some'} sliding-window layers (window "
            f"{getattr(text, 'sliding_window', None)}), whose blocks vLLM already frees")
    settings = settings_from(vllm_config)
    budgets = settings.budgets
    if (budgets.num_layers, budgets.num_kv_heads) != (settings.num_layers,
                                                      settings.num_kv_heads):
        raise TCAUnsupported(
            f"the TCA budgets ({budgets.model}) have {budgets.num_layers} layers of "
            f"{budgets.num_kv_heads} KV heads; this model has {settings.num_layers} of "
            f"{settings.num_kv_heads} (per tensor-parallel rank): calibrate it with "
            f"`tether calibrate`")


def check_kv_cache(kv_cache_config: "KVCacheConfig", block_size: int) -> None:
    """The KV cache TCA's block arithmetic assumes: one group of full attention, prefix-cache
    hashes over whole blocks."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise TCAUnsupported(f"TCA in the engine needs one KV cache group; this model has "
                             f"{len(groups)}")
    spec = groups[0].kv_cache_spec
    if type(spec) is not FullAttentionSpec or spec.sliding_window is not None:
        raise TCAUnsupported(f"TCA in the engine needs full-attention KV blocks, not "
                             f"{type(spec).__name__}")
    hash_size = kv_cache_config.hash_block_size
    if hash_size is not None and hash_size != block_size:
        raise TCAUnsupported(f"TCA in the engine needs prefix-cache hashes over whole KV blocks; "
                             f"hash block size {hash_size} != block size {block_size}")


# -- scheduler -> worker ---------------------------------------------------------------------------

@dataclass
class TCAStep:
    """One TCA request scheduled in this step, as the planner sees it.

    ``request``: vLLM's ``Request`` (``num_computed_tokens``: tokens in the KV cache before this
    step); ``num_new_tokens``: tokens scheduled this step (1 on a plain decode step); ``start``:
    P, the first logical token the request still reads (0: nothing pruned); ``observed``: tokens
    computed since the request was (re)admitted, whose queries went through the ring buffer
    (prefix-cache hits computed none): the ring holds ``min(w, observed)`` queries."""

    request: Any
    num_new_tokens: int
    start: int
    observed: int


@dataclass
class TCAStepMetadata(KVConnectorMetadata):
    """The step's message to the workers: requests whose TCA state ends (finished, preempted)
    and starts (first scheduled since (re)admission), then the compaction orders."""

    dropped: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    orders: list = field(default_factory=list)


@dataclass
class _Tracked:
    request: Any
    start: int = 0
    admitted_at: int | None = None  # num_computed_tokens when (re)admitted (prefix-cache hit)
    compactions: int = 0


def tca_requested(sampling_params: Any) -> bool:
    """Whether a request takes part: ``extra_args["tether_tca"]`` absent or true; false opts
    out; anything else is refused. 0 and 1 count as false and true: vLLM's OpenAI protocol
    types ``vllm_xargs`` values as strings and numbers, so a JSON ``false`` arrives as 0."""
    value = (getattr(sampling_params, "extra_args", None) or {}).get(EXTRA_KEY, True)
    if value not in (True, False) or not isinstance(value, int):  # bools are ints
        raise ValueError(f"extra_args[{EXTRA_KEY!r}] must be true or false, not {value!r}")
    return bool(value)


class TCAConnector(KVConnectorBase_V1, SupportsHMA):
    """vLLM's KV-connector plug-in as TCA's carrier: the per-step scheduler -> worker channel
    and the request lifecycle. Loads and saves nothing (``kv_producer``, so vLLM frees blocks
    at once; ``requires_kv_delivery`` False, so a preemption does not drop output)."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config, role, kv_cache_config)
        check_config(vllm_config)
        check_kv_cache(kv_cache_config, vllm_config.cache_config.block_size)
        self.settings = settings_from(vllm_config)
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config[EXTRA_KEY]
        # scheduler half
        self.planner: Callable | None = (resolve_callable(extra["planner"])
                                         if role == KVConnectorRole.SCHEDULER
                                         and extra.get("planner") else None)
        self.tracked: dict[str, _Tracked] = {}
        self.ended: list[str] = []  # finished or aborted since the last step
        # worker half
        self.compactor: Callable | None = (resolve_callable(extra["compactor"])
                                           if role == KVConnectorRole.WORKER
                                           and extra.get("compactor") else None)
        self.kv_caches: list[torch.Tensor] = []
        self.state: TCAState | None = None

    @property
    def requires_kv_delivery(self) -> bool:
        return False

    # -- scheduler half ------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        return

    def on_new_request(self, request) -> None:
        if tca_requested(request.sampling_params):
            self.tracked[request.request_id] = _Tracked(request)

    def build_connector_meta(self, scheduler_output) -> TCAStepMetadata:
        meta = TCAStepMetadata()
        for req_id in scheduler_output.preempted_req_ids or ():
            tracked = self.tracked.get(req_id)
            if tracked is not None:  # its KV is gone: it re-prefills its full length
                tracked.start, tracked.admitted_at = 0, None
                meta.dropped.append(req_id)
        meta.dropped.extend(self.ended)
        self.ended = []
        steps = []
        for req_id, num_new in scheduler_output.num_scheduled_tokens.items():
            tracked = self.tracked.get(req_id)
            if tracked is None:
                continue
            computed = tracked.request.num_computed_tokens
            if tracked.admitted_at is None:
                tracked.admitted_at = computed
                meta.started.append(req_id)
            steps.append(TCAStep(tracked.request, num_new, tracked.start,
                                 computed - tracked.admitted_at))
        if self.planner is not None and steps:
            meta.orders = list(self.planner(self._kv_cache_manager, steps, self.settings))
            for order in meta.orders:
                tracked = self.tracked[order.req_id]
                tracked.start = order.start_new
                tracked.compactions += 1
        return meta

    def request_finished(self, request, block_ids):
        """Frees at once; a TCA request's output carries ``kv_transfer_params["tether_tca"]``:
        where its read window starts and how many compactions it had."""
        tracked = self.tracked.pop(request.request_id, None)
        if tracked is None:
            return False, None
        self.ended.append(request.request_id)
        return False, {EXTRA_KEY: {"window_start": tracked.start,
                                   "compactions": tracked.compactions}}

    def request_finished_all_groups(self, request, block_ids):
        return self.request_finished(request, block_ids)

    # -- worker half -----------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        by_layer = sorted((extract_layer_index(name), cache) for name, cache in kv_caches.items())
        if [i for i, _ in by_layer] != list(range(self.settings.num_layers)):
            raise TCAUnsupported(f"TCA in the engine needs one KV cache per layer; got layers "
                                 f"{[i for i, _ in by_layer]}")
        self.kv_caches = [cache for _, cache in by_layer]

    def handle_preemptions(self, meta: TCAStepMetadata) -> None:
        state = self.state
        if state is None:
            raise RuntimeError("the TCA connector runs without TCAWorker (worker_cls): no "
                               "request state to update")
        for req_id in meta.dropped:
            state.drop(req_id)
        for req_id in meta.started:
            state.start(req_id)
        for order in meta.orders:
            if self.compactor is None:
                raise RuntimeError(f"a compaction order for {order.req_id} reached a worker "
                                   "without a compactor")
            state.check_order(order)
            kept = self.compactor(order, self.kv_caches, state.queries(order.req_id),
                                  state.settings, state.requests[order.req_id].kept)
            state.set_start(order.req_id, order.start_new, kept)

    def start_load_kv(self, forward_context, **kwargs) -> None:
        return

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        return

    def wait_for_save(self) -> None:
        return


# -- worker state: read windows and query ring buffers ----------------------------------------------

@dataclass
class _Request:
    slot: int
    start: int = 0  # P: first logical token the request reads
    written: int = 0  # queries stored since (re)admission (the ring keeps the last w)
    kept: torch.Tensor | None = None  # the compactor's answer: positions held in [start, ...)


@dataclass
class Capture:
    """One step's query capture: ``ring[slot[i], layer, row[i]] = query[token[i]]``, as one
    ``index_copy_`` into the flat ring per layer (``base[i]`` is the flat index of
    ``(slot[i], 0, row[i])``); advanced-index assignment cost 20x more on the CPU."""

    state: "TCAState"
    token: torch.Tensor
    base: torch.Tensor

    def store(self, layer: int, query: torch.Tensor) -> None:
        ring = self.state.ring
        ring.view(-1, *ring.shape[3:]).index_copy_(0, self.base + layer * ring.shape[2],
                                                    query.index_select(0, self.token))


class TCAState:
    """Per-worker TCA state: each TCA request's window start ``P`` and its ring buffers of the
    last ``w`` rotated queries of every layer, in one pool ``[slots, layers, w, H_q, head]``
    (grown by doubling; a slot per live TCA request)."""

    def __init__(self, settings: TCASettings, input_batch_req_ids: Callable[[], list],
                 dtype: torch.dtype):
        self.settings = settings
        self.req_ids = input_batch_req_ids
        self.requests: dict[str, _Request] = {}
        self.ring = torch.zeros(0, settings.num_layers, settings.observe, settings.num_heads,
                                settings.head_size, dtype=dtype)
        self.free_slots: list[int] = []

    def start(self, req_id: str) -> None:
        if req_id in self.requests:
            raise RuntimeError(f"TCA request {req_id} started twice")
        if not self.free_slots:
            grown = self.ring.new_zeros((max(1, 2 * len(self.ring)),) + self.ring.shape[1:])
            grown[:len(self.ring)] = self.ring
            self.free_slots = list(range(len(grown) - 1, len(self.ring) - 1, -1))
            self.ring = grown
        self.requests[req_id] = _Request(self.free_slots.pop())

    def drop(self, req_id: str) -> None:
        req = self.requests.pop(req_id, None)
        if req is not None:
            self.free_slots.append(req.slot)

    def check_order(self, order) -> None:
        req = self.requests.get(order.req_id)
        bs = self.settings.block_size
        if req is None:
            raise RuntimeError(f"compaction order for {order.req_id}, which is not a live TCA "
                               "request on this worker")
        if order.start_new % bs or not req.start == order.start_old <= order.start_new \
                < order.length:
            raise RuntimeError(f"bad compaction order {order} (window starts at {req.start}, "
                               f"blocks of {bs})")

    def set_start(self, req_id: str, start: int, kept: torch.Tensor | None = None) -> None:
        req = self.requests[req_id]
        req.start, req.kept = start, kept

    def queries(self, req_id: str) -> torch.Tensor:
        """The request's stored queries ``[layers, m, H_q, head]``, oldest first."""
        req = self.requests[req_id]
        w = self.settings.observe
        m = min(w, req.written)
        rows = (torch.arange(req.written - m, req.written) % w)
        return self.ring[req.slot][:, rows]

    def prepare(self, cm):
        """The step's attention metadata with TCA rows' read windows shifted, and its capture
        plan (None when no TCA request is in the batch)."""
        rows = [(r, self.requests[rid]) for r, rid in enumerate(self.req_ids()[:cm.num_reqs])
                if rid in self.requests]
        if not rows:
            return cm, None
        bs, w = self.settings.block_size, self.settings.observe
        qsl = cm.query_start_loc_cpu.tolist()
        per_slot = self.settings.num_layers * w  # flat ring rows per slot
        token, base = [], []
        shifted = [(r, req.start) for r, req in rows if req.start]
        for r, req in rows:
            n = qsl[r + 1] - qsl[r]
            m = min(w, n)
            token.extend(range(qsl[r + 1] - m, qsl[r + 1]))
            base.extend(req.slot * per_slot + (req.written + n - m + j) % w for j in range(m))
            req.written += n
        plan = Capture(self, torch.tensor(token, dtype=torch.long),
                       torch.tensor(base, dtype=torch.long))
        if shifted:
            table = cm.block_table_tensor.clone()
            seq_lens = cm.seq_lens.clone()
            for r, start in shifted:
                nb = start // bs
                table[r, :table.shape[1] - nb] = cm.block_table_tensor[r, nb:]
                table[r, table.shape[1] - nb:] = 0
                seq_lens[r] -= start
            cm = dataclasses.replace(cm, block_table_tensor=table, seq_lens=seq_lens)
        return cm, plan


# -- the CPU_ATTN override -------------------------------------------------------------------------

@dataclass
class TCAAttentionMetadata(CPUAttentionMetadata):
    capture: Capture | None = None


class TCABuilder(CPUAttentionMetadataBuilder):
    """CPU_ATTN's builder; with TCA state bound (``tca``), shifts TCA rows' read windows before
    vLLM builds the CPU metadata (its kernel schedule follows the shifted lengths)."""

    tca: TCAState | None = None

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        if self.tca is None:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        cm, plan = self.tca.prepare(common_attn_metadata)
        meta = super().build(common_prefix_len, cm, fast_build)
        return TCAAttentionMetadata(**{f.name: getattr(meta, f.name)
                                       for f in dataclasses.fields(meta)}, capture=plan)


class TCAImpl(CPUAttentionBackendImpl):
    """CPU_ATTN's attention; stores TCA requests' rotated queries before attending."""

    layer_index: int | None = None

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        capture = getattr(attn_metadata, "capture", None)
        if capture is not None:
            if self.layer_index is None:
                from vllm.model_executor.models.utils import extract_layer_index

                self.layer_index = extract_layer_index(layer.layer_name)
            capture.store(self.layer_index, query)
        return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                               output_scale, output_block_scale)


class TCABackend(CPUAttentionBackend):
    """Registered over ``CPU_ATTN`` while a TCA worker builds its model: same name and
    classmethods, TCA's builder and impl."""

    @staticmethod
    def get_impl_cls():
        return TCAImpl

    @staticmethod
    def get_builder_cls():
        return TCABuilder


# -- the worker -------------------------------------------------------------------------------------

class TCAWorker(CPUWorker, TetherWorkerExtension):
    """vLLM's CPU worker that builds its attention layers with ``TCABackend`` and binds the
    TCA state to the runner, the builders and the connector.

    tether's worker extension is a base here, not left to ``worker_extension_cls``: vLLM mixes
    an extension in by appending it to the worker class's ``__bases__``, so once a plain engine
    of this process has run, ``CPUWorker`` carries it and vLLM's conflict check would refuse
    any subclass of ``CPUWorker`` (it sees the inherited methods as clashes)."""

    def __init__(self, vllm_config, *args, **kwargs):
        check_config(vllm_config)  # before the model is loaded: refusals come fast
        super().__init__(vllm_config, *args, **kwargs)
        self.tca: TCAState | None = None

    def load_model(self, *args, **kwargs) -> None:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
        from vllm.v1.attention.selector import _cached_get_attn_backend

        # The override is process-wide: set it only while this model is built, so that other
        # engines of this process keep vLLM's backend (the selector memoises its answer).
        register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_CLS)
        _cached_get_attn_backend.cache_clear()
        try:
            super().load_model(*args, **kwargs)
        finally:
            AttentionBackendEnum.CPU_ATTN.clear_override()
            _cached_get_attn_backend.cache_clear()

    def initialize_from_config(self, kv_cache_config) -> None:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        super().initialize_from_config(kv_cache_config)
        runner = self.model_runner
        connector = get_kv_transfer_group()
        if not isinstance(connector, TCAConnector):
            raise TCAUnsupported(f"TCAWorker needs the TCA connector; the engine's KV connector "
                                 f"is {type(connector).__name__}")
        builders = [group.get_metadata_builder() for groups in runner.attn_groups
                    for group in groups]
        impls = [layer.impl for layer in runner.compilation_config.static_forward_context
                 .values() if hasattr(layer, "impl")]
        if not builders or not all(isinstance(b, TCABuilder) for b in builders) or \
                not all(isinstance(i, TCAImpl) for i in impls):
            raise RuntimeError("the model's attention layers were not built with TCABackend")
        if any(group.kernel_block_size is not None for groups in runner.attn_groups
               for group in groups):
            raise TCAUnsupported("TCA in the engine needs kernel blocks equal to KV blocks")
        settings = dataclasses.replace(connector.settings, scale=impls[0].scale)
        self.tca = TCAState(settings, lambda: runner.input_batch.req_ids,
                            self.model_config.dtype)
        for builder in builders:
            builder.tca = self.tca
        connector.state = self.tca
