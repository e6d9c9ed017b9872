"""Constraints checked by llguidance: JSON Schemas, Lark grammars, and regular expressions.

llguidance compiles the spec into a grammar once; each state is an ``LLMatcher`` (a parser
position), copied with ``deep_copy`` on ``advance`` so that states are values. Checking one
token (``validate_tokens``) takes well under a microsecond; the full mask (``compute_bitmask``)
tens of microseconds.

A semantic check guards the end of the output where the grammar can be looser than the spec:
JSON outputs must validate with ``jsonschema`` (or the pydantic model), and regex outputs must
full-match with Python's ``regex`` module, before EOS is allowed. So an output that is reported
complete is valid by the same tools a user would check it with. Formats are checked the way the
schema's draft defines them: ``validator_for(schema).FORMAT_CHECKER`` (``checked_formats``
lists them). Note that ``jsonschema.FormatChecker()`` without a draft is not that: it checks
``time`` by draft 3's definition (``HH:MM:SS``, no UTC offset), which contradicts the RFC 3339
``time`` of drafts 7 and 2020-12 that llguidance's grammar (and this check) follow.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np

from tether.constraints.base import Constraint
from tether.constraints.specs import Spec
from tether.constraints.vocab import TokenVocab
from tether.errors import ConstraintError


class GrammarState:
    """A particle's position: the llguidance matcher and the bytes generated so far.

    Where the grammar forces the next bytes (a property name, a closing quote), llguidance's
    mask admits only the canonical tokenization of those bytes, while ``validate_tokens`` admits
    any token that spells a prefix of them. Checks must agree with the mask (the bounded-cost
    mode mixes both), so in such states a token is allowed only if the mask has it; the mask is
    computed once per state, when first needed. The end-of-output check is also made once per
    state (``complete``).
    """

    __slots__ = ("matcher", "data", "_forced", "complete")

    def __init__(self, matcher: Any, data: bytes):
        self.matcher = matcher
        self.data = data
        self._forced: Any = None  # None: not looked at yet; False: nothing forced; else a mask
        self.complete: bool | None = None  # None: not checked yet

    def forced_mask(self, size: int) -> np.ndarray | None:
        if self._forced is None:
            self._forced = False
            if self.matcher.compute_ff_bytes():
                self._forced = _bits_to_bool(self.matcher.compute_bitmask(), size)
        return None if self._forced is False else self._forced


def _bits_to_bool(bitmask: bytes, size: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bitmask, dtype=np.uint8), bitorder="little")[:size].astype(bool)


class GrammarConstraint(Constraint):
    engine = "llguidance"
    cheap_mask = True
    #: whether the grammar itself names special tokens (a structural tag's token formats), so
    #: that llguidance decides on them; otherwise they are never allowed
    special_tokens = False

    def __init__(self, spec: Spec, vocab: TokenVocab, matcher: Any,
                 final_check: Callable[[str], bool] | None = None):
        super().__init__(spec, vocab)
        self._template = matcher
        self._final_check = final_check
        self._eos = np.array(sorted(t for t in vocab.eos_token_ids if t < vocab.size), dtype=np.int64)

    def start(self) -> GrammarState:
        return GrammarState(self._template.deep_copy(), b"")

    def allows(self, state: GrammarState, token_id: int) -> bool:
        if token_id in self.eos_token_ids:
            return self.is_complete(state)
        if not (self.is_plain_token(token_id) or
                self.special_tokens and 0 <= token_id < self.vocab.size):
            return False
        if state.matcher.validate_tokens([token_id]) != 1:
            return False
        forced = state.forced_mask(self.vocab.size)
        return True if forced is None else bool(forced[token_id])

    def advance(self, state: GrammarState, token_id: int, check: bool = True) -> GrammarState:
        if check and not self.allows(state, token_id):
            raise ValueError(f"token {token_id} is not allowed here")
        if token_id in self.eos_token_ids:
            return state
        matcher = state.matcher.deep_copy()
        if not matcher.consume_token(token_id):
            raise ValueError(f"llguidance refused token {token_id}: {matcher.get_error()}")
        data = self.vocab.token_bytes[token_id]
        if data is None:  # a special token the grammar named: spelled as its text
            data = str(self.vocab.hf.convert_ids_to_tokens(token_id)).encode("utf-8")
        return GrammarState(matcher, state.data + data)

    def is_complete(self, state: GrammarState) -> bool:
        if not state.matcher.is_accepting():
            return False
        if state.complete is None:
            state.complete = self.end_check(state)
        return state.complete

    def end_check(self, state: GrammarState) -> bool:
        """The semantic check of an output the grammar accepts (see the module docstring)."""
        if self._final_check is None:
            return True
        try:
            text = state.data.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return self._final_check(text)

    def output_bytes(self, state: GrammarState) -> bytes:
        return state.data

    def mask(self, state: GrammarState) -> np.ndarray:
        allowed = _bits_to_bool(state.matcher.compute_bitmask(), self.vocab.size)
        if not self.special_tokens:
            allowed &= ~self.vocab.special
        elif state.forced_mask(self.vocab.size) is not None:
            # llguidance forces bytes as their canonical tokens, which may be a special token
            # that spells them; the grammar itself never reads a special token as text
            for t in np.nonzero(allowed & self.vocab.special)[0]:
                allowed[t] = state.matcher.validate_tokens([int(t)]) == 1
        if len(self._eos):
            allowed[self._eos] = self.is_complete(state)
        return allowed


def _matcher(vocab: TokenVocab, grammar: str) -> tuple[Any, str]:
    from llguidance import LLMatcher

    matcher = LLMatcher(vocab.ll, grammar, log_level=0)
    return matcher, (matcher.get_error() if matcher.is_error() else "")


def json_schema_constraint(spec: Spec, vocab: TokenVocab) -> GrammarConstraint:
    try:
        return _json_schema_constraint(spec, vocab)
    except RecursionError:
        raise ConstraintError("the JSON Schema is too deeply nested or recursive to compile") \
            from None


def _json_schema_constraint(spec: Spec, vocab: TokenVocab) -> GrammarConstraint:
    from llguidance import LLMatcher

    schema = spec.schema
    validator = schema_validator(schema)
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, defaults=_json_options(spec))
    except ValueError as e:
        raise ConstraintError(f"invalid JSON Schema: {e}") from None
    matcher, error = _matcher(vocab, grammar)
    if error:
        raise ConstraintError(f"unsupported JSON Schema: {error}")
    if spec.model is not None:
        model = spec.model

        def final_check(text: str) -> bool:
            try:
                model.model_validate_json(text)
                return True
            except (ValueError, RecursionError):
                return False
    else:
        import json

        def final_check(text: str) -> bool:
            try:
                return validator.is_valid(json.loads(text))
            except (ValueError, RecursionError):  # not JSON, or too deep to validate
                return False

    return GrammarConstraint(spec, vocab, matcher, final_check)


def schema_validator(schema: Any, where: str = "JSON Schema") -> Any:
    """The ``jsonschema`` validator of ``schema``'s own draft (2020-12 when it names none), with
    that draft's format checker (see ``checked_formats``); ``ConstraintError`` if the schema is
    invalid, naming ``where`` and the JSON pointer."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        pointer = "/" + "/".join(str(p) for p in e.path)
        prefix = "invalid JSON Schema" if where == "JSON Schema" else f"{where}: invalid schema"
        raise ConstraintError(f"{prefix} at {pointer}: {e.message}") from None
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def warm_up() -> None:
    """Import what the first JSON Schema needs: ``jsonschema``'s format checkers build a Lark
    parser when imported (about 1.4 s here), which would otherwise stall the first request
    (in an engine, every request of its batch)."""
    schema_validator({})


