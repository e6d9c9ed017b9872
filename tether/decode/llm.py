"""The Python API: ``tether.LLM`` and ``tether.generate``.

``LLM(model)`` owns one in-process vLLM engine (``decode.engine.Engine``) with the AWRS logits
processor installed. ``LLM.generate(prompts, constraint=...)`` compiles the constraint once in
the caller (so a bad spec raises ``ConstraintError`` before anything runs), then drives the
engine step by step (``decode.smc.SMCDriver``): one request per particle, all prompts in one
batch, resampling per prompt when ``particles > 1``. The processor's per-particle records and
vLLM's outputs become ``Result`` objects.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Sequence

from pydantic_core import to_jsonable_python

from tether.constraints import Constraint, compile_constraint
from tether.decode.engine import Engine
from tether.decode.processor import DEFAULT_BUDGET_S, DEFAULT_MAX_REJECTIONS
from tether.samplers.awrs import check_weights
from tether.decode.results import assemble
from tether.decode.smc import Group, SMCDriver, SMCSettings, run_sync


@dataclass
class Result:
    """One generated output (for SMC: the first posterior draw, with the whole population).

    ``finish_reason``: "stop" (the output ended where the constraint allows it: it is valid),
    "length" (``max_tokens`` reached first: incomplete, not claimed valid), "constraint"
    (every token was rejected at some step: log weight -inf), "budget" (the constraint's time
    budget ran out) or "error" (the constraint failed; ``stats["failure"]`` has the message).
    ``value``: the parsed output when valid (a dict for a JSON Schema, a model instance for a
    pydantic class, the text otherwise), else None.
    ``log_weight``: the sum of the AWRS step log weights of this output (0.0 for the lcd
    sampler and unconstrained generation).
    ``stats``: tokens, constraint checks, rejections, exact (mask-finished) steps, seconds in the
    constraint and in device operations, per-step log weights.
    With ``particles > 1``: ``particles`` (every particle: text, finish reason, log weight,
    normalized weight), ``log_z`` (the log marginal-likelihood estimate), ``draws`` (``n``
    posterior draws, as Results), ``ess`` (per-step effective sample size, with ``trace``),
    ``resampling`` (events: time, ESS, ancestors, copies as (uid, parent uid), prefill tokens),
    ``ancestry`` (uid and parent uid of each particle), ``normalized_weight``.
    When a particle fails (budget or error), its population has no draws and no ``log_z``.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    log_weight: float = 0.0
    value: Any = None
    stats: dict = field(default_factory=dict)
    normalized_weight: float | None = None
    particles: list["Result"] | None = None
    log_z: float | None = None
    draws: list["Result"] | None = None
    ess: list[tuple[int, float]] | None = None
    resampling: list[dict] | None = None
    ancestry: list[dict] | None = None  # per particle: its uid and its parent's (copies)
    pre_align: Any = None  # the instruction's pre-alignment (alignment.prealign.Rewrite)
    # LLM.chat: the message as the tool parser reads it (tool_calls: id, name, arguments)
    content: str | None = None
    tool_calls: list[dict] | None = None

    @property
    def valid(self) -> bool:
        return self.finish_reason == "stop"

    def to_dict(self) -> dict:
        """A JSON-ready dict: infinite or undefined numbers (a dead particle's log weight, the
        log Z of a population with no complete particle) become None (JSON null)."""
        value = self.value
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        out = {"text": self.text, "value": value, "finish_reason": self.finish_reason,
               "log_weight": self.log_weight, "valid": self.valid,
               "stats": {k: v for k, v in self.stats.items() if k != "step_log_weights"}}
        if self.particles is not None:
            out["log_z"] = self.log_z
            out["particles"] = [{"text": p.text, "finish_reason": p.finish_reason,
                                 "log_weight": p.log_weight,
                                 "normalized_weight": p.normalized_weight}
                                for p in self.particles]
            out["draws"] = [d.text for d in self.draws or []]
        if self.pre_align is not None:
            out["pre_align"] = self.pre_align.to_dict()
        if self.tool_calls is not None:
            out.update(content=self.content, tool_calls=self.tool_calls)
        return to_jsonable_python(out, inf_nan_mode="null")


