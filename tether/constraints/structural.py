"""Structural tags: xgrammar's description of tool calls in running text, as ONE llguidance grammar.

vLLM 0.32 makes tool calls strict with *structural tags*: its tool parsers build an xgrammar
``StructuralTag`` per request, and clients may send one (``response_format: {"type":
"structural_tag", "format": {...}}``, or the JSON text ``structured_outputs.structural_tag``,
also in the legacy ``{"structures": [...], "triggers": [...]}`` form). ``compile_structural_tag``
turns any of them into a single Lark grammar in llguidance's dialect whose language is the one
xgrammar compiles (``xgrammar.Grammar.from_structural_tag``), up to the differences listed
below, or refuses it with a ``ConstraintError`` that names the format (its path in the tag,
``format.tags[2].content``) and says why.

How the formats translate:

* Regular formats (``const_string``, ``regex``, ``any_text``, and ``tag``, ``sequence``, ``or``,
  ``optional``, ``plus``, ``star``, ``repeat``, ``tags_with_separator`` of regular formats)
  become regular expressions, and adjacent regular pieces of a sequence are fused into ONE
  lexeme. llguidance's lexer takes the longest match of each lexeme, so fusing is what makes a
  piece that could still grow (``[0-9]+`` then ``"x"``; free text then a closing tag) split
  where xgrammar's character-level parser splits it.
* ``any_text``: text holding none of its ``excludes`` nor the end strings of the nearest
  enclosing ``tag`` (xgrammar's automatic end detection): ``/(?s:.*)/ & ~/(?s:.*)(E1|E2)(?s:.*)/``.
  ``max_chars`` bounds it (``(?s:.){0,n}``: code points, as xgrammar counts).
* ``triggered_tags`` and ``dispatch`` (xgrammar's TagDispatch): free text up to the FIRST
  occurrence of a trigger is one lexeme, ``(text T_i) & ~(text (T_1|...|T_n) .+) & ~(text E
  text)``, which ends exactly where the trigger completes: text between tags costs one lexer
  step per byte and one grammar check per token. The trigger then commits to one of its tags
  (the rest of its ``begin``, its content, its ``end``). Free text after the last tag holds no
  trigger and no excluded string. ``at_least_one`` starts with a whole tag (no text before it);
  ``stop_after_first`` allows one dispatch only; both together: exactly one tag.
* ``json_schema`` (style ``json``): ``%json`` with xgrammar's settings: any run of ``[ \\n\\r\\t]``
  between JSON tokens, none before or after the value; and xgrammar's strict mode
  (``xgrammar_strict``): an object schema that lists ``properties`` admits no other key unless
  it says so. Keywords llguidance does not implement are left to the end-of-output check: each
  JSON value is captured (``json_<k>[capture]``) and, before EOS is allowed, every captured
  value must validate with ``jsonschema`` under its schema's draft, formats included, as
  tether's JSON constraints do.
* Strings of the tag (constants, begins, ends, separators, triggers) that spell a special
  token's text (``<|tool_calls_section_begin|>`` in Kimi's tokenizer) admit that token too, as
  xgrammar does, which reads special tokens as their text.
* ``token``: ``<[id]>`` (a string is looked up as xgrammar does: the first id whose text it
  is); ``exclude_token``: ``<[^ids]>``; ``any_tokens``: ``<[^ids]>*`` (``max_tokens``:
  ``{0,n}``); ``token_triggered_tags`` and ``token_dispatch``: as their text versions, at token
  level. EOS never matches a token range: it ends the output.
* ``grammar``: xgrammar's EBNF, converted by llguidance's GBNF converter, as a sub-grammar.
* ``regex``: xgrammar's dialect (``.`` matches newlines, ``\\d \\w \\s`` are xgrammar's ASCII
  classes, ``^`` and ``$`` are ignored, lazy quantifiers are plain ones), rewritten for
  llguidance (``xgrammar_regex``).

Refused (``ConstraintError``), as llguidance cannot express them: ``json_schema`` in an XML
``style`` (``qwen_xml``, ``glm_xml``, ``minimax_xml``, ... and the deprecated
``qwen_xml_parameter``), with ``any_order``, ``excludes`` or ``max_whitespace_cnt``;
``any_text.max_tokens``; ``json_schema: false``; token strings missing from the vocabulary,
token ids out of range, EOS as a token or trigger; regex features xgrammar refuses too
(backreferences, lookarounds, word boundaries, ``\\p{..}``, group flags); EBNF the converter
cannot read.

Where tether and xgrammar differ on purpose (each checked in ``tests/test_structural.py``):
special tokens are text to xgrammar (with SmolLM2's or Gemma 3's tokenizer it marks none as
special) but only the strings of the tag and token formats admit them here, never free text or
JSON; text is UTF-8 (xgrammar's free text admits a lone continuation byte); where bytes are
forced, only their canonical tokenization is admitted (``GrammarState``); llguidance's JSON
refuses U+007F, ``\\/`` and ``\\u`` escapes of printable characters, and admits ``-0`` as an
integer and JSON whitespace between two JSON values that follow each other directly; text
that could still grow (``any_text``, ``[0-9]+``) directly before a JSON value or a sub-grammar
keeps its longest match (llguidance's lexer), where xgrammar may split it; a
``date`` format refuses impossible dates already in the grammar; and the end-of-output
``jsonschema`` check enforces every keyword of the schema's draft. The JSON check reads
llguidance's captures, which are also made on parse paths that later die: where an ``or`` lets
two ``json_schema`` alternatives parse the same text, that text must validate against both.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from tether.constraints.grammar import GrammarConstraint, GrammarState, schema_validator
from tether.constraints.specs import MAX_JSON_DEPTH, Spec, json_depth
from tether.constraints.vocab import TokenVocab
from tether.errors import ConstraintError

# xgrammar's JSON whitespace, as an llguidance JSON whitespace pattern
_JSON_WS = "[ \\n\\r\\t]*"
_ANY = "/(?s:.*)/"  # any UTF-8 text, as a lexeme expression
_EMPTY = '""'


def parse_structural_tag(tag: Any) -> Any:
    """``tag`` (a dict, JSON text, or an xgrammar model: a ``StructuralTag`` or one of its
    formats) as a validated ``xgrammar.StructuralTag``. The legacy ``{"structures": [{"begin",
    "schema", "end"}], "triggers": [...]}`` form becomes its ``triggered_tags`` equivalent."""
    from pydantic import BaseModel, ValidationError
    from xgrammar.structural_tag import StructuralTag

    if isinstance(tag, StructuralTag):
        return tag
    if isinstance(tag, BaseModel) and type(tag).__module__.startswith("xgrammar"):
        tag = {"type": "structural_tag", "format": tag.model_dump()}
    if isinstance(tag, str):
        try:
            tag = json.loads(tag)
        except json.JSONDecodeError as e:
            raise ConstraintError(f"the structural tag is not valid JSON: {e}") from None
        except RecursionError:
            raise ConstraintError("the structural tag nests too deeply") from None
    if not isinstance(tag, dict):
        raise ConstraintError(
            f"a structural tag must be an object, got {type(tag).__name__}")
    if json_depth(tag) > 2 * MAX_JSON_DEPTH:
        raise ConstraintError(f"the structural tag nests more than {2 * MAX_JSON_DEPTH} levels")
    if "structures" in tag:
        tag = _from_legacy(tag)
    elif tag.get("type") != "structural_tag":
        tag = {"type": "structural_tag", "format": tag}  # a bare format
    try:
        return StructuralTag.model_validate(tag)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConstraintError(f"invalid structural tag at {where}: {first['msg']}") from None


def _from_legacy(tag: dict) -> dict:
    structures, triggers = tag.get("structures"), tag.get("triggers")
    if not isinstance(structures, list) or not isinstance(triggers, list):
        raise ConstraintError("a legacy structural tag needs a list of structures and a list "
                              "of triggers")
    tags = []
    for i, s in enumerate(structures):
        if not isinstance(s, dict) or s.get("schema") is None:
            raise ConstraintError(f"structures[{i}] needs begin, schema and end")
        schema = s["schema"]
        if isinstance(schema, str):  # xgrammar's legacy items also take the schema as text
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ConstraintError(f"structures[{i}].schema is not valid JSON: {e}") from None
        tags.append({"type": "tag", "begin": s.get("begin"), "end": s.get("end"),
                     "content": {"type": "json_schema", "json_schema": schema}})
    return {"type": "structural_tag",
            "format": {"type": "triggered_tags", "triggers": triggers, "tags": tags}}


def canonical_tag(tag: Any) -> str:
    """The canonical JSON text of a structural tag (equal tags give equal text; defaults
    spelled out, key order kept: it is the order JSON properties are generated in)."""
    return parse_structural_tag(tag).model_dump_json()


@dataclass(frozen=True)
class CompiledTag:
    """A structural tag compiled for one tokenizer.

    ``grammar``: what ``llguidance.LLMatcher`` takes; ``lark``: its main Lark grammar (for
    reading); ``schemas``: capture name -> the JSON Schema (xgrammar's strict reading) that each
    captured value must validate against."""

    grammar: str
    lark: str
    schemas: dict


def compile_structural_tag(tag: Any, vocab: TokenVocab) -> CompiledTag:
    """Translate a structural tag into one llguidance grammar for ``vocab`` (see the module
    docstring); ``ConstraintError`` names what cannot be translated."""
    parsed = parse_structural_tag(tag)
    compiler = _Compiler(vocab)
    try:
        start = compiler.render(compiler.visit(parsed.format, "format", None))
    except RecursionError:
        raise ConstraintError("the structural tag nests too deeply to compile") from None
    lines = ["%llguidance {}", f"start: {start}"] + compiler.lines
    lines += [f"{name}: {expr}" for expr, name in compiler.terminals.items()]
    lark = "\n".join(lines) + "\n"
    if compiler.subgrammars:
        grammar = json.dumps({"grammars": [{"lark_grammar": lark}] + compiler.subgrammars})
    else:
        grammar = lark
    return CompiledTag(grammar, lark, dict(compiler.schemas))


# -- the translation --------------------------------------------------------------------------

@dataclass(frozen=True)
class _Piece:
    """A translated format. A regular piece is a lexeme expression (``expr``), fused with its
    regular neighbours into one lexeme; any other is a rule: an ``atom`` (``expr``: a ``%json``
    rule, a token, a sub-grammar) or a ``seq``/``alt``/``rep`` of ``parts``, rendered into rule
    text only once the whole tag is translated (so that pieces built and dropped leave no
    trace in the grammar)."""

    regular: bool
    expr: str = ""
    op: str = "atom"
    parts: tuple = ()


_NOTHING = _Piece(True, _EMPTY)


def _regular(expr: str) -> _Piece:
    return _Piece(True, expr)


def _atom(expr: str) -> _Piece:
    return _Piece(False, expr)


def _lit(text: str) -> str:
    return json.dumps(text)  # a Lark string literal (JSON escapes, which llguidance reads)


def _literal(text: str) -> _Piece:
    return _regular(_lit(text)) if text else _NOTHING


def _one_of(strings) -> str:
    return "(" + " | ".join(_lit(s) for s in strings) + ")"


def _free_text(excludes) -> str:
    """Text in which none of ``excludes`` occurs."""
    if not excludes:
        return _ANY
    return f"({_ANY} & ~({_ANY} {_one_of(excludes)} {_ANY}))"


def _free_text_until(trigger: str, triggers, excludes) -> str:
    """Text that ends with the first completed occurrence of any trigger, that trigger being
    ``trigger``, and holds none of ``excludes`` (xgrammar scans the trigger's own characters as
    free text until it completes, so an excluded string may not overlap it either)."""
    parts = [f"({_ANY} {_lit(trigger)})", f"~({_ANY} {_one_of(triggers)} /(?s:.+)/)"]
    if excludes:
        parts.append(f"~({_ANY} {_one_of(excludes)} {_ANY})")
    return "(" + " & ".join(parts) + ")"


def _group(exprs: list[str], sep: str = " ") -> str:
    return exprs[0] if len(exprs) == 1 else "(" + sep.join(exprs) + ")"


class _Compiler:
    def __init__(self, vocab: TokenVocab):
        self.vocab = vocab
        self.terminals: dict[str, str] = {}  # lexeme expression -> terminal name
        self.lines: list[str] = []  # rule definitions other than start
        self.schemas: dict[str, Any] = {}  # capture name -> schema
        self._json_names: dict[str, str] = {}  # schema text -> capture name
        self.subgrammars: list[dict] = []
        self._eos = sorted(t for t in vocab.eos_token_ids if t < vocab.size)

    def render(self, piece: _Piece) -> str:
        """Rule text of ``piece``; each regular piece becomes a named lexeme."""
        if piece.regular:
            if piece.expr == _EMPTY:
                return _EMPTY
            name = self.terminals.get(piece.expr)
            if name is None:
                name = self.terminals[piece.expr] = f"T{len(self.terminals)}"
            return name
        if piece.op == "atom":
            return piece.expr
        if piece.op == "rep":
            return f"({self.render(piece.parts[0])}){piece.expr}"
        return _group([self.render(p) for p in piece.parts], " | " if piece.op == "alt" else " ")

    # -- combinators -------------------------------------------------------------------------
    @staticmethod
    def seq(pieces) -> _Piece:
        flat = []
        for piece in pieces:
            flat.extend(piece.parts if piece.op == "seq" else (piece,))
        out, run = [], []
        for piece in flat:
            if piece.regular:
                if piece.expr != _EMPTY:
                    run.append(piece.expr)
                continue
            if run:
                out.append(_regular(_group(run)))
                run = []
            out.append(piece)
        if run:
            out.append(_regular(_group(run)))
        if len(out) <= 1:
            return out[0] if out else _NOTHING
        return _Piece(False, op="seq", parts=tuple(out))

    @staticmethod
    def alt(pieces) -> _Piece:
        pieces = list(dict.fromkeys(pieces))
        if len(pieces) == 1:
            return pieces[0]
        if all(p.regular for p in pieces):
            return _regular("(" + " | ".join(p.expr for p in pieces) + ")")
        return _Piece(False, op="alt", parts=tuple(pieces))

    @staticmethod
    def repeat(piece: _Piece, low: int, high: int | None) -> _Piece:
        if piece.expr == _EMPTY and piece.regular or high == 0:
            return _NOTHING
        if (low, high) == (0, 1):
            op = "?"
        elif (low, high) == (0, None):
            op = "*"
        elif (low, high) == (1, None):
            op = "+"
        elif low == high:
            op = f"{{{low}}}"
        else:
            op = f"{{{low},{'' if high is None else high}}}"
        if piece.regular:
            return _regular(f"({piece.expr}){op}")
        return _Piece(False, op, op="rep", parts=(piece,))

    def literal(self, text: str) -> _Piece:
        """A string of the tag (a constant, a begin, an end, a separator, a trigger). Where it
        spells a special token (``<|tool_calls_section_begin|>`` in Kimi's tokenizer), the model
        may write that token or the characters: xgrammar reads a special token as its text."""
        pieces, at = [], 0
        for found in _special_texts(self.vocab)[1].finditer(text) if text else ():
            pieces.append(_literal(text[at:found.start()]))
            token = _special_texts(self.vocab)[0][found.group()]
            pieces.append(self.alt([_atom(f"<[{token}]>"), _literal(found.group())]))
            at = found.end()
        pieces.append(_literal(text[at:]))
        return self.seq(pieces)

    def free_until(self, trigger: str, triggers, excludes) -> _Piece:
        """Free text up to and including ``trigger`` (see ``_free_text_until``); a trigger that
        opens with a special token's text may also open with that token."""
        steps = [_regular(_free_text_until(trigger, triggers, excludes))]
        texts, pattern = _special_texts(self.vocab)
        found = pattern.match(trigger)
        if found:
            steps.append(self.seq([_regular(_free_text(list(triggers) + list(excludes))),
                                   _atom(f"<[{texts[found.group()]}]>"),
                                   self.literal(trigger[found.end():])]))
        return self.alt(steps)

    # -- formats -----------------------------------------------------------------------------
    def visit(self, fmt: Any, path: str, end: Any) -> _Piece:
        """Translate ``fmt`` (at ``path`` in the tag); ``end`` is the nearest enclosing tag's
        end (a list of strings, or a token format, or None at the top)."""
        method = getattr(self, "_" + fmt.type, None)
        if method is None:  # pragma: no cover - the pydantic union admits only known types
            raise ConstraintError(f"{path}: unknown format type {fmt.type!r}")
        return method(fmt, path, end)

    def _const_string(self, fmt, path, end):
        return self.literal(fmt.value)

    def _regex(self, fmt, path, end):
        return _regular("/" + xgrammar_regex(fmt.pattern, f"{path}.pattern") + "/")

    def _any_text(self, fmt, path, end):
        if fmt.max_tokens is not None:
            raise ConstraintError(
                f"{path}.max_tokens: a budget in tokens over free text cannot be stated as a "
                "grammar over bytes (llguidance's per-lexeme token limit counts differently "
                "and disables rollback); use max_chars")
        expr = _free_text(list(fmt.excludes) + _end_strings(end))
        if fmt.max_chars is not None:
            expr = f"({expr} & /(?s:.){{0,{fmt.max_chars}}}/)"
        return _regular(expr)

    def _json_schema(self, fmt, path, end):
        if fmt.style != "json":
            raise ConstraintError(
                f"{path}.style: the {fmt.style!r} style writes arguments as XML parameters, "
                "which llguidance's JSON compiler cannot generate; only style 'json' is "
                "supported")
        if fmt.any_order:
            raise ConstraintError(
                f"{path}.any_order: llguidance generates object properties in the schema's "
                "order only")
        if fmt.excludes:
            raise ConstraintError(
                f"{path}.excludes: llguidance's JSON compiler cannot forbid substrings inside "
                "JSON strings")
        if fmt.max_whitespace_cnt is not None:
            raise ConstraintError(
                f"{path}.max_whitespace_cnt: llguidance repeats its JSON whitespace pattern "
                "between tokens, so it cannot bound consecutive whitespace")
        return _atom(self.json_rule(fmt.json_schema, path))

    def _qwen_xml_parameter(self, fmt, path, end):
        raise ConstraintError(
            f"{path}: qwen_xml_parameter (a JSON schema written as Qwen XML parameters) cannot "
            "be generated by llguidance's JSON compiler")

    def _grammar(self, fmt, path, end):
        from llguidance.gbnf_to_lark import any_to_lark

        try:
            lark = any_to_lark(fmt.grammar)
        except Exception as e:  # the converter raises plain exceptions of several kinds
            raise ConstraintError(f"{path}.grammar: cannot convert this EBNF: {e}") from None
        name = f"g{len(self.subgrammars)}"
        self.subgrammars.append({"name": name, "lark_grammar": lark})
        return _atom("@" + name)

    def _sequence(self, fmt, path, end):
        return self.seq(self.visit(e, f"{path}.elements[{i}]", end)
                        for i, e in enumerate(fmt.elements))

    def _or(self, fmt, path, end):
        return self.alt([self.visit(e, f"{path}.elements[{i}]", end)
                         for i, e in enumerate(fmt.elements)])

    def _optional(self, fmt, path, end):
        return self.repeat(self.visit(fmt.content, f"{path}.content", end), 0, 1)

    def _plus(self, fmt, path, end):
        return self.repeat(self.visit(fmt.content, f"{path}.content", end), 1, None)

    def _star(self, fmt, path, end):
        return self.repeat(self.visit(fmt.content, f"{path}.content", end), 0, None)

    def _repeat(self, fmt, path, end):
        if fmt.min < 0 or fmt.max < -1 or (fmt.max >= 0 and fmt.min > fmt.max):
            raise ConstraintError(f"{path}: repeat needs 0 <= min <= max (max -1: unbounded), "
                                  f"got min {fmt.min}, max {fmt.max}")
        high = None if fmt.max == -1 or fmt.max > 2**31 - 1 else fmt.max
        return self.repeat(self.visit(fmt.content, f"{path}.content", end), fmt.min, high)

    def _tag(self, fmt, path, end):
        return self.seq([self.begin(fmt, path), self.visit(fmt.content, f"{path}.content", fmt.end),
                         self.end(fmt, path)])

    def begin(self, tag, path) -> _Piece:
        if isinstance(tag.begin, str):
            return self.literal(tag.begin)
        return self.token(tag.begin.token, f"{path}.begin")

    def end(self, tag, path) -> _Piece:
        if isinstance(tag.end, str):
            return self.literal(tag.end)
        if isinstance(tag.end, list):
            return self.alt([self.literal(e) for e in tag.end])
        return self.token(tag.end.token, f"{path}.end")

    def _triggered_tags(self, fmt, path, end):
        triggers = list(fmt.triggers)
        groups: dict[str, list[_Piece]] = {t: [] for t in triggers}
        whole = []
        for i, tag in enumerate(fmt.tags):
            where = f"{path}.tags[{i}]"
            if not isinstance(tag.begin, str):
                raise ConstraintError(f"{where}.begin: tags in triggered_tags begin with a "
                                      "string (token_triggered_tags takes token begins)")
            matched = [t for t in triggers if tag.begin.startswith(t)]
            if len(matched) != 1:
                raise ConstraintError(f"{where}.begin: {tag.begin!r} must start with exactly "
                                      f"one trigger of {triggers}, it starts with {len(matched)}")
            content = self.visit(tag.content, f"{where}.content", tag.end)
            rest = tag.begin[len(matched[0]):]
            groups[matched[0]].append(self.seq([self.literal(rest), content,
                                                self.end(tag, where)]))
            whole.append(self.seq([self.begin(tag, where), content, self.end(tag, where)]))
        if fmt.at_least_one and fmt.stop_after_first:
            return self.alt(whole)
        excludes = list(fmt.excludes) + _end_strings(end)
        steps = [self.seq([self.free_until(t, triggers, excludes), self.alt(groups[t])])
                 for t in triggers if groups[t]]
        tail = _regular(_free_text(triggers + excludes))
        dispatch = self.dispatch(steps, tail, loop=not fmt.stop_after_first)
        return self.seq([self.alt(whole), dispatch]) if fmt.at_least_one else dispatch

    def _dispatch(self, fmt, path, end):
        patterns = [p for p, _ in fmt.rules]
        if not all(patterns):
            raise ConstraintError(f"{path}.rules: dispatch patterns must be non-empty strings")
        excludes = list(fmt.excludes)
        steps = [self.seq([self.free_until(p, patterns, excludes),
                           self.visit(f, f"{path}.rules[{i}][1]", end)])
                 for i, (p, f) in enumerate(fmt.rules)]
        return self.dispatch(steps, _regular(_free_text(patterns + excludes)), fmt.loop)

    def dispatch(self, steps, tail: _Piece, loop: bool) -> _Piece:
        """xgrammar's TagDispatch: free text and dispatched steps, then free text (``loop``), or
        free text and at most one step."""
        if not steps:
            return tail
        step = self.alt(steps)
        return self.seq([self.repeat(step, 0, None), tail]) if loop else self.alt([tail, step])

    def _tags_with_separator(self, fmt, path, end):
        one = self.alt([self.visit(t, f"{path}.tags[{i}]", end) for i, t in enumerate(fmt.tags)])
        if fmt.stop_after_first:
            return one if fmt.at_least_one else self.repeat(one, 0, 1)
        sep = self.literal(fmt.separator)
        many = self.seq([one, self.repeat(self.seq([sep, one]), 0, None)])
        return many if fmt.at_least_one else self.repeat(many, 0, 1)

    # -- token-level formats -----------------------------------------------------------------
    def _token(self, fmt, path, end):
        return self.token(fmt.token, f"{path}.token")

    def token(self, token, path) -> _Piece:
        token_id = self.token_id(token, path)
        if token_id in self.vocab.eos_token_ids:
            raise ConstraintError(f"{path}: token {token!r} is an end-of-sequence token; the "
                                  "output ends there, so a structure cannot go on after it")
        return _atom(f"<[{token_id}]>")

    def token_id(self, token, path) -> int:
        if isinstance(token, int):
            if not 0 <= token < self.vocab.size:
                raise ConstraintError(f"{path}: token id {token} is outside the vocabulary "
                                      f"(0..{self.vocab.size - 1})")
            return token
        token_id = _token_ids(self.vocab).get(token.encode("utf-8"))
        if token_id is None:
            raise ConstraintError(f"{path}: token {token!r} is not in the vocabulary")
        return token_id

    def other_tokens(self, excluded, path) -> str:
        """One token outside ``excluded`` (ids or strings) and the EOS tokens."""
        ids = {self.token_id(t, path) for t in excluded} | set(self._eos)
        return "<[^" + ",".join(str(i) for i in sorted(ids)) + "]>"

    def _exclude_token(self, fmt, path, end):
        return _atom(self.other_tokens(list(fmt.exclude_tokens) + _end_tokens(end),
                                       f"{path}.exclude_tokens"))

    def _any_tokens(self, fmt, path, end):
        one = _atom(self.other_tokens(list(fmt.exclude_tokens) + _end_tokens(end),
                                      f"{path}.exclude_tokens"))
        return self.repeat(one, 0, fmt.max_tokens)

    def _token_triggered_tags(self, fmt, path, end):
        triggers = [self.token_id(t, f"{path}.trigger_tokens") for t in fmt.trigger_tokens]
        groups: dict[int, list[_Piece]] = {t: [] for t in triggers}
        whole = []
        for i, tag in enumerate(fmt.tags):
            where = f"{path}.tags[{i}]"
            if isinstance(tag.begin, str):
                raise ConstraintError(f"{where}.begin: tags in token_triggered_tags begin with "
                                      "a token format (triggered_tags takes string begins)")
            begin = self.token_id(tag.begin.token, f"{where}.begin")
            if triggers.count(begin) != 1:
                raise ConstraintError(f"{where}.begin: token {tag.begin.token!r} must be "
                                      "exactly one of the trigger tokens")
            content = self.visit(tag.content, f"{where}.content", tag.end)
            groups[begin].append(self.seq([content, self.end(tag, where)]))
            whole.append(self.seq([self.token(begin, f"{where}.begin"), content,
                                   self.end(tag, where)]))
        if fmt.at_least_one and fmt.stop_after_first:
            return self.alt(whole)
        free = self.other_tokens(triggers + list(fmt.exclude_tokens) + _end_tokens(end),
                                 f"{path}.exclude_tokens")
        steps = [self.seq([_atom(f"{free}*"), self.token(t, f"{path}.trigger_tokens"),
                           self.alt(groups[t])]) for t in triggers if groups[t]]
        dispatch = self.dispatch(steps, _atom(f"{free}*"), loop=not fmt.stop_after_first)
        return self.seq([self.alt(whole), dispatch]) if fmt.at_least_one else dispatch

    def _token_dispatch(self, fmt, path, end):
        triggers = [self.token_id(t, f"{path}.rules") for t, _ in fmt.rules]
        free = self.other_tokens(triggers + list(fmt.exclude_tokens), f"{path}.exclude_tokens")
        steps = [self.seq([_atom(f"{free}*"), self.token(t, f"{path}.rules[{i}][0]"),
                           self.visit(f, f"{path}.rules[{i}][1]", end)])
                 for i, (t, (_, f)) in enumerate(zip(triggers, fmt.rules))]
        return self.dispatch(steps, _atom(f"{free}*"), fmt.loop)

    # -- JSON --------------------------------------------------------------------------------
    def json_rule(self, schema: Any, path: str) -> str:
        """The name of a captured ``%json`` rule for ``schema`` under xgrammar's settings."""
        if schema is False:
            raise ConstraintError(f"{path}.json_schema: the schema false admits no value")
        schema = {} if schema is True else schema
        if json_depth(schema) > MAX_JSON_DEPTH:
            raise ConstraintError(f"{path}.json_schema nests more than {MAX_JSON_DEPTH} levels "
                                  "of objects and arrays (the limit)")
        if "x-guidance" in schema:
            raise ConstraintError(f"{path}.json_schema: x-guidance holds llguidance's own "
                                  "options, which a structural tag does not set")
        schema = xgrammar_strict(schema)
        schema_validator(schema, f"{path}.json_schema")  # raises if the schema is invalid
        key = json.dumps(schema)
        name = self._json_names.get(key)
        if name is None:
            name = self._json_names[key] = f"json_{len(self._json_names)}"
            self.schemas[name] = schema
            options = {"whitespace_pattern": _JSON_WS, "lenient": True}
            self.lines.append(f"{name}[capture]: %json "
                              + json.dumps({"x-guidance": options, **schema}))
        return name


def _end_strings(end: Any) -> list[str]:
    """The end strings of the enclosing tag that bound an unlimited text format."""
    if isinstance(end, str):
        return [end] if end else []
    if isinstance(end, list):
        return [e for e in end if e]
    return []


def _end_tokens(end: Any) -> list:
    """The end token of the enclosing tag that bounds an unlimited token format."""
    return [end.token] if end is not None and not isinstance(end, (str, list)) else []


_TOKEN_IDS: "weakref.WeakKeyDictionary[TokenVocab, dict[bytes, int]]" = \
    weakref.WeakKeyDictionary()


def _token_ids(vocab: TokenVocab) -> dict[bytes, int]:
    """Text of a token (its bytes; a special token's spelling) -> the first id spelling it,
    as xgrammar resolves token strings against its decoded vocabulary."""
    table = _TOKEN_IDS.get(vocab)
    if table is None:
        table = {}
        specials = set(np.nonzero(vocab.special)[0].tolist())
        names = vocab.hf.convert_ids_to_tokens(sorted(specials))
        spelled = dict(zip(sorted(specials), names))
        for i in range(vocab.size):
            data = vocab.token_bytes[i]
            if data is None:
                data = str(spelled[i]).encode("utf-8")
            table.setdefault(data, i)
        _TOKEN_IDS[vocab] = table
    return table


_SPECIAL_TEXTS: "weakref.WeakKeyDictionary[TokenVocab, tuple]" = weakref.WeakKeyDictionary()


def _special_texts(vocab: TokenVocab) -> tuple[dict[str, int], Any]:
    """The special tokens' texts -> their (first) ids, and a pattern finding them in a string
    (longest first)."""
    found = _SPECIAL_TEXTS.get(vocab)
    if found is None:
        ids = np.nonzero(vocab.special)[0].tolist()
        texts: dict[str, int] = {}
        for i, name in zip(ids, vocab.hf.convert_ids_to_tokens(ids)):
            if name and i not in vocab.eos_token_ids:
                texts.setdefault(str(name), i)
        pattern = re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True))
                             or "(?!)")
        found = _SPECIAL_TEXTS[vocab] = (texts, pattern)
    return found


