"""Request policy of ``tether serve``: which requests AWRS decodes, with which options, within
which limits, and what is refused (an HTTP 400 naming the parameter).

Options. ``Options`` is one pydantic model for the server's defaults (``--sampler``,
``--particles``, ``--ess-threshold``, ``--awrs-max-rejections``, ``--awrs-weights``,
``--awrs-canonical``, validated at start-up) and a request's overrides (``vllm_xargs`` keys ``tether_sampler``,
``tether_particles``, ``tether_ess_threshold``, ``tether_max_rejections``,
``tether_weights``, ``tether_canonical``, validated per request, strictly typed).
``Limits`` holds what only the operator sets (``--max-particles``, ``--constraint-budget``).

Which requests. With the ``awrs`` sampler, a request whose sampling parameters carry a
constraint (``structured_outputs`` json, json_object, regex, choice, grammar, structural_tag;
the OpenAI ``response_format`` becomes one of these) is decoded by AWRS; the rest pass to vLLM
untouched.

Nothing a request asks for is dropped:

* honoured: the request's other ``vllm_xargs`` (given to every particle's request, where the
  operator's own logits processors read them), ``disable_additional_properties`` (every
  object schema without ``additionalProperties`` gets ``false``), ``disable_any_whitespace``
  (AWRS writes compact JSON anyway), ``skip_special_tokens`` (the output text is decoded with
  it), the sampling parameters AWRS shapes its distribution with (penalties, temperature,
  min-p, top-k, top-p, logit bias, bad words, allowed tokens, min tokens, stop token ids);
* refused with a 400 naming it: ``logprobs``, ``prompt_logprobs`` (AWRS forces the tokens it
  decides), ``stop`` strings (the constraint decides where an output ends),
  ``whitespace_pattern``, multimodal inputs and prompt embeddings, and
  AWRS requests on endpoints other than ``SERVED_PATHS``;
* tools (``check_tools``, before vLLM builds its structural tag from them): a function tool
  whose ``parameters`` are not a valid JSON Schema (its draft's metaschema, tether's size and
  depth limits) is refused with a 400 naming the entry (``tools[i]``) and the function, strict
  or not, where the awrs sampler applies.

Limits, per HTTP request: a request's particles (``max(n, tether_particles)`` for each of its
prompts, summed over every prompt of a ``/v1/completions`` or batch request) may not exceed
``--max-particles`` (``RequestScope.reserve``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from tether.decode.processor import DEFAULT_BUDGET_S, DEFAULT_MAX_REJECTIONS
from tether.errors import ConstraintError

DEFAULT_MAX_PARTICLES = 64
# the endpoints whose responses carry AWRS's results (the ``tether`` field)
SERVED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/chat/completions/batch",
                "/v1/responses")
CONSTRAINT_FIELDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


class RequestError(ConstraintError):
    """A bad request parameter (answered with 400 naming ``parameter``)."""

    def __init__(self, message: str, parameter: str | None = None):
        super().__init__(message)
        self.parameter = parameter


class Options(BaseModel):
    """What a request may choose (``vllm_xargs: {"tether_<name>": ...}``) and the server
    defaults it (``--<name>``). ``max_rejections`` 0: unbounded rejection sampling."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    sampler: Literal["awrs", "default"] = "default"
    particles: int = Field(1, ge=1)
    ess_threshold: float = Field(0.5, ge=0.0, le=1.0, allow_inf_nan=False)
    max_rejections: int = Field(DEFAULT_MAX_REJECTIONS, ge=0, le=1 << 20)
    weights: Literal["auto", "exact", "estimate"] = "auto"
    canonical: bool = False  # tether.Canonical around the request's constraint

    @field_validator("canonical", mode="before")
    @classmethod
    def _flag(cls, value: Any) -> Any:
        # vLLM's vllm_xargs turns a JSON true/false into 1/0
        return bool(value) if type(value) is int and value in (0, 1) else value

    def override(self, xargs: dict[str, Any]) -> "Options":
        """These options with a request's ``tether_*`` overrides (``RequestError`` naming the
        first bad one)."""
        update = {k[len("tether_"):]: v for k, v in xargs.items()}
        try:
            return Options.model_validate(dict(self.model_dump(), **update))
        except ValidationError as e:
            err = e.errors()[0]
            name = f"tether_{err['loc'][0]}" if err["loc"] else "vllm_xargs"
            shown = "" if err["type"] == "extra_forbidden" else f", got {err.get('input')!r}"
            raise RequestError(f"vllm_xargs.{name}: {err['msg']}{shown}", name) from None