class LLM:
    """A model served by an in-process vLLM engine, with constrained generation.

    ``model``: a registered embedded model ("smollm2", "gemma3"), a local HF directory or a
    hub id; default: the embedded SmolLM2-135M-Instruct. ``constraint_budget``: seconds of
    constraint time each particle may spend (its lineage through resampling; None: no limit);
    any one step of a particle gets at most ``processor.STEP_LIMIT_S`` of it. ``tca`` (budgets
    from ``tether calibrate``: a file, a ``Budgets`` or its dict) and ``kv_budget`` (the share of
    each request's KV to keep, in (0, 1]) run TCA-Attention inside the engine
    (``decode.tca``); a request opts out with ``SamplingParams.extra_args["tether_tca"] =
    False``. Keyword arguments go to ``vllm.LLM``.
    """

    def __init__(self, model: str | None = None, *,
                 constraint_budget: float | None = DEFAULT_BUDGET_S, tca: Any = None,
                 kv_budget: float | None = None, **engine_kwargs: Any):
        if constraint_budget is not None and not constraint_budget > 0:
            raise ValueError("constraint_budget must be a positive number of seconds or None")
        self.constraint_budget = constraint_budget
        self.engine = Engine(model, tca=tca, kv_budget=kv_budget, **engine_kwargs)
        self.model_path = self.engine.model_path
        self.tokenizer = self.engine.tokenizer
        self._rewriters: dict[str, LLM] = {}  # engines of rewriter models (pre_align)

    def constraint(self, spec: Any) -> Constraint:
        """Compile ``spec`` for this model's tokenizer (cached)."""
        return compile_constraint(spec, self.model_path)

    def prompt_ids(self, prompt: str | list[dict], chat: bool | None = None) -> list[int]:
        """Token ids of a prompt; chat models get their chat template unless ``chat=False``.

        ``prompt`` may be a string (a user message when the chat template applies), a list
        of chat messages, or a list of token ids (used as they are).
        """
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if chat is None:
            chat = has_template
        if isinstance(prompt, list):
            if not has_template:
                raise ValueError("chat messages need a model with a chat template")
            chat, messages = True, prompt
        else:
            messages = [{"role": "user", "content": prompt}]
        if chat:
            if not has_template:
                raise ValueError("this model has no chat template; pass chat=False")
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        return list(self.tokenizer.encode(prompt))

    def generate(self, prompts: str | Sequence[str | list[dict]], constraint: Any = None, *,
                 max_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                 seed: int | None = None, sampler: str = "awrs",
                 estimator: str = "recursive",
                 max_rejections: int | None = DEFAULT_MAX_REJECTIONS, weights: str = "auto",
                 chat: bool | None = None, particles: int = 1, ess_threshold: float = 0.5,
                 resampling: str = "systematic", n: int = 1,
                 trace: bool = False, pre_align: Any = None) -> list[Result]:
        """Generate one Result per prompt under ``constraint`` (any spec ``Constraint`` takes,
        or a list with one spec per prompt), all prompts and particles in one engine batch.

        The sampling parameters mean what they mean in vLLM and shape the distribution AWRS
        samples from (penalties, then temperature, min-p, top-k, top-p; see
        ``decode.processor`` for the target when truncation leaves no allowed token).
        ``sampler``: "awrs" (weighted) or "lcd" (first accepted token, no weight).
        ``estimator``: "recursive" or "geometric" (the AWRS paper's; needs
        ``max_rejections=None``). ``max_rejections``: after that many rejections in one step,
        finish the step exactly from the constraint's full mask (None: unbounded).
        ``weights``: "exact" (each step's weight is the allowed mass itself, from the
        constraint's full mask: no estimator noise; needs a constraint whose mask is cheap,
        as llguidance's are), "estimate" (AWRS's unbiased estimator, ``estimator``) or "auto"
        (exact where the mask is cheap, else the estimator); ``stats["weights"]`` says which ran.
        ``particles``: SMC particles per prompt (at least ``n``: ``n=4`` alone runs 4);
        ``ess_threshold``: resample when the effective sample size falls below this share of
        the particles; ``resampling``: systematic, multinomial, stratified or residual; ``n``:
        posterior draws per prompt (``Result.draws``); ``trace``: record the per-step ESS.
        ``seed`` makes a run repeat itself (random if None).
        ``pre_align``: True (P-Aligner with this model as the rewriter) or a
        ``tether.PreAligner``: the last user turn of each prompt is rewritten first (all
        rewrites in one batch), then answered; ``Result.pre_align`` tells what happened.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(constraint, list):
            if len(constraint) != len(prompts):
                raise ValueError(f"{len(constraint)} constraints for {len(prompts)} prompts")
            specs = constraint
        else:
            specs = [constraint] * len(prompts)
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if n < 1:
            raise ValueError("n (posterior draws) must be at least 1")
        rewrites = None
        if pre_align:
            prompts, rewrites = self._pre_align(list(prompts), pre_align, chat)
        compiled = [self.constraint(c) if c is not None else None for c in specs]
        check_weights(weights, compiled)
        settings = SMCSettings(max(particles, n), ess_threshold, resampling, n, trace)
        engine = self.engine.llm.llm_engine
        driver = SMCDriver([self.prompt_ids(p, chat) for p in prompts], compiled, settings,
                           seed=secrets.randbits(32) if seed is None else seed,
                           max_tokens=max_tokens, sampler=sampler, estimator=estimator,
                           max_rejections=max_rejections, budget_s=self.constraint_budget,
                           weights=weights,
                           sampling={"temperature": temperature, "top_p": top_p, "top_k": top_k,
                                     "min_p": min_p, "repetition_penalty": repetition_penalty,
                                     "frequency_penalty": frequency_penalty,
                                     "presence_penalty": presence_penalty})
        groups = run_sync(driver, engine)
        results = [self._group_result(g, settings) for g in groups]
        for result, rewrite in zip(results, rewrites or []):
            result.pre_align = rewrite
        return results

    def chat(self, messages: list[dict], *, tools: list[dict] | None = None,
             tool_choice: Any = None, parallel_tool_calls: bool = True,
             tool_parser: str = "hermes", tool_strict_level: str = "auto",
             chat_template: str | None = None, response_format: dict | None = None,
             max_tokens: int = 256, **kwargs: Any) -> Result:
        """Answer one conversation, with tool calls as ``tether serve`` makes them
        (``decode.tools``): the tools (OpenAI's format) and ``tool_choice`` ("auto", "required",
        ``{"type": "function", "function": {"name": ...}}``, "none") become the constraint vLLM's
        ``tool_parser`` asks for, decoded by AWRS (with ``particles``: SMC); the prompt is the
        model's chat template, or ``chat_template`` (a file or the template's text), rendered
        with the tools. ``response_format`` is OpenAI's (json_schema, json_object,
        structural_tag). Other keyword arguments are ``generate``'s.

        The Result (and each particle and draw) carries ``content`` and ``tool_calls`` (id,
        name, arguments parsed from JSON) as the parser reads the output, and its
        ``log_weight``. A malformed tool raises ``ValueError`` naming it."""
        from tether.decode.tools import plan_chat

        plan = plan_chat(self.tokenizer, messages, tools, tool_choice, parallel_tool_calls,
                         tool_parser, tool_strict_level, chat_template, response_format,
                         max_tokens)
        result = self.generate([plan.prompt_ids], plan.spec, max_tokens=max_tokens,
                               **kwargs)[0]
        for r in [result, *(result.particles or [])]:
            message = plan.read(self.tokenizer, r.token_ids)
            r.content, r.tool_calls = message["content"], message["tool_calls"]
        return result

    def _pre_align(self, prompts: list, pre_align: Any, chat: bool | None):
        """Prompts with their last user turn rewritten, and the rewrites (``decode.prealign``)."""
        from tether.alignment.prealign import PreAligner, replace_last_user_turn, user_text
        from tether.decode.prealign import align_sync, is_url

        if not isinstance(pre_align, PreAligner):
            if getattr(self, "_aligner", None) is None:
                self._aligner = PreAligner()
            pre_align = self._aligner
        texts = [user_text(p) if isinstance(p, list) else p for p in prompts]
        if any(t is None for t in texts):
            raise ValueError("pre_align needs a text user turn in every prompt")
        engine = None
        if pre_align.rewriter == "self":
            engine = self
        elif not is_url(pre_align.rewriter):  # a rewriter model: an engine of its own, once
            engine = self._rewriters.get(pre_align.rewriter)
            if engine is None:
                engine = self._rewriters[pre_align.rewriter] = LLM(pre_align.rewriter)
        rewrites = align_sync(pre_align, texts, engine, self.model_path)
        prompts = [replace_last_user_turn(p, r.text) if isinstance(p, list) else r.text
                   for p, r in zip(prompts, rewrites)]
        return prompts, rewrites

    def logprobs(self, prompt_ids: list[int], continuations: list[list[int]]) -> list[float]:
        """log p(continuation | prompt) under the model (temperature 1), one batch."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outs = self.engine.llm.generate([{"prompt_token_ids": prompt_ids + c}
                                         for c in continuations], params, use_tqdm=False)
        scores = []
        for cont, out in zip(continuations, outs):
            entries = out.prompt_logprobs[len(prompt_ids):]
            scores.append(math.fsum(e[t].logprob for t, e in zip(cont, entries)))
        return scores

    # -- results -------------------------------------------------------------------------------
    def _group_result(self, group: Group, settings: SMCSettings) -> Result:
        decode = lambda tokens: self.tokenizer.decode(tokens, skip_special_tokens=True)
        population = assemble(group, settings.draws, decode, group.constraint is not None)
        results = [Result(p.text, p.tokens, p.finish_reason, p.log_weight, p.value,
                          p.stats, p.normalized_weight) for p in population.particles]
        if settings.particles == 1:
            return results[0]
        main = results[population.choices(1)[0]]
        stats = dict(main.stats)
        if population.failure is not None:
            stats["failure"] = population.failure
        stats["population"] = {k: population.stats[k] for k in (
            "weights", "checks", "tokens", "resampling_events", "dead_particles")}
        return Result(main.text, main.token_ids, main.finish_reason, main.log_weight,
                      main.value, stats, main.normalized_weight, particles=results,
                      log_z=population.log_z, draws=[results[i] for i in population.draws],
                      ess=group.ess_trace if settings.trace else None,
                      resampling=population.resampling,
                      ancestry=[{"uid": p.uid, "parent": p.parent}
                                for p in population.particles])

    def close(self) -> None:
        for rewriter in self._rewriters.values():
            rewriter.close()
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_DEFAULT: dict[str, LLM] = {}


def generate(prompt: str, constraint: Any = None, *, model: str | None = None,
             **kwargs: Any) -> Result:
    """Generate one output for ``prompt`` with a shared engine for ``model`` (default embedded).
    Keyword arguments are ``LLM.generate``'s (``pre_align=True`` rewrites the prompt first)."""
    from tether.models import resolve

    path = resolve(model)
    if path not in _DEFAULT:
        _DEFAULT[path] = LLM(path)
    return _DEFAULT[path].generate([prompt], constraint, **kwargs)[0]