# JSON Schema keywords whose value is a schema, a list of schemas, or a map of names to schemas
_ONE = ("additionalProperties", "additionalItems", "items", "contains", "not", "if", "then",
        "else", "propertyNames", "unevaluatedItems", "unevaluatedProperties")
_MANY = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_NAMED = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def xgrammar_strict(schema: Any) -> Any:
    """``schema`` as xgrammar's strict mode reads it (structural tags compile JSON with it): an
    object schema listing ``properties`` or ``patternProperties`` gets ``additionalProperties:
    false`` unless it sets ``additionalProperties``, ``unevaluatedProperties`` or
    ``propertyNames``; an array schema with ``prefixItems`` gets ``items: false`` unless it sets
    ``items`` or ``unevaluatedItems``. Subschemas are reached keyword by keyword, so a property
    named like a keyword is never mistaken for one. (xgrammar also closes objects that only
    bound their size or list ``required`` keys without ``properties``; tether keeps those open,
    as the schema says.)"""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _ONE:
        if isinstance(out.get(key), dict):
            out[key] = xgrammar_strict(out[key])
    for key in _MANY:
        if isinstance(out.get(key), list):
            out[key] = [xgrammar_strict(s) for s in out[key]]
    for key in _NAMED:
        if isinstance(out.get(key), dict):
            out[key] = {k: xgrammar_strict(s) for k, s in out[key].items()}
    if (("properties" in out or "patternProperties" in out)
            and not {"additionalProperties", "unevaluatedProperties", "propertyNames"} & set(out)):
        out["additionalProperties"] = False
    if "prefixItems" in out and not {"items", "unevaluatedItems"} & set(out):
        out["items"] = False
    return out


