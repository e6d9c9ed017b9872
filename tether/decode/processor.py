"""AWRS as a vLLM (V1) logits processor: constrained rows are decided here, then forced.

A request is constrained when its ``SamplingParams.extra_args["tether"]`` holds a
``ParticleConfig``. For every step, ``apply`` receives the fp32 logits of the whole batch where
they already are (the GPU in production) and, for the constrained rows only:

1. shapes each row's distribution the way vLLM's sampler would: the request's repetition,
   frequency and presence penalties, then temperature, min-p, top-k and top-p, in vLLM's
   order and with vLLM's own operations (``decode.shaping``);
2. ranks the candidates of all those rows by counter-based Gumbel keys in one batched device
   operation, and copies the top ``CANDIDATES`` of each row to the host in one copy;
3. on the host, runs the row's AWRS step (``samplers.awrs``) against its constraint state;
   only a row whose candidates are all rejected goes back to the device for more, and only the
   bounded-cost fallback asks for the constraint's full mask;
   rows with exact weights (below) bring their full mask to step 2 instead, and get their
   token and exact weight from that same batched operation and copy;
4. forces the chosen token: the row becomes -inf except that token (0), so whatever vLLM's
   sampler does next (penalties, temperature, top-k/p, greedy or random) returns it.

Weights (``ParticleConfig.weights``). "exact": the step weight is the allowed mass Z_A itself,
computed on the device from the constraint's mask and the logits already there
(``awrs.exact_weight``; the token is drawn from the same distribution AWRS samples, p
restricted to the mask, in the same pass: ``candidates.masked_draws``); it needs a
constraint whose full mask is cheap (``Constraint.cheap_mask``: llguidance's schemas,
regexes, grammars, choices), and a row whose constraint has none fails with ``error``. "estimate": AWRS's unbiased estimator (``estimator``). "auto" (the default): exact
where the mask is cheap, the estimator elsewhere (partial-matching regexes, predicates). The
mode that ran is recorded (``ParticleRecord.weights``); greedy rows and the lcd sampler carry
no weight.

The target. Each step samples from the distribution vLLM's sampler would sample from (the
shaping above), restricted to the allowed tokens. Where truncation (min-p, top-k, top-p) leaves
no allowed token, the step is redone on the untruncated distribution (penalties and
temperature only), the way a masking sampler applies truncation after the mask; such steps are
counted (``untruncated_steps``). So the SMC target is the model shaped by the request's
parameters, untruncated at exactly those steps. Built-in processors run before this one
(min-tokens, logit bias, allowed tokens and bad words shape the logits AWRS sees).

Bounded cost. Each particle carries a time budget for its constraint (``budget_s``, what is
left of its lineage's). Within one engine step, time is granted in three layers
(``StepGrants``): a row gets at most ``STEP_LIMIT_S``; the rows of one population (one
request's particles for one prompt) share ``POPULATION_STEP_S``; all constrained rows of the
step share ``STEP_TOTAL_S``, past which each further row still gets ``ROW_FLOOR_S`` (far more
than a JSON check needs: about 0.1 ms). So one step spends at most ``STEP_TOTAL_S`` plus
``ROW_FLOOR_S`` per row on constraints, however many particles a request brings. Checks run
under the row's grant (``constraints.budget``): a check that runs out ends the particle with
the reason ``budget``; it never counts as a rejection. A population whose share of the step
is used up ends its remaining rows with ``budget`` at once (it would fail anyway: its SMC
weights are unknown once one particle fails). Constraints are compiled before their requests
reach the engine (``records.prepare_local``, called by the server): a step finds them in the
compile cache. The bounded-cost fallback (the full mask
after ``max_rejections``) is used only where the mask is cheap (llguidance); constraints
checked on text (partial matching, predicates) keep sampling candidates instead, which never
costs more than the mask would and stops at the deadline.

Isolation. Nothing raised while checking one request leaves this processor: a constraint that
fails to compile, raises mid-generation, or disagrees with its own mask ends that particle with
the reason ``error`` (forced to a stop token, the message in its record), and the other rows
of the batch go on. An exception reaching vLLM's engine core would kill every request.

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

from tether.constraints import budget
from tether.samplers import awrs
from tether.decode.shaping import penalize, shape_logits
from tether.samplers.candidates import CandidateStream, rank_batch
from tether.samplers.gumbel import mix_seed

try:  # vLLM is imported lazily elsewhere; this module is only loaded by the engine.
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
except ImportError:  # pragma: no cover - vLLM missing: the processor cannot be used anyway
    LogitsProcessor = object  # type: ignore[misc,assignment]
    BatchUpdate = MoveDirectionality = None  # type: ignore[assignment]

CANDIDATES = 8  # candidates per row copied to the host per step
DEFAULT_MAX_REJECTIONS = 16
DEFAULT_BUDGET_S = 10.0  # constraint seconds per particle (its lineage through resampling)
STEP_LIMIT_S = 0.5  # constraint seconds one row may take in one engine step (a full
# scan of a 49k vocabulary by partial matching takes about 0.1 s here)
POPULATION_STEP_S = 0.5  # ... all rows of one population together, in one engine step
STEP_TOTAL_S = 1.0  # ... all constrained rows of one engine step, before the floor applies
ROW_FLOOR_S = 0.005  # ... what each row still gets once STEP_TOTAL_S is used up
MAX_COIN_RATIO = 16.0  # see samplers.awrs: bounded mode replaces a lopsided coin flip by the mask
SAMPLERS = ("awrs", "lcd")
EXTRA_KEY = "tether"


@dataclass(frozen=True)
class ParticleConfig:
    """What a constrained request carries in ``extra_args["tether"]`` (JSON-serializable).

    ``prefix``: output tokens this particle had already generated before it was (re)submitted
    with them appended to its prompt (SMC resampling); steps are numbered from ``len(prefix)``.
    ``budget_s``: constraint seconds this particle may still spend (None: no limit).
    ``population``: what the particles of one SMC population share (their per-step time).
    """

    spec: dict
    key: str
    sampler: str = "awrs"
    estimator: str = "recursive"
    max_rejections: int | None = DEFAULT_MAX_REJECTIONS
    seed: int = 0
    prefix: tuple[int, ...] = field(default_factory=tuple)
    budget_s: float | None = DEFAULT_BUDGET_S
    population: str | None = None
    weights: str = "auto"

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
        if self.weights not in awrs.WEIGHTS:
            raise ValueError(f"unknown weights {self.weights!r}; use one of "
                             f"{', '.join(awrs.WEIGHTS)}")
        if self.budget_s is not None and not self.budget_s >= 0:
            raise ValueError("the constraint budget must be a number of seconds >= 0")

    def to_extra_args(self) -> dict:
        return {EXTRA_KEY: {"spec": self.spec, "key": self.key, "sampler": self.sampler,
                            "estimator": self.estimator, "max_rejections": self.max_rejections,
                            "seed": self.seed, "prefix": list(self.prefix),
                            "budget_s": self.budget_s, "population": self.population,
                            "weights": self.weights}}

    @classmethod
    def from_extra_args(cls, extra: dict | None) -> "ParticleConfig | None":
        if not extra or EXTRA_KEY not in extra:
            return None
        raw = extra[EXTRA_KEY]
        if not isinstance(raw, dict) or "spec" not in raw or "key" not in raw:
            raise ValueError("extra_args['tether'] needs at least 'spec' and 'key'")
        known = {"spec", "key", "sampler", "estimator", "max_rejections", "seed", "prefix",
                 "budget_s", "population", "weights"}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown extra_args['tether'] fields: {', '.join(sorted(unknown))}")
        return cls(spec=raw["spec"], key=str(raw["key"]), sampler=raw.get("sampler", "awrs"),
                   estimator=raw.get("estimator", "recursive"),
                   max_rejections=raw.get("max_rejections", DEFAULT_MAX_REJECTIONS),
                   seed=int(raw.get("seed", 0)), prefix=tuple(raw.get("prefix", ())),
                   budget_s=raw.get("budget_s", DEFAULT_BUDGET_S),
                   population=raw.get("population"), weights=raw.get("weights", "auto"))


class _Row:
    """One constrained request in the persistent batch.

    Construction never raises: whatever goes wrong (the spec does not compile, the prefix does
    not replay) is recorded as the row's failure, and the row is then forced to stop.
    """

    def __init__(self, cfg: ParticleConfig, params: Any, prompt: list[int] | None,
                 output: list[int], vocab: Any, engine: int | None):
        from tether.constraints import Spec, compile_constraint
        from tether.decode.records import record_for

        self.cfg = cfg
        self.output = output  # vLLM's live list of this request's output token ids
        self.record = record_for(cfg.key, engine)
        self.consumed = 0  # how many of ``output`` are folded into ``state``
        self.spent = 0.0  # constraint seconds this request has used
        self.stop_ids = frozenset(vocab.eos_token_ids) | frozenset(params.all_stop_token_ids or ())
        self.stop_token = min(self.stop_ids)
        temperature = float(params.temperature)
        self.greedy = temperature < 1e-5
        self.temperature = 1.0 if self.greedy else temperature
        # Truncation does not change a greedy choice: greedy rows are never truncated.
        self.top_k = int(params.top_k) if params.top_k and params.top_k > 0 and not self.greedy \
            else 0
        self.top_p = float(params.top_p) if params.top_p and not self.greedy else 1.0
        self.min_p = float(params.min_p or 0.0) if not self.greedy else 0.0
        self.truncates = self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0
        self.penalties = (float(params.repetition_penalty), float(params.frequency_penalty),
                          float(params.presence_penalty))
        self.penalized = self.penalties != (1.0, 0.0, 0.0)
        # the prompt without the carried prefix: penalties count the prefix as output
        self.prompt = list(prompt or [])[: max(0, len(prompt or []) - len(cfg.prefix))]
        self.seed = mix_seed(cfg.seed)
        self.constraint = None
        self.state = None
        self.weights: str | None = None
        try:
            self.constraint = compile_constraint(Spec.from_wire(cfg.spec), vocab)
            self.stop_ids |= frozenset(self.constraint.eos_token_ids)
            self.cheap_mask = self.constraint.cheap_mask
            self.weights = self._weights()
            self.record.weights = self.weights
            state = self.constraint.start()
            with budget.deadline(self.allowance()):
                for t in cfg.prefix:  # decided by this same constraint: no need to recheck
                    state = self.constraint.advance(state, t, check=False)
            self.state = state
        except budget.BudgetExceeded as e:
            self.fail("budget", f"replaying the resampled prefix: {e}")
        except Exception as e:
            self.fail("error", f"{type(e).__name__}: {e}")

    def _weights(self) -> str | None:
        """The weights this row computes: "exact", "estimate", or None (no weight)."""
        if self.greedy or self.cfg.sampler == "lcd":
            return None
        if self.cfg.weights == "exact" and not self.cheap_mask:
            raise ValueError(f"weights='exact' needs a constraint with a cheap full mask "
                             f"(llguidance); this one is checked by {self.constraint.engine}")
        exact = self.cfg.weights == "exact" or self.cfg.weights == "auto" and self.cheap_mask
        return "exact" if exact else "estimate"

    # -- failures -------------------------------------------------------------------------------
    @property
    def failed(self) -> bool:
        return self.record.failure is not None

    def fail(self, reason: str, message: str) -> None:
        if self.record.failure is None:
            self.record.failure = {"reason": reason, "message": message[:500],
                                   "step": self.step}

    def allowance(self) -> float | None:
        """Seconds this row may spend in the constraint at this step."""
        if self.cfg.budget_s is None:
            return STEP_LIMIT_S
        return min(STEP_LIMIT_S, self.cfg.budget_s - self.spent)

    # -- the protocol -----------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return len(self.cfg.prefix) + self.consumed

    def sync(self) -> None:
        """Fold the output tokens vLLM appended since the last step into the state."""
        while self.consumed < len(self.output) and not self.failed:
            token = self.output[self.consumed]
            if token in self.stop_ids:
                self.consumed = len(self.output)
                return
            decided = self.record.steps.get(self.step)
            trusted = decided is not None and decided.token == token
            try:
                self.state = self.constraint.advance(self.state, token, check=not trusted)
            except ValueError as e:
                self.fail("error", f"output token {token} at step {self.step}: {e}")
            self.consumed += 1

    def accept(self, token: int) -> bool:
        budget.check()
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
        if self.weights == "exact":  # token and Z_A came with the ranking (rank_batch)
            return awrs.exact_weight(stream.masked(), self.accept)
        # The full-mask fallback only where a mask costs about as much as a few checks.
        bounded = cfg.max_rejections if self.cheap_mask else None
        if self.greedy or cfg.sampler == "lcd":
            return awrs.lcd(stream, self.accept, max_rejections=bounded, allowed=self.allowed)
        if cfg.estimator == "geometric":
            rng = np.random.default_rng(mix_seed(self.seed, self.step, 1))
            return awrs.geometric_awrs(stream, self.accept, rng)
        ratio = MAX_COIN_RATIO if bounded is not None else None
        return awrs.recursive_awrs(stream, self.accept, max_rejections=bounded,
                                   allowed=self.allowed, max_coin_ratio=ratio)

    def seen(self) -> list[int]:
        """The tokens the penalties count as output: the carried prefix, then this row's."""
        return list(self.cfg.prefix) + self.output


