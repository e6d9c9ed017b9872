"""Constraint specs: what a user may pass as ``constraint=...``, normalized into one ``Spec``.

Accepted forms:

* a JSON Schema, as a ``dict`` (or ``True``/``False``), as JSON text, or as ``JsonSchema(...)``;
* a pydantic model class (its JSON Schema; outputs parse back into an instance);
* ``Regex(pattern)``: a regular expression in the syntax of Python's ``regex`` module;
* ``Grammar(text)``: a Lark grammar (llguidance's Lark dialect);
* ``Choice([...])``: one of a list of literal strings;
* ``StructuralTag(tag)``: an xgrammar structural tag (tool calls in running text; a dict, JSON
  text or xgrammar model), compiled by ``tether.constraints.structural``;
* outlines output types: ``outlines.types.JsonSchema``, ``Regex``, ``CFG`` and any other outlines
  term (turned into its regular expression);
* ``Predicate(fn)`` or a bare callable: a Python predicate over the decoded text prefix;
* ``Canonical(spec)``: any of the above, spelled only with the tokenizer's own encodings
  (``tether.constraints.canonical``).

A bare string is ambiguous (a schema? a regex? a grammar?): it is accepted only where it parses
as a JSON Schema; anything else raises ``ConstraintError`` pointing at the wrapper types.

A ``Spec`` is hashable (it keys the compile cache: the constraint's content and its parse
target, so two pydantic models with the same JSON Schema are two specs) and, except for
predicates, serializable into ``SamplingParams.extra_args`` (``to_wire`` / ``from_wire``) so
that it can cross into vLLM's engine process.

Limits: a spec's text is at most ``MAX_SPEC_BYTES`` and a JSON Schema nests at most
``MAX_JSON_DEPTH`` levels of objects and arrays (real schemas stay far below: the deepest of
JSONSchemaBench's 2,387 nests 21). Past them, ``ConstraintError`` names the limit: deeper
schemas exhaust the recursion of the validators and compilers that read them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from tether.errors import ConstraintError

Kind = Literal["json_schema", "regex", "grammar", "structural_tag", "predicate"]

MAX_SPEC_BYTES = 256 * 1024
MAX_JSON_DEPTH = 64


@dataclass(frozen=True)
class Regex:
    """A regular expression that the whole output must match (Python ``regex`` syntax)."""

    pattern: str


@dataclass(frozen=True)
class Grammar:
    """A Lark grammar (start rule ``start``) that the whole output must derive."""

    text: str


@dataclass(frozen=True)
class JsonSchema:
    """A JSON Schema that the output, parsed as JSON, must validate against.

    ``whitespace``: "compact" (the default for every schema spec) writes JSON on one line with
    ", " and ": " separators and no other whitespace; "flexible" lets the model put any
    whitespace between tokens (pretty-printing), which small models tend to loop on.
    """

    schema: Any  # dict, bool, or JSON text
    whitespace: str = "compact"


@dataclass(frozen=True)
class Choice:
    """The output must be exactly one of these strings."""

    options: tuple[str, ...]

    def __init__(self, options):
        object.__setattr__(self, "options", tuple(options))


@dataclass(frozen=True)
class StructuralTag:
    """An xgrammar structural tag that the whole output must follow: what vLLM's tool parsers
    build for strict tool calls, and what clients send as ``response_format: {"type":
    "structural_tag", ...}`` or ``structured_outputs.structural_tag``. ``tag`` is a dict, JSON
    text (also the legacy ``{"structures": ..., "triggers": ...}`` form), an
    ``xgrammar.StructuralTag`` or one of its formats. See ``tether.constraints.structural``."""

    tag: Any


@dataclass(frozen=True, eq=False)
class Predicate:
    """A Python predicate over the decoded text.

    ``prefix(text)`` says whether ``text`` may still be extended into an acceptable output;
    ``complete(text)`` whether the output may end at ``text`` (defaults to ``prefix``).
    Both see whole characters only: a token that ends inside a multi-byte UTF-8 character is
    judged on the text before that character (and the bytes must be a valid UTF-8 prefix).
    """

    prefix: Callable[[str], bool]
    complete: Callable[[str], bool] | None = None


@dataclass(frozen=True)
class Canonical:
    """``spec``, with outputs restricted to canonical tokenizations: the first token and every
    adjacent pair of tokens is the tokenizer's own encoding of its text (see
    ``tether.constraints.canonical``). The target becomes the model restricted to outputs the
    spec accepts and spelled that way, which is where the model puts nearly all its mass; SMC
    then spends no particles on spellings the model almost never produces."""

    spec: Any


@dataclass(frozen=True)
class Spec:
    """A normalized constraint spec.

    ``source`` is canonical text (compact JSON for schemas, the pattern, the grammar) so that
    equal specs compare and hash equal. ``model`` is the pydantic class a schema came from (its
    instances are the parsed values); ``predicate`` holds the callables of a predicate spec.
    """

    kind: Kind
    source: str
    flexible_whitespace: bool = False  # JSON Schema only; see ``JsonSchema``
    model: type | None = None  # compared by identity: it is the parse target
    predicate: Predicate | None = field(default=None, compare=False)
    # Predicates compare by identity of the callables, via a process-local reference.
    ref: int | None = None
    canonical: bool = False  # see ``Canonical``

    @property
    def schema(self) -> Any:
        assert self.kind == "json_schema"
        return json.loads(self.source)

    def describe(self) -> str:
        text = self.source if len(self.source) < 60 else self.source[:57] + "..."
        return f"{'canonical ' if self.canonical else ''}{self.kind}:{text}"

    def to_wire(self) -> dict:
        """A JSON-serializable form for ``SamplingParams.extra_args``."""
        if self.kind == "predicate":
            # Callables cannot cross a process boundary; the engine must run in-process.
            wire = {"kind": "predicate", "ref": self.ref}
        else:
            wire = {"kind": self.kind, "source": self.source}
        if self.canonical:
            wire["canonical"] = True
        if self.flexible_whitespace:
            wire["flexible_whitespace"] = True
        if self.model is not None:
            wire["model"] = _model_key(self.model)
        return wire

    @classmethod
    def from_wire(cls, wire: dict) -> "Spec":
        spec = cls._from_wire(wire)
        return dataclasses.replace(spec, canonical=True) if wire.get("canonical") else spec

    @classmethod
    def _from_wire(cls, wire: dict) -> "Spec":
        kind = wire.get("kind")
        if kind == "predicate":
            try:
                return _PREDICATES[wire["ref"]]
            except KeyError:
                raise ConstraintError(
                    "a Python predicate constraint can only be used with the engine in the "
                    "same process (VLLM_ENABLE_V1_MULTIPROCESSING=0), as tether.LLM does"
                ) from None
        if kind not in ("json_schema", "regex", "grammar", "structural_tag") or \
                not isinstance(wire.get("source"), str):
            raise ConstraintError(f"malformed constraint spec {wire!r}")
        return cls(kind, wire["source"], bool(wire.get("flexible_whitespace", False)),
                   model=_MODELS.get(wire.get("model")))


_PREDICATES: dict[int, Spec] = {}
_PREDICATE_REFS: dict[tuple, int] = {}
_MODELS: dict[str, type] = {}  # wire key -> pydantic class (this process's)
_MODEL_KEYS: dict[type, str] = {}
_ref_counter = itertools.count(1)
_ref_lock = threading.Lock()


def _model_key(model: type) -> str:
    """A process-local key naming one pydantic class (two classes of the same name differ)."""
    with _ref_lock:
        key = _MODEL_KEYS.get(model)
        if key is None:
            key = f"{model.__module__}.{model.__qualname__}#{next(_ref_counter)}"
            _MODEL_KEYS[model], _MODELS[key] = key, model
        return key


def json_depth(value: Any) -> int:
    """Nesting depth of objects and arrays in a JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _check_size(kind: str, text: str) -> None:
    size = len(text.encode("utf-8", errors="replace"))
    if size > MAX_SPEC_BYTES:
        raise ConstraintError(f"the {kind} is {size:,} bytes; the limit is {MAX_SPEC_BYTES:,}")