# -- xgrammar's regular expressions ------------------------------------------------------------

# xgrammar's classes (its regex converter), outside and inside a character class
_CLASSES = {
    "d": ("[0-9]", "0-9"),
    "D": ("[^0-9]", r"\x{0}-\x{2F}\x{3A}-\x{10FFFF}"),
    "w": ("[a-zA-Z0-9_]", "a-zA-Z0-9_"),
    "W": ("[^a-zA-Z0-9_]", r"\x{0}-\x{2F}\x{3A}-\x{40}\x{5B}-\x{5E}\x{60}\x{7B}-\x{10FFFF}"),
    "s": (r"[\x{C}\n\r\t\x{B}\x{20}\x{A0}]", r"\x{C}\n\r\t\x{B}\x{20}\x{A0}"),
    "S": (r"[^\x{C}\n\r\t\x{B}\x{20}\x{A0}]",
          r"\x{0}-\x{8}\x{E}-\x{1F}\x{21}-\x{9F}\x{A1}-\x{10FFFF}"),
}
_REFUSED_ESCAPES = {"b": "word boundaries", "B": "word boundaries", "p": r"\p{..} classes",
                    "P": r"\p{..} classes", "k": "backreferences"}


def xgrammar_regex(pattern: str, path: str = "regex") -> str:
    """A regular expression in xgrammar's dialect, rewritten for llguidance's ``/.../``: ``.``
    matches any character (newlines too), ``\\d \\w \\s`` and their negations are xgrammar's
    ASCII classes (``\\s`` with NBSP), ``^`` and ``$`` are dropped (xgrammar ignores them), a lazy
    quantifier is a plain one; what xgrammar refuses is refused."""
    out: list[str] = []
    i, n, in_class, quantified = 0, len(pattern), False, False
    while i < n:
        c = pattern[i]
        was_quantified, quantified = quantified, False
        if c == "\\":
            if i + 1 >= n:
                raise ConstraintError(f"{path}: the pattern ends inside an escape")
            e = pattern[i + 1]
            i += 2
            if e in _CLASSES:
                out.append(_CLASSES[e][1 if in_class else 0])
            elif e in _REFUSED_ESCAPES or (e.isdigit() and e != "0"):
                what = _REFUSED_ESCAPES.get(e, "backreferences")
                raise ConstraintError(f"{path}: {what} (\\{e}) are not regular; xgrammar "
                                      "refuses them too")
            elif e == "u" and pattern[i:i + 1] == "{":
                close = pattern.find("}", i)
                if close < 0:
                    raise ConstraintError(f"{path}: unterminated \\u{{...}} escape")
                out.append(r"\x{" + pattern[i + 1:close] + "}")
                i = close + 1
            elif e in "ux":
                width = 4 if e == "u" else 2
                digits = pattern[i:i + width]
                if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
                    raise ConstraintError(f"{path}: malformed \\{e} escape")
                out.append(r"\x{" + digits + "}")
                i += width
            elif e in "0nrtfv":
                out.append({"0": r"\x{0}", "n": r"\n", "r": r"\r", "t": r"\t", "f": r"\x{C}",
                            "v": r"\x{B}"}[e])
            elif e.isalnum():
                raise ConstraintError(f"{path}: unknown escape \\{e}")
            else:
                out.append(_char(e))
            continue
        i += 1
        if in_class:
            if c == "]":
                in_class = False
            out.append(_char(c) if c == "/" or ord(c) < 0x20 else c)
        elif c == "[":
            in_class = True
            out.append(c)
            if pattern[i:i + 1] == "^":
                out.append("^")
                i += 1
            if pattern[i:i + 1] == "]":  # a leading ']' is a literal one
                out.append(r"\]")
                i += 1
        elif c in "^$":
            pass  # xgrammar ignores anchors: a pattern always matches the whole piece
        elif c == ".":
            out.append("(?s:.)")
        elif c == "(" and pattern[i:i + 1] == "?":
            if pattern[i + 1:i + 2] != ":":
                raise ConstraintError(f"{path}: group modifiers other than (?: (lookarounds, "
                                      "flags, named groups) are not supported; xgrammar "
                                      "refuses them too")
            out.append("(?:")
            i += 2
        elif c == "?" and was_quantified:
            pass  # a lazy quantifier: xgrammar matches every repetition count anyway
        elif c in "*+?":
            out.append(c)
            quantified = True
        elif c == "{":
            close = pattern.find("}", i)
            if close < 0:
                raise ConstraintError(f"{path}: unterminated repetition {{")
            out.append(pattern[i - 1:close + 1])
            i = close + 1
            quantified = True
        elif c == "/" or ord(c) < 0x20:
            out.append(_char(c))
        else:
            out.append(c)
    if in_class:
        raise ConstraintError(f"{path}: unterminated character class")
    return "".join(out)