class StepGrants:
    """The constraint time rows may take in one engine step (see the module docstring)."""

    def __init__(self) -> None:
        self.left = STEP_TOTAL_S
        self.population_left: dict[str | None, float] = {}

    def grant(self, row: _Row) -> float:
        """Seconds ``row`` may spend now; 0 when its population's share is used up."""
        population = self.population_left.get(row.cfg.population, POPULATION_STEP_S)
        return max(0.0, min(row.allowance(), population, max(ROW_FLOOR_S, self.left)))

    def charge(self, row: _Row, seconds: float) -> None:
        self.left -= seconds
        key = row.cfg.population
        self.population_left[key] = self.population_left.get(key, POPULATION_STEP_S) - seconds


def _run_granted(row: _Row, seconds: float, work) -> Any:
    """``work()`` under a deadline of ``seconds``; a row that overruns (or got no time) ends
    with ``budget``, one that raises with ``error`` (isolation); returns None then."""
    if seconds <= 0.0:
        row.fail("budget", "its population used up its constraint time for this engine step "
                 f"({POPULATION_STEP_S} s, shared by the population's particles)")
        return None
    try:
        with budget.deadline(seconds):
            return work()
    except budget.BudgetExceeded as e:
        row.fail("budget", f"{e} (granted {seconds * 1000:.0f} ms in this engine step)")
    except Exception as e:  # isolation: see the module docstring
        row.fail("error", f"{type(e).__name__}: {e}")
    return None