def checked_formats(schema: Any = None) -> list[str]:
    """The ``format`` values that the end-of-output check enforces for ``schema``'s draft
    (2020-12 when it names none): the checkers of ``jsonschema``'s validator class for that
    draft, with the format extras that tether installs."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema if schema is not None else {},
                                              default=jsonschema.Draft202012Validator)
    return sorted(cls.FORMAT_CHECKER.checkers)


def _json_options(spec: Spec) -> dict:
    # lenient: keywords llguidance does not implement are left to the final jsonschema check
    if spec.flexible_whitespace:
        return {"lenient": True}
    return {"lenient": True, "whitespace_flexible": False, "item_separator": ", ",
            "key_separator": ": "}


def lark_constraint(spec: Spec, vocab: TokenVocab) -> GrammarConstraint:
    from llguidance import LLMatcher

    matcher, error = _matcher(vocab, LLMatcher.grammar_from_lark(spec.source))
    if error:
        # llguidance reports positions as "at LINE(COLUMN):"; spell them out
        error = re.sub(r"^(?:at )?(\d+)\((\d+)\):", r"line \1, column \2:", error)
        raise ConstraintError(f"invalid Lark grammar: {error}")
    return GrammarConstraint(spec, vocab, matcher)


def regex_constraint(spec: Spec, vocab: TokenVocab, compiled: Any) -> GrammarConstraint | None:
    """llguidance's checker for a regular expression, or None if llguidance cannot express it."""
    from llguidance import LLMatcher

    matcher, error = _matcher(vocab, LLMatcher.grammar_from_regex(spec.source))
    if error:
        return None
    return GrammarConstraint(spec, vocab, matcher,
                             final_check=lambda text: compiled.fullmatch(text) is not None)
