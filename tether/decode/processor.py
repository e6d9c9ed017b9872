"""AWRS as a vLLM (V1) logits processor: constrained rows are decided here, then forced.

A request is constrained when its ``SamplingParams.extra_args["tether"]`` holds a
``ParticleConfig``. For every step, ``apply`` receives the fp32 logits of the whole batch where
they already are (the GPU in production) and, for the constrained rows only:

1. shapes each row's distribution with the request's temperature, top-k and top-p
   (``samplers.candidates.shape_logprobs``; the order is vLLM's own: temperature, top-k, top-p);
2. ranks the candidates of all those rows by counter-based Gumbel keys in one batched device
   operation, and copies the top ``CANDIDATES`` of each row to the host in one copy;
3. on the host, runs the row's AWRS step (``samplers.awrs``) against its constraint state;
   only a row whose candidates are all rejected goes back to the device for more, and only the
   bounded-cost fallback asks for the constraint's full mask;
4. forces the chosen token: the row becomes -inf except that token (0), so whatever vLLM's
   sampler does next (penalties, temperature, top-k/p, greedy or random) returns it.

Truncation and constraints can leave nothing: when every token inside top-k/top-p is rejected,
the step is redone on the untruncated distribution (temperature only), the way a masking
sampler applies top-k/top-p after the mask; the step is recorded as ``untruncated``.

Built-in processors run before this one (min-tokens and logit bias shape the logits AWRS sees);
the request's repetition/frequency/presence penalties are not applied to constrained rows.

Randomness is a pure function of (particle seed, step): every tensor-parallel rank computes the
same logits, the same keys and the same decisions, and forces the same token.

A particle whose every token is rejected is dead: the step records log weight -inf and the row
is forced to a stop token, so the request ends at once. Stop tokens (the tokenizer's EOS, the
generation config's, the request's ``stop_token_ids``) are allowed only where the constraint is
complete.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tether.samplers import awrs
from tether.samplers.candidates import CandidateStream, rank_batch, shape_logprobs
from tether.samplers.gumbel import mix_seed

try:  # vLLM is imported lazily elsewhere; this module is only loaded by the engine.
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
except ImportError:  # pragma: no cover - vLLM missing: the processor cannot be used anyway
    LogitsProcessor = object  # type: ignore[misc,assignment]
    BatchUpdate = MoveDirectionality = None  # type: ignore[assignment]

CANDIDATES = 8  # candidates per row copied to the host per step
DEFAULT_MAX_REJECTIONS = 16
MAX_COIN_RATIO = 16.0  # see samplers.awrs: bounded mode replaces a lopsided coin flip by the mask
SAMPLERS = ("awrs", "lcd")
EXTRA_KEY = "tether"


@dataclass(frozen=True)
class ParticleConfig:
    """What a constrained request carries in ``extra_args["tether"]`` (JSON-serializable).

    ``prefix``: output tokens this particle had already generated before it was (re)submitted
    with them appended to its prompt (SMC resampling); steps are numbered from ``len(prefix)``.
    """

    spec: dict
    key: str
    sampler: str = "awrs"
    estimator: str = "recursive"
    max_rejections: int | None = DEFAULT_MAX_REJECTIONS
    seed: int = 0
    prefix: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; use one of {', '.join(SAMPLERS)}")
        if self.estimator not in awrs.ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; use one of "
                             f"{', '.join(awrs.ESTIMATORS)}")
        if self.max_rejections is not None and (not isinstance(self.max_rejections, int)
                                                or self.max_rejections < 1):
            raise ValueError("max_rejections must be a positive integer or None (unbounded)")
        if self.estimator == "geometric" and self.max_rejections is not None \
                and self.sampler == "awrs":
            raise ValueError("the geometric estimator has no bounded-cost form; "
                             "use max_rejections=None with it, or the recursive estimator")

    def to_extra_args(self) -> dict:
        return {EXTRA_KEY: {"spec": self.spec, "key": self.key, "sampler": self.sampler,
                            "estimator": self.estimator, "max_rejections": self.max_rejections,
                            "seed": self.seed, "prefix": list(self.prefix)}}

    @classmethod
    def from_extra_args(cls, extra: dict | None) -> "ParticleConfig | None":
        if not extra or EXTRA_KEY not in extra:
            return None
        raw = extra[EXTRA_KEY]
        if not isinstance(raw, dict) or "spec" not in raw or "key" not in raw:
            raise ValueError("extra_args['tether'] needs at least 'spec' and 'key'")
        known = {"spec", "key", "sampler", "estimator", "max_rejections", "seed", "prefix"}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown extra_args['tether'] fields: {', '.join(sorted(unknown))}")
        return cls(spec=raw["spec"], key=str(raw["key"]), sampler=raw.get("sampler", "awrs"),
                   estimator=raw.get("estimator", "recursive"),
                   max_rejections=raw.get("max_rejections", DEFAULT_MAX_REJECTIONS),
                   seed=int(raw.get("seed", 0)), prefix=tuple(raw.get("prefix", ())))


class _Row:
    """One constrained request in the persistent batch."""

    def __init__(self, cfg: ParticleConfig, params: Any, output: list[int], tokenizer_path: str):
        from tether.constraints import Spec, compile_constraint
        from tether.decode.records import record_for

        self.cfg = cfg
        self.output = output  # vLLM's live list of this request's output token ids
        self.constraint = compile_constraint(Spec.from_wire(cfg.spec), tokenizer_path)
        self.record = record_for(cfg.key)
        self.stop_ids = frozenset(self.constraint.eos_token_ids) | frozenset(
            params.all_stop_token_ids or ())
        self.seed = mix_seed(cfg.seed)
        temperature = float(params.temperature)
        self.greedy = temperature < 1e-5
        self.temperature = 1.0 if self.greedy else temperature
        self.top_k = int(params.top_k) if params.top_k and params.top_k > 0 else 0
        self.top_p = float(params.top_p) if params.top_p else 1.0
        self.truncates = self.top_k > 0 or self.top_p < 1.0
        self.cheap_mask = self.constraint.cheap_mask
        self.state = self.constraint.start()
        for t in cfg.prefix:
            self.state = self.constraint.advance(self.state, t)
        self.consumed = 0  # how many of ``output`` are folded into ``state``

    def sync(self) -> None:
        """Fold the output tokens vLLM appended since the last step into the state."""
        while self.consumed < len(self.output):
            token = self.output[self.consumed]
            if token in self.stop_ids or self.record.error is not None:
                self.consumed = len(self.output)
                return
            try:
                self.state = self.constraint.advance(self.state, token)
            except ValueError as e:
                self.record.error = f"output token {token} at step {self.step}: {e}"
            self.consumed += 1

    @property
    def step(self) -> int:
        return len(self.cfg.prefix) + self.consumed

    def accept(self, token: int) -> bool:
        if token in self.stop_ids:
            return self.constraint.is_complete(self.state)
        return self.constraint.allows(self.state, token)

    def allowed(self) -> np.ndarray:
        mask = self.constraint.mask(self.state)
        stops = [t for t in self.stop_ids if t < len(mask)]
        if stops:
            mask[stops] = self.constraint.is_complete(self.state)
        return mask

    def decide(self, stream: CandidateStream) -> awrs.StepResult:
        cfg = self.cfg
        bounded = cfg.max_rejections
        if self.greedy or cfg.sampler == "lcd":
            return awrs.lcd(stream, self.accept, max_rejections=bounded, allowed=self.allowed)
        if cfg.estimator == "geometric":
            rng = np.random.default_rng(mix_seed(self.seed, self.step, 1))
            return awrs.geometric_awrs(stream, self.accept, rng)
        ratio = MAX_COIN_RATIO if (bounded is not None and self.cheap_mask) else None
        return awrs.recursive_awrs(stream, self.accept, max_rejections=bounded,
                                   allowed=self.allowed, max_coin_ratio=ratio)


class AWRSLogitsProcessor(LogitsProcessor):
    """vLLM V1 logits processor running AWRS for requests with ``extra_args['tether']``."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        cfg = ParticleConfig.from_extra_args(sampling_params.extra_args)
        if cfg is None:
            return
        if sampling_params.ignore_eos:
            raise ValueError("ignore_eos cannot be combined with a tether constraint: the "
                             "constraint decides where the output may end")
        if getattr(sampling_params, "structured_outputs", None) is not None:
            raise ValueError("a request cannot carry both vLLM structured outputs and a "
                             "tether constraint")

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.tokenizer_path = vllm_config.model_config.tokenizer
        self.rows: dict[int, _Row] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it forces tokens, so it must also run for greedy requests

    def update_state(self, batch_update: "BatchUpdate | None") -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt, output in batch_update.added:
            cfg = ParticleConfig.from_extra_args(params.extra_args)
            if cfg is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = _Row(cfg, params, output, self.tokenizer_path)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if direction == MoveDirectionality.SWAP and row_b is not None:
                self.rows[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        indices = sorted(i for i in self.rows if i < logits.shape[0])
        if not indices:
            return logits
        rows = [self.rows[i] for i in indices]
        for row in rows:
            row.sync()

        t0 = time.perf_counter()
        dev = logits.device
        index_t = torch.tensor(indices, device=dev)
        logprobs = shape_logprobs(
            logits.index_select(0, index_t),
            torch.tensor([r.temperature for r in rows], device=dev),
            torch.tensor([r.top_k for r in rows], device=dev),
            torch.tensor([r.top_p for r in rows], device=dev))
        ranked = rank_batch(logprobs, [r.seed for r in rows], [r.step for r in rows], CANDIDATES,
                            noise=[not r.greedy for r in rows])
        shared_device_s = (time.perf_counter() - t0) / len(rows)

        forced = []
        for j, row in enumerate(rows):
            stream = ranked.stream(j)
            t1 = time.perf_counter()
            untruncated = False
            if row.record.error is not None:
                result = awrs.StepResult(None, float("-inf"), 0, 0)
            else:
                result = row.decide(stream)
                if result.dead and row.truncates:
                    # Nothing allowed inside top-k/top-p: retry on the untruncated distribution.
                    full = rank_batch(
                        shape_logprobs(logits[indices[j]:indices[j] + 1],
                                       torch.tensor([row.temperature], device=dev),
                                       torch.tensor([0], device=dev), torch.tensor([1.0], device=dev)),
                        [row.seed], [row.step], CANDIDATES, noise=[not row.greedy])
                    stream = full.stream(0)
                    result, untruncated = row.decide(stream), True
            elapsed = time.perf_counter() - t1
            token = result.token
            if token is None:
                token = min(row.stop_ids)
                if row.record.dead_step is None or row.record.dead_step > row.step:
                    row.record.dead_step = row.step
            elif row.record.dead_step is not None and row.record.dead_step >= row.step:
                row.record.dead_step = None  # that death was on a discarded sample
            row.record.steps[row.step] = _step_record(result, token, elapsed, stream,
                                                      shared_device_s, untruncated)
            forced.append(token)

        forced_t = torch.tensor(forced, device=dev)
        logits.index_fill_(0, index_t, float("-inf"))
        logits[index_t, forced_t] = 0.0
        return logits


def _step_record(result: awrs.StepResult, token: int, elapsed: float, stream: CandidateStream,
                 shared_device_s: float, untruncated: bool):
    from tether.decode.records import StepRecord

    return StepRecord(token=token, log_weight=result.log_weight, checks=result.checks,
                      rejections=result.rejections, exact=result.exact, untruncated=untruncated,
                      constraint_s=max(0.0, elapsed - stream.device_seconds),
                      device_s=shared_device_s + stream.device_seconds)