class Limits(BaseModel):
    """What only the operator sets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_particles: int = Field(DEFAULT_MAX_PARTICLES, ge=1)
    constraint_budget: float = Field(DEFAULT_BUDGET_S, gt=0, allow_inf_nan=False)


class ServerOptions(BaseModel):
    """Every tether option of ``tether serve``, validated once at start-up."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    options: Options = Options()
    limits: Limits = Limits()

    @model_validator(mode="after")
    def _particles_fit(self) -> "ServerOptions":
        if self.options.particles > self.limits.max_particles:
            raise ValueError(f"--particles ({self.options.particles}) exceeds --max-particles "
                             f"({self.limits.max_particles})")
        return self


@dataclass
class RequestScope:
    """What one HTTP request holds while it is served (``decode.http`` sets it per request):
    its path, the particles it reserved, and the ``tether`` fields of its engine requests
    (keyed by the request id vLLM gave each ``generate`` call: one per prompt)."""

    path: str
    max_particles: int
    particles: int = 0
    fields: dict[str, dict] = field(default_factory=dict)
    rewrite: Any = None  # the pre-alignment of its last user turn (alignment.prealign.Rewrite)

    def reserve(self, particles: int) -> None:
        total = self.particles + particles
        if total > self.max_particles:
            raise RequestError(
                f"this request asks for {total} particles in all (n or tether_particles per "
                f"prompt, summed over its prompts); the server's --max-particles is "
                f"{self.max_particles}", "tether_particles")
        self.particles = total


@dataclass
class Plan:
    """How AWRS decodes one ``generate`` call."""

    spec: Any  # the tether spec of the request's constraint
    options: Options
    particles: int  # max(particles, n)
    extra_args: dict  # the request's other vllm_xargs


def plan(params: Any, prompt: Any, defaults: Options, limits: Limits,
         scope: RequestScope | None) -> Plan | None:
    """The plan for one ``generate`` call, or None when vLLM decodes it as it is."""
    extra = dict(params.extra_args or {})
    xargs = {k: extra.pop(k) for k in list(extra) if k.startswith("tether_")}
    options = defaults.override({k: v for k, v in xargs.items() if k != "tether_tca"})
    so = params.structured_outputs
    constrained = so is not None and any(getattr(so, f, None) not in (None, False)
                                         for f in CONSTRAINT_FIELDS)
    if options.sampler != "awrs" or not constrained:
        asked = sorted(set(xargs) - {"tether_sampler", "tether_tca"})
        if asked:
            raise RequestError(f"{', '.join(asked)}: tether options need the awrs sampler and a "
                               "constraint", asked[0])
        return None
    if scope is not None and scope.path not in SERVED_PATHS:
        raise RequestError(f"the awrs sampler serves {', '.join(SERVED_PATHS)}, not "
                           f"{scope.path}; send vllm_xargs.tether_sampler 'default' for vLLM's "
                           "structured outputs", "tether_sampler")
    limit = limits.max_particles
    if not 1 <= params.n <= limit:
        raise RequestError(f"n must be between 1 and {limit} (the server's --max-particles), "
                           f"got {params.n}", "n")
    if options.particles > limit:
        raise RequestError(f"vllm_xargs.tether_particles must be between 1 and {limit} (the "
                           f"server's --max-particles), got {options.particles}",
                           "tether_particles")
    _refuse_unsupported(params, prompt, so)
    particles = max(options.particles, params.n)
    if scope is not None:
        scope.reserve(particles)
    if "tether_tca" in xargs:
        extra["tether_tca"] = xargs["tether_tca"]
    spec = spec_from_structured_outputs(so)
    if options.canonical:
        from tether import Canonical

        spec = Canonical(spec)
    return Plan(spec, options, particles, extra)