def _schema_spec(schema: Any, model: type | None = None, whitespace: str = "compact") -> Spec:
    if whitespace not in ("compact", "flexible"):
        raise ConstraintError(f"whitespace must be 'compact' or 'flexible', not {whitespace!r}")
    if isinstance(schema, str):
        _check_size("JSON Schema", schema)
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ConstraintError(f"the JSON Schema is not valid JSON: {e}") from None
        except RecursionError:
            raise ConstraintError(f"the JSON Schema nests deeper than {MAX_JSON_DEPTH} "
                                  "levels (the limit)") from None
    if not isinstance(schema, (dict, bool)):
        raise ConstraintError(
            f"a JSON Schema must be an object or a boolean, got {type(schema).__name__}")
    depth = json_depth(schema)
    if depth > MAX_JSON_DEPTH:
        raise ConstraintError(f"the JSON Schema nests more than {MAX_JSON_DEPTH} levels of "
                              "objects and arrays (the limit)")
    # Key order is kept: it is the order in which properties are generated.
    try:
        source = json.dumps(schema, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise ConstraintError(f"the JSON Schema is not JSON data: {e}") from None
    _check_size("JSON Schema", source)
    return Spec("json_schema", source, flexible_whitespace=whitespace == "flexible",
                model=model)


def _structural_spec(tag: Any) -> Spec:
    from tether.constraints.structural import canonical_tag

    if isinstance(tag, str):
        _check_size("structural tag", tag)
    source = canonical_tag(tag)
    _check_size("structural tag", source)
    return Spec("structural_tag", source)


def _choice_grammar(options: tuple[str, ...]) -> str:
    if not options or not all(isinstance(o, str) for o in options):
        raise ConstraintError("a choice needs a non-empty list of strings")
    return "start: " + " | ".join(json.dumps(o) for o in options) + "\n"


def normalize(spec: Any) -> Spec:
    """Turn any accepted constraint form into a ``Spec`` (see the module docstring)."""
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, Canonical):
        return dataclasses.replace(normalize(spec.spec), canonical=True)
    if isinstance(spec, JsonSchema):
        return _schema_spec(spec.schema, whitespace=spec.whitespace)
    if isinstance(spec, Regex):
        if not isinstance(spec.pattern, str):
            raise ConstraintError("Regex(pattern) needs a string pattern")
        _check_size("regular expression", spec.pattern)
        return Spec("regex", spec.pattern)
    if isinstance(spec, Grammar):
        if not isinstance(spec.text, str) or not spec.text.strip():
            raise ConstraintError("Grammar(text) needs the text of a Lark grammar")
        _check_size("grammar", spec.text)
        return Spec("grammar", spec.text)
    if isinstance(spec, Choice):
        grammar = _choice_grammar(spec.options)
        _check_size("choice list", grammar)
        return Spec("grammar", grammar)
    if isinstance(spec, StructuralTag) or type(spec).__module__.startswith("xgrammar."):
        return _structural_spec(spec.tag if isinstance(spec, StructuralTag) else spec)
    if isinstance(spec, (dict, bool)):
        return _schema_spec(spec)
    if isinstance(spec, str):
        _check_size("JSON Schema", spec)
        try:
            parsed, problem = json.loads(spec), "it is JSON but not an object"
        except json.JSONDecodeError as e:
            parsed, problem = None, f"it did not parse as JSON ({e})"
        except RecursionError:
            raise ConstraintError(f"the JSON Schema nests deeper than {MAX_JSON_DEPTH} "
                                  "levels (the limit)") from None
        if isinstance(parsed, (dict, bool)):
            return _schema_spec(parsed)
        raise ConstraintError(
            f"a bare string constraint is taken only as a JSON Schema, and {problem}; wrap "
            "it: tether.Regex(pattern) for a regular expression, tether.Grammar(text) for a Lark "
            "grammar, tether.JsonSchema(schema) for a schema")
    if isinstance(spec, type):
        try:
            from pydantic import BaseModel
        except ImportError:  # pragma: no cover - pydantic is a dependency
            BaseModel = None
        if BaseModel is not None and issubclass(spec, BaseModel):
            return _schema_spec(spec.model_json_schema(), model=spec)
    outlines_spec = _from_outlines(spec)
    if outlines_spec is not None:
        return outlines_spec
    if isinstance(spec, Predicate) or callable(spec):
        pred = spec if isinstance(spec, Predicate) else Predicate(spec)
        identity = (pred.prefix, pred.complete)  # the same callables give the same spec
        with _ref_lock:
            if identity not in _PREDICATE_REFS:
                ref = next(_ref_counter)
                _PREDICATE_REFS[identity] = ref
                _PREDICATES[ref] = Spec(
                    "predicate", getattr(pred.prefix, "__qualname__", "predicate"),
                    predicate=pred, ref=ref)
            return _PREDICATES[_PREDICATE_REFS[identity]]
    raise ConstraintError(
        f"unsupported constraint of type {type(spec).__name__}; use a JSON Schema (dict), a "
        "pydantic model class, tether.Regex, tether.Grammar, tether.Choice, "
        "tether.StructuralTag, an outlines type or a predicate (any of them inside "
        "tether.Canonical)")


def _from_outlines(spec: Any) -> Spec | None:
    module = type(spec).__module__ or ""
    if not module.startswith("outlines"):
        return None
    from outlines.types import dsl

    if isinstance(spec, dsl.JsonSchema):
        return _schema_spec(spec.schema)
    if isinstance(spec, dsl.CFG):
        return normalize(Grammar(spec.definition))
    if isinstance(spec, dsl.Regex):
        return normalize(Regex(spec.pattern))
    if isinstance(spec, dsl.Term):
        return normalize(Regex(dsl.to_regex(spec)))
    return None
