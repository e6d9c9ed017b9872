"""The Python API: ``tether.LLM`` and ``tether.generate``.

``LLM(model)`` owns one in-process vLLM engine (``decode.engine.Engine``) with the AWRS logits
processor installed. ``LLM.generate(prompts, constraint=...)`` compiles the constraint once in
the caller (so a bad spec raises ``ConstraintError`` before anything runs), submits one engine
request per prompt carrying a ``ParticleConfig`` in ``extra_args``, and turns vLLM's outputs and
the processor's per-particle records into ``Result`` objects.
"""

from __future__ import annotations

import math
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from tether.constraints import Constraint, compile_constraint
from tether.decode.engine import Engine
from tether.decode.processor import DEFAULT_MAX_REJECTIONS, ParticleConfig
from tether.decode.records import pop_records
from tether.samplers.gumbel import mix_seed


@dataclass
class Result:
    """One generated output.

    ``finish_reason``: "stop" (the output ended where the constraint allows it: it is valid),
    "length" (``max_tokens`` reached first: the output is incomplete and not claimed valid),
    or "constraint" (every token was rejected at some step: log weight -inf).
    ``value``: the parsed output when valid (a dict for a JSON Schema, a model instance for a
    pydantic class, the text otherwise), else None.
    ``log_weight``: the sum of the AWRS step log weights (0.0 for the lcd sampler and for
    unconstrained generation).
    ``stats``: tokens, constraint checks, rejections, exact (mask-finished) steps, seconds in
    the constraint and in device operations, and the per-step log weights.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    log_weight: float = 0.0
    value: Any = None
    stats: dict = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return self.finish_reason == "stop"

    def to_dict(self) -> dict:
        value = self.value
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        return {"text": self.text, "value": value, "finish_reason": self.finish_reason,
                "log_weight": self.log_weight, "valid": self.valid,
                "stats": {k: v for k, v in self.stats.items() if k != "step_log_weights"}}


class LLM:
    """A model served by an in-process vLLM engine, with constrained generation.

    ``model``: a registered embedded model ("smollm2", "gemma3"), a local HF directory or a
    hub id; default: the embedded SmolLM2-135M-Instruct. Keyword arguments go to ``vllm.LLM``.
    """

    def __init__(self, model: str | None = None, **engine_kwargs: Any):
        self.engine = Engine(model, **engine_kwargs)
        self.model_path = self.engine.model_path
        self.tokenizer = self.engine.tokenizer

    def constraint(self, spec: Any) -> Constraint:
        """Compile ``spec`` for this model's tokenizer (cached)."""
        return compile_constraint(spec, self.model_path)

    def prompt_ids(self, prompt: str | list[dict], chat: bool | None = None) -> list[int]:
        """Token ids of a prompt; chat models get their chat template unless ``chat=False``.

        ``prompt`` may be a string (a user message when the chat template applies) or a list
        of chat messages.
        """
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
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        return list(self.tokenizer.encode(prompt))

    def sampling_params(self, *, max_tokens: int, temperature: float, top_p: float, top_k: int,
                        particle: ParticleConfig | None, **extra: Any):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                              top_k=top_k if top_k > 0 else 0,
                              extra_args=particle.to_extra_args() if particle else None,
                              **extra)

    def generate(self, prompts: str | Sequence[str | list[dict]], constraint: Any = None, *,
                 max_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, sampler: str = "awrs",
                 estimator: str = "recursive",
                 max_rejections: int | None = DEFAULT_MAX_REJECTIONS,
                 chat: bool | None = None) -> list[Result]:
        """Generate one output per prompt, under ``constraint`` (any spec ``Constraint`` takes,
        or a list with one spec per prompt), all in one engine batch.

        ``sampler``: "awrs" (weighted) or "lcd" (first accepted token, no weight).
        ``estimator``: "recursive" or "geometric" (the AWRS paper's; needs
        ``max_rejections=None``). ``max_rejections``: after that many rejections in one step,
        finish the step exactly from the constraint's full mask (None: unbounded).
        ``seed``: makes the run reproducible (random if None).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(constraint, list):
            if len(constraint) != len(prompts):
                raise ValueError(f"{len(constraint)} constraints for {len(prompts)} prompts")
            specs = constraint
        else:
            specs = [constraint] * len(prompts)
        compiled_all = [self.constraint(c) if c is not None else None for c in specs]
        seed = secrets.randbits(32) if seed is None else seed
        run = uuid.uuid4().hex[:12]
        requests, keys = [], []
        for i, (prompt, compiled) in enumerate(zip(prompts, compiled_all)):
            particle = None
            if compiled is not None:
                particle = ParticleConfig(spec=compiled.spec.to_wire(), key=f"{run}-{i}",
                                          sampler=sampler, estimator=estimator,
                                          max_rejections=max_rejections,
                                          seed=mix_seed(seed, i))
                keys.append(particle.key)
            params = self.sampling_params(max_tokens=max_tokens, temperature=temperature,
                                          top_p=top_p, top_k=top_k, particle=particle,
                                          seed=None if particle else mix_seed(seed, i))
            requests.append(({"prompt_token_ids": self.prompt_ids(prompt, chat)}, params))
        outputs = self.engine.llm.generate([r[0] for r in requests], [r[1] for r in requests],
                                           use_tqdm=False)
        records = pop_records(self.engine.llm, keys) if keys else {}
        return [self._result(out.outputs[0], compiled, records.get(f"{run}-{i}"))
                for i, (out, compiled) in enumerate(zip(outputs, compiled_all))]

    def _result(self, completion: Any, compiled: Constraint | None, record: Any) -> Result:
        token_ids = list(completion.token_ids)
        text = completion.text
        if compiled is None:
            return Result(text, token_ids, completion.finish_reason or "length")
        stats = record.summary(len(token_ids)) if record is not None else {}
        if stats.get("error"):
            raise RuntimeError(f"internal error: {stats['error']}")
        if stats.get("dead"):
            return Result(text, token_ids, "constraint", -math.inf, None, stats)
        log_weight = stats.get("log_weight", 0.0)
        # A stop token ends the output only where the processor found the constraint complete;
        # a user's stop *string* (stop_reason is a str) may cut it anywhere.
        if completion.finish_reason == "stop" and not isinstance(completion.stop_reason, str):
            return Result(text, token_ids, "stop", log_weight, compiled.parse(text), stats)
        return Result(text, token_ids, "length", log_weight, None, stats)

    def close(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_DEFAULT: dict[str, LLM] = {}


def generate(prompt: str, constraint: Any = None, *, model: str | None = None,
             **kwargs: Any) -> Result:
    """Generate one output for ``prompt`` with a shared engine for ``model`` (default embedded)."""
    from tether.models import resolve

    path = resolve(model)
    if path not in _DEFAULT:
        _DEFAULT[path] = LLM(path)
    return _DEFAULT[path].generate([prompt], constraint, **kwargs)[0]