def check_tools(body: Any, defaults: Options) -> None:
    """Refuse (``RequestError``, parameter ``tools``) the first function tool of a chat or
    Responses request body whose ``parameters`` are not a valid JSON Schema, where the awrs
    sampler applies (the server's, or the request's ``vllm_xargs.tether_sampler``). Entries
    vLLM's request model refuses itself (no name, parameters that are not an object) are left
    to it: it names them too."""
    from tether import JsonSchema
    from tether.constraints.grammar import schema_validator
    from tether.constraints.specs import normalize

    if not isinstance(body, dict) or not isinstance(body.get("tools"), list):
        return
    xargs = body.get("vllm_xargs")
    sampler = xargs.get("tether_sampler") if isinstance(xargs, dict) else None
    if (sampler or defaults.sampler) != "awrs" or body.get("tool_choice") == "none":
        return
    for i, tool in enumerate(body["tools"]):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            continue
        function = tool.get("function", tool)  # chat: {"function": {...}}; Responses: flat
        if not isinstance(function, dict) or not isinstance(function.get("parameters"), dict):
            continue
        where = "function." if "function" in tool else ""
        name = f"tools[{i}].{where}parameters (function {function.get('name')!r})"
        try:
            normalize(JsonSchema(function["parameters"]))
            schema_validator(function["parameters"], name)
        except ConstraintError as e:
            message = str(e) if str(e).startswith(name) else f"{name}: {e}"
            raise RequestError(message, "tools") from None


def _refuse_unsupported(params: Any, prompt: Any, so: Any) -> None:
    for name, value in (("logprobs", params.logprobs),
                        ("prompt_logprobs", params.prompt_logprobs)):
        if value is not None:
            raise RequestError(f"{name} is not supported with the awrs sampler (it forces the "
                               "tokens it decides); send vllm_xargs.tether_sampler: 'default' "
                               "for vLLM's structured outputs", name)
    if params.stop:
        raise RequestError("stop strings are not supported with the awrs sampler: the "
                           "constraint decides where the output ends (stop_token_ids are, and "
                           "end the output where the constraint allows)", "stop")
    if so.whitespace_pattern is not None:
        raise RequestError("whitespace_pattern is not supported with the awrs sampler (it "
                           "writes compact JSON)", "whitespace_pattern")
    kind = prompt.get("type", "token") if isinstance(prompt, dict) else None
    if kind != "token" or "prompt_token_ids" not in prompt:
        name = "prompt_embeds" if kind == "embeds" else "messages"
        raise RequestError(f"the awrs sampler takes text or token prompts only, not {kind} "
                           "inputs (images, audio, video, prompt embeddings)", name)


def spec_from_structured_outputs(so: Any) -> Any:
    """vLLM's ``StructuredOutputsParams`` -> a tether spec (None if it carries no constraint)."""
    from tether import Choice, Grammar, JsonSchema, Regex, StructuralTag

    if so is None:
        return None
    if so.structural_tag is not None:
        return StructuralTag(so.structural_tag)  # what llguidance cannot express is refused
    if so.json is not None:
        schema = so.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except (ValueError, RecursionError):
                return JsonSchema(so.json)  # normalize() names the problem
        if so.disable_additional_properties:
            schema = closed_objects(schema)
        return JsonSchema(schema)
    if so.json_object:
        return JsonSchema({"type": "object"})
    if so.regex is not None:
        return Regex(so.regex)
    if so.choice is not None:
        return Choice(so.choice)
    if so.grammar is not None:
        from llguidance.gbnf_to_lark import any_to_lark

        try:
            return Grammar(any_to_lark(so.grammar))
        except Exception as e:
            raise ConstraintError(f"invalid grammar: {e}") from None
    return None


# JSON Schema keywords whose value is a schema, a list of schemas, or a map of names to schemas
_ONE = ("additionalProperties", "additionalItems", "items", "contains", "not", "if", "then",
        "else", "propertyNames", "unevaluatedItems", "unevaluatedProperties")
_MANY = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_NAMED = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed_objects(schema: Any, depth: int = 0) -> Any:
    """``schema`` with ``"additionalProperties": false`` on every object schema that does not
    set it (vLLM's ``disable_additional_properties``); keyword by keyword, so that a property
    named like a keyword is never mistaken for one."""
    if not isinstance(schema, dict) or depth > 64:  # deeper: normalize() refuses it anyway
        return schema
    out = dict(schema)
    for key in _ONE:
        if isinstance(out.get(key), dict):
            out[key] = closed_objects(out[key], depth + 1)
    for key in _MANY:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(s, depth + 1) for s in out[key]]
    for key in _NAMED:
        if isinstance(out.get(key), dict):
            out[key] = {k: closed_objects(s, depth + 1) for k, s in out[key].items()}
    is_object = out.get("type") == "object" or (isinstance(out.get("type"), list) and
                                                "object" in out["type"]) or "properties" in out
    if is_object and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out