def _char(c: str) -> str:
    return r"\x{" + format(ord(c), "X") + "}"


# -- the constraint ----------------------------------------------------------------------------

class StructuralTagConstraint(GrammarConstraint):
    """A structural tag checked by llguidance (see the module docstring).

    Unlike the other constraints, special tokens are allowed where the tag names them (a
    ``token`` format, a token range): llguidance decides, and never matches them as text. The
    output bytes spell a special token as its text (``<start_of_turn>``). EOS is allowed where
    the grammar accepts and every captured JSON value validates against its schema.
    """

    special_tokens = True

    def __init__(self, spec: Spec, vocab: TokenVocab, compiled: CompiledTag, matcher: Any):
        super().__init__(spec, vocab, matcher)
        self.compiled = compiled
        self._validators = {name: schema_validator(schema)
                            for name, schema in compiled.schemas.items()}
        self._checked: dict[tuple[str, bytes], bool] = {}
        self._eos_id = min(vocab.eos_token_ids)

    def end_check(self, state: GrammarState) -> bool:
        """Every JSON value the grammar captured validates against its schema. A capture is
        made wherever a JSON value completes, also on parse paths that later died (an ``or``
        whose alternatives parse the same text), so this is exact where the tag places each
        JSON value unambiguously (every tag vLLM builds for tools), and stricter elsewhere."""
        if not self._validators:
            return True
        finished = state.matcher.deep_copy()
        finished.consume_token(self._eos_id)  # completes a JSON value still open at the end
        for name, value in finished.get_captures():
            validator = self._validators.get(name)
            if validator is None:
                continue
            key = (name, value)
            ok = self._checked.get(key)
            if ok is None:
                if len(self._checked) > 100_000:
                    self._checked.clear()
                ok = self._checked[key] = _validates(validator, value)
            if not ok:
                return False
        return True


def _validates(validator: Any, value: bytes) -> bool:
    try:
        return validator.is_valid(json.loads(value.decode("utf-8")))
    except (ValueError, RecursionError):  # not JSON, or too deep to validate
        return False


def structural_tag_constraint(spec: Spec, vocab: TokenVocab) -> StructuralTagConstraint:
    """The checker of a ``structural_tag`` spec for ``vocab``."""
    from llguidance import LLMatcher

    compiled = compile_structural_tag(spec.source, vocab)
    matcher = LLMatcher(vocab.ll, compiled.grammar, log_level=0)
    if matcher.is_error():
        raise ConstraintError(f"llguidance cannot compile the structural tag: "
                              f"{matcher.get_error()}")
    return StructuralTagConstraint(spec, vocab, compiled, matcher)