class AWRSLogitsProcessor(LogitsProcessor):
    """vLLM V1 logits processor running AWRS for requests with ``extra_args['tether']``."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        from tether.decode.tca import tca_requested

        tca_requested(sampling_params)  # TCA's per-request opt-out: checked here, in the front end
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
        from tether.constraints import vocab_for

        self.device = device
        if device.type == "cpu":  # built in every tether engine's worker, before any sampling
            from tether.decode import cpu_seeds

            cpu_seeds.install()
        # Built here, at engine start, so that the first constrained request does not stall
        # an engine step for the tokenizer's byte tables (about 1 s; 11 s for Gemma 3).
        self.vocab = vocab_for(vllm_config.model_config.tokenizer)
        from tether.constraints import grammar

        grammar.warm_up()  # the first JSON Schema's imports, here rather than mid-batch
        # vLLM 0.32 resets data_parallel_rank to 0 in the engines of dense models (they run as
        # independent DP=1 engines); data_parallel_index keeps the engine's rank.
        self.engine = vllm_config.parallel_config.data_parallel_index
        self.rows: dict[int, _Row] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it forces tokens, so it must also run for greedy requests

    def update_state(self, batch_update: "BatchUpdate | None") -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, prompt, output in batch_update.added:
            cfg = ParticleConfig.from_extra_args(params.extra_args)  # checked by validate_params
            if cfg is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = _Row(cfg, params, prompt, output, self.vocab, self.engine)
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
        forced: dict[int, int] = {}
        live: list[tuple[int, _Row]] = []
        grants = StepGrants()
        for i in indices:
            row = self.rows[i]
            t0 = time.perf_counter()
            if not row.failed:
                _run_granted(row, grants.grant(row), row.sync)
            elapsed = time.perf_counter() - t0
            row.spent += elapsed
            grants.charge(row, elapsed)
            if row.failed:
                forced[i] = self._end(row)
            else:
                live.append((i, row))
        if live:
            forced.update(self._decide(logits, live, grants))
        index_t = torch.tensor(list(forced), device=logits.device)
        logits.index_fill_(0, index_t, float("-inf"))
        logits[index_t, torch.tensor(list(forced.values()), device=logits.device)] = 0.0
        return logits

    def _end(self, row: _Row) -> int:
        """A failed row: record the step, force a stop token so that the request ends."""
        from tether.decode.records import StepRecord

        row.record.steps[row.step] = StepRecord(row.stop_token, float("-inf"), 0, 0, False,
                                                False, 0.0, 0.0)
        return row.stop_token

    def _rank(self, logits: torch.Tensor, rows: list[tuple[int, _Row]], truncate: bool,
              masks: dict[int, np.ndarray]):
        dev = logits.device
        indices = [i for i, _ in rows]
        if indices == list(range(indices[0], indices[0] + len(indices))):
            shaped = logits[indices[0]:indices[0] + len(indices)]  # a view: no copy
        else:
            shaped = logits[torch.tensor(indices, device=dev)]
        penalized = [j for j, (_, r) in enumerate(rows) if r.penalized]
        if penalized:
            sub = [rows[j][1] for j in penalized]
            shaped = shaped.clone()  # never vLLM's logits: a redo without truncation reads them
            shaped[penalized] = penalize(shaped[penalized], [r.prompt for r in sub],
                                         [r.seen() for r in sub], [r.penalties for r in sub])
        temperatures = [r.temperature for _, r in rows]
        scores = shape_logits(
            shaped, None if all(t == 1.0 for t in temperatures) else
            torch.tensor(temperatures, device=dev),
            torch.tensor([r.top_k if truncate else 0 for _, r in rows], device=dev),
            torch.tensor([r.top_p if truncate else 1.0 for _, r in rows], device=dev),
            torch.tensor([r.min_p if truncate else 0.0 for _, r in rows], device=dev))
        return rank_batch(scores, [r.seed for _, r in rows], [r.step for _, r in rows],
                          CANDIDATES, noise=[not r.greedy for _, r in rows],
                          masks=[masks.get(i) for i, _ in rows])

    def _decide(self, logits: torch.Tensor, live: list[tuple[int, _Row]],
                grants: StepGrants) -> dict[int, int]:
        from tether.decode.records import StepRecord

        # rows with exact weights: their masks first (constraint time, under their grants)
        masks: dict[int, np.ndarray] = {}
        mask_s: dict[int, float] = {}
        forced = {}
        ranked_rows = []
        for i, row in live:
            if row.weights == "exact":
                t1 = time.perf_counter()
                mask = _run_granted(row, grants.grant(row), row.allowed)
                elapsed = time.perf_counter() - t1
                row.spent += elapsed
                grants.charge(row, elapsed)
                mask_s[i] = elapsed
                if mask is None:
                    forced[i] = self._end(row)
                    continue
                masks[i] = mask
            ranked_rows.append((i, row))
        live = ranked_rows
        if not live:
            return forced
        t0 = time.perf_counter()
        try:
            ranked = self._rank(logits, live, truncate=True, masks=masks)
        except Exception:  # a row's parameters broke the batched operation: rank rows alone
            ranked = None
        shared_device_s = (time.perf_counter() - t0) / len(live)
        for j, (i, row) in enumerate(live):
            t1 = time.perf_counter()

            def step(j=j, i=i, row=row):
                stream = ranked.stream(j) if ranked is not None else \
                    self._rank(logits, [(i, row)], truncate=True, masks=masks).stream(0)
                result = row.decide(stream)
                if result.dead and row.truncates:
                    # Nothing allowed inside the truncation: redo on the full distribution.
                    stream = self._rank(logits, [(i, row)], truncate=False,
                                        masks=masks).stream(0)
                    return row.decide(stream), True, stream
                return result, False, stream

            decided = _run_granted(row, grants.grant(row), step)
            elapsed = time.perf_counter() - t1
            if decided is None:
                row.spent += elapsed
                grants.charge(row, elapsed)
                forced[i] = self._end(row)
                continue
            result, untruncated, stream = decided
            constraint_s = max(0.0, elapsed - stream.device_seconds)
            row.spent += constraint_s
            grants.charge(row, constraint_s)
            constraint_s += mask_s.get(i, 0.0)
            token = result.token
            if token is None:
                token = row.stop_token
                if row.record.dead_step is None or row.record.dead_step > row.step:
                    row.record.dead_step = row.step
            elif row.record.dead_step is not None and row.record.dead_step >= row.step:
                row.record.dead_step = None  # that death was on a discarded sample
            row.record.steps[row.step] = StepRecord(
                token=token, log_weight=result.log_weight, checks=result.checks,
                rejections=result.rejections, exact=result.exact, untruncated=untruncated,
                constraint_s=constraint_s, device_s=shared_device_s + stream.device_seconds)
            forced[i] = token
        return forced
