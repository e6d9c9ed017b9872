"""Structural tags (``tether.constraints.structural``), with xgrammar itself as the oracle.

xgrammar compiles the same tag for the same tokenizer (``GrammarCompiler.compile_structural_tag``,
what vLLM's default backend runs); both walk the same token sequences. At every state of every
walk the two must admit the same tokens (their full masks) and agree on whether the output may
end. The deliberate differences, each recognised precisely rather than skipped:

* special tokens: xgrammar reads ``<|im_start|>`` as the characters it spells (it marks no
  special tokens in SmolLM2's or Gemma 3's tokenizer); tether admits a special token where a
  string of the tag spells it, or a token format names it, never in free text or JSON
  (``test_special_tokens_are_text_only_where_the_tag_spells_them``); masks are compared on the
  other tokens;
* text is UTF-8: xgrammar's free text admits a byte that cannot continue the output as UTF-8
  (a lone continuation byte), tether does not;
* forced bytes: where the grammar forces the next bytes, tether admits only llguidance's
  canonical tokenization of them (``GrammarState``), xgrammar any token spelling a prefix; there
  the walk checks that llguidance's grammar itself admits the token;
* JSON integers: llguidance admits ``-0`` (an integer to ``jsonschema``), xgrammar does not;
* JSON strings: llguidance refuses U+007F unescaped, the escape ``\\/`` and ``\\uXXXX`` escapes
  of printable characters (JSON and xgrammar allow them; every string can still be written);
* lexing: two JSON values back to back admit JSON whitespace between them, and text that could
  still grow right before a JSON value keeps its longest match (llguidance's lexer; no tag vLLM
  builds does either: ``test_back_to_back_json_values_admit_whitespace_between``,
  ``test_growing_text_before_json_takes_the_longest_match``);
* schemas: llguidance's grammar enforces some keywords that xgrammar's does not (a ``date``
  format rejects February 30), and EOS also needs every JSON value to validate with
  ``jsonschema`` and its draft; the strings where this decides are marked (``INVALID``'s last
  field: xgrammar accepts them whole, tether must refuse a token or EOS), and tether and
  xgrammar must agree on every other string.
"""

from __future__ import annotations

import codecs
import json
import re

import numpy as np
import pytest

from conftest import encode, fixture, walk
from tether import Constraint, ConstraintError, StructuralTag
from tether.constraints.specs import Spec, normalize
from tether.constraints.structural import compile_structural_tag, xgrammar_regex

TOOL_FILES = sorted(fixture("jsonschemabench", "Glaiveai2K_dev").glob("*.json"))
TOOLS = {p.stem.rsplit("_", 1)[0]: json.loads(p.read_text()) for p in TOOL_FILES}
NAMED = "convert_temperature"  # the tool of tool_choice {"type": "function", ...}

# Valid arguments, and arguments that break the schema (why, tool, arguments, whether only
# tether sees it: xgrammar accepts those).
VALID = {
    "book_flight": {"origin": "SFO", "destination": "JFK", "departure_date": "2024-05-01",
                    "passengers": 2},
    "convert_temperature": {"temperature": 36.6, "from_unit": "Celsius",
                            "to_unit": "Fahrenheit"},
    "generate_invoice": {"customer_name": "Ada", "invoice_items": [
        {"item_name": "tea", "quantity": 3, "price": 2.5}]},
    "search_recipes": {"keywords": ["soup"], "cuisine": "Thai", "ingredients": ["lime", "chili"]},
    "send_email": {"recipient_email": "bob@example.com", "subject": "Caf\u00e9 \u2615",
                   "message": "Hi \"Bob\",\nsee you"},
}
INVALID = [
    ("enum", "convert_temperature", {"temperature": 1, "from_unit": "Celsius", "to_unit": "Rankine"},
     False),
    ("missing required", "convert_temperature", {"temperature": 1, "from_unit": "Kelvin"}, False),
    ("type", "convert_temperature", {"temperature": "hot", "from_unit": "Celsius",
                                     "to_unit": "Kelvin"}, False),
    ("extra property", "book_flight", {"origin": "A", "destination": "B",
                                       "departure_date": "2024-05-01", "passengers": 1,
                                       "seat": "12A"}, False),
    ("integer", "generate_invoice", {"customer_name": "A", "invoice_items": [
        {"item_name": "x", "quantity": 1.5, "price": 1}]}, False),
    ("array", "search_recipes", {"keywords": "soup", "cuisine": "Thai", "ingredients": []}, False),
    ("date format", "book_flight", {"origin": "A", "destination": "B",
                                    "departure_date": "2024-02-30", "passengers": 1}, True),
]


def ordered(schema: dict, value):
    """``value`` with object keys in the schema's ``properties`` order (the order both grammars
    generate properties in)."""
    if isinstance(value, dict) and isinstance(schema, dict):
        props = schema.get("properties", {})
        keys = [k for k in props if k in value] + [k for k in value if k not in props]
        return {k: ordered(props.get(k, {}), value[k]) for k in keys}
    if isinstance(value, list) and isinstance(schema, dict):
        return [ordered(schema.get("items", {}), v) for v in value]
    return value


def args_text(name: str, args: dict, indent: int | None = None) -> str:
    return json.dumps(ordered(TOOLS.get(name, {}), args), ensure_ascii=False, indent=indent)


# How each model writes tool calls (name, argument text) -> text, as vLLM's parsers read them.
def hermes(calls, newline=True):
    nl = "\n" if newline else ""
    return "".join(f'<tool_call>{nl}{{"name": "{n}", "arguments": {a}}}{nl}</tool_call>'
                   for n, a in calls)


def llama(calls):
    return "".join(f'{{"name": "{n}", "parameters": {a}}}' for n, a in calls)


def kimi(calls):
    inner = "".join(f"<|tool_call_begin|>functions.{n}:{i}<|tool_call_argument_begin|>{a}"
                    "<|tool_call_end|>" for i, (n, a) in enumerate(calls))
    return f"<|tool_calls_section_begin|>{inner}<|tool_calls_section_end|>"


def deepseek_v3_1(calls):
    inner = "".join(f"<\uff5ctool\u2581call\u2581begin\uff5c>{n}<\uff5ctool\u2581sep\uff5c>{a}"
                    "<\uff5ctool\u2581call\u2581end\uff5c>" for n, a in calls)
    return f"<\uff5ctool\u2581calls\u2581begin\uff5c>{inner}<\uff5ctool\u2581calls\u2581end\uff5c>"


def hy_v4(calls):
    """Arguments as <arg_key>/<arg_value> pairs, values raw: required keys first, in order."""
    out = []
    for n, a in calls:
        args, schema = json.loads(a), TOOLS.get(n, {})
        required = [k for k in schema.get("properties", {}) if k in schema.get("required", [])]
        keys = [k for k in required if k in args] + [k for k in args if k not in required]
        pairs = "".join(f"<arg_key>{k}</arg_key><arg_value>"
                        f"{args[k] if isinstance(args[k], str) else json.dumps(args[k])}"
                        "</arg_value>" for k in keys)
        out.append(f"<tool_call>{n}{pairs}</tool_call>")
    return "<tool_calls>" + "".join(out) + "</tool_calls>"


RENDER = {"hermes": hermes, "llama": llama, "kimi": kimi, "deepseek_v3_1": deepseek_v3_1,
          "hy_v4": hy_v4}
MODES = ("auto", "required", "named")


def vllm_tag(model: str, mode: str, reasoning: bool = False):
    """The structural tag vLLM 0.32 builds for these tools (strict) and tool choice."""
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionNamedToolChoiceParam, ChatCompletionToolsParam)
    from vllm.tool_parsers.structural_tag_registry import get_model_structural_tag

    tools = [ChatCompletionToolsParam(type="function", function={
        "name": n, "parameters": s, "strict": True}) for n, s in TOOLS.items()]
    choice = mode if mode != "named" else ChatCompletionNamedToolChoiceParam(
        type="function", function={"name": NAMED})
    return get_model_structural_tag(model, tools, choice, reasoning)


def call_strings(model: str, mode: str) -> list[tuple[str, str, bool]]:
    """(label, text, whether only tether sees that it breaks its schema) for one tag."""
    render = RENDER[model]
    callable_ = [NAMED] if mode == "named" else list(TOOLS)
    one = [(n, args_text(n, VALID[n])) for n in callable_]
    out = [(f"call {n}", render([c]), False) for n, c in zip(callable_, one)]
    out += [
        ("pretty arguments", render([(NAMED, args_text(NAMED, VALID[NAMED], indent=2))]), False),
        ("two calls", render(one[:1] + [one[-1]]), False),
        ("text before", "Let me check that. " + render(one[:1]), False),
        ("text after", render(one[:1]) + " Done.", False),
        ("text only", "It is 20 degrees outside.", False),
        ("unknown tool", render([("get_weather", '{"city": "Paris"}')]), False),
        ("truncated", render(one[:1])[:-4], False),
        ("empty", "", False),
    ]
    if model == "hermes":
        out.append(("hermes without newlines", hermes(one[:1], newline=False), False))
    json_args = model != "hy_v4"  # hy_v4 writes raw values, which no schema checks
    out += [(f"invalid: {why}", render([(n, args_text(n, a))]), late and json_args)
            for why, n, a, late in INVALID if n in callable_]
    return out


class Oracle:
    """xgrammar for one tokenizer: the matcher of a structural tag, and its masks."""

    def __init__(self, vocab):
        import xgrammar as xgr

        self.xgr, self.vocab = xgr, vocab
        info = xgr.TokenizerInfo.from_huggingface(vocab.hf, vocab_size=vocab.size,
                                                  stop_token_ids=sorted(vocab.eos_token_ids))
        self.compiler = xgr.GrammarCompiler(info)

    def matcher(self, tag):
        if not isinstance(tag, dict):
            text = tag.model_dump_json()  # an xgrammar StructuralTag
        else:
            text = json.dumps(tag if tag.get("type") == "structural_tag" else tag_of(tag))
        return self.xgr.GrammarMatcher(self.compiler.compile_structural_tag(text))

    def mask(self, matcher) -> np.ndarray:
        bits = self.xgr.allocate_token_bitmask(1, self.vocab.size)
        matcher.fill_next_token_bitmask(bits)
        return np.unpackbits(bits.numpy().view(np.uint8), bitorder="little")[
            :self.vocab.size].astype(bool)


@pytest.fixture(scope="module")
def oracle(smollm2_vocab):
    return Oracle(smollm2_vocab)


def _utf8_prefix(data: bytes) -> bool:
    """Whether ``data`` is valid UTF-8 up to an incomplete last character."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
        return True
    except UnicodeDecodeError:
        return False


def _json_escape(data: bytes, token: bytes) -> bool:
    """Whether ``token`` goes on with a ``\\/`` or ``\\uXXXX`` escape that ``data`` began."""
    backslashes = len(data) - len(data.rstrip(b"\\"))
    if backslashes % 2 == 1:
        return token[:1] in (b"/", b"u")
    return re.search(rb"(?<!\\)(\\\\)*\\u[0-9a-fA-F]{0,3}$", data) is not None


def unexplained(con, state, ours: np.ndarray, theirs: np.ndarray) -> list[int]:
    """Token ids (not special, not EOS) where the masks differ for no documented reason."""
    vocab, bad = con.vocab, []
    for t in np.nonzero(ours != theirs)[0]:
        t = int(t)
        if vocab.special[t] or t in con.eos_token_ids:
            continue
        if theirs[t] and not _utf8_prefix(state.data + vocab.token_bytes[t]):
            continue  # xgrammar's text admits bytes that are not UTF-8
        if theirs[t] and state.forced_mask(vocab.size) is not None and \
                state.matcher.validate_tokens([t]) == 1:
            continue  # forced bytes: the grammar admits it, tether takes the canonical tokens
        if theirs[t] and b"\x7f" in vocab.token_bytes[t]:
            continue  # llguidance's JSON strings refuse DEL (U+007F), which JSON allows
        if theirs[t] and _json_escape(state.data, vocab.token_bytes[t]):
            continue  # llguidance's JSON strings refuse \/ and \u escapes of printable text
        if ours[t] and state.data.endswith(b"-") and vocab.token_bytes[t].startswith(b"0"):
            continue  # llguidance's JSON integers admit -0 (xgrammar's do not; jsonschema does)
        bad.append(t)
    return bad


def compare(oracle, tag, ids, masks=True, stricter=False):
    """Walk ``ids`` through tether and xgrammar; return (index of the first token refused or
    None, tether's end verdict, xgrammar's), asserting agreement on the way. ``stricter``: the
    text breaks its schema in a way only tether sees (llguidance's format grammars, jsonschema
    at the end), so tether may refuse a token that xgrammar admits; the walk then stops."""
    con = Constraint.from_spec(StructuralTag(tag), oracle.vocab)
    matcher, state = oracle.matcher(tag), con.start()
    eos = min(con.eos_token_ids)
    for i, t in enumerate(ids + [None]):
        if masks:
            ours = con.mask(state)
            bad = unexplained(con, state, ours, oracle.mask(matcher))
            ours = set(np.nonzero(ours)[0].tolist())
            assert not bad, (f"masks differ after {state.data!r}: (token, tether, xgrammar) "
                             f"{[(oracle.vocab.token_bytes[b], b in ours) for b in bad[:8]]}")
        if t is None:
            ends = oracle.mask(matcher)[eos]
            return None, con.is_complete(state), bool(ends)
        language = state.matcher.validate_tokens([t]) == 1
        theirs = matcher.accept_token(t)
        if stricter and theirs and not language:
            return i, False, True
        assert language == theirs, f"token {i} ({t}) after {state.data!r}: {language} {theirs}"
        if con.allows(state, t) != language:
            assert state.forced_mask(con.vocab.size) is not None, "a check disagrees with the grammar"
        if not theirs:
            return i, False, False
        state = con.advance(state, t, check=False)


CASES = [(m, mode) for m in RENDER for mode in MODES]


@pytest.mark.parametrize("model,mode", CASES, ids=[f"{m}-{mode}" for m, mode in CASES])
def test_vllm_tool_tags_agree_with_xgrammar(oracle, smollm2_vocab, model, mode):
    tag = vllm_tag(model, mode)
    outcomes = []
    for label, text, stricter in call_strings(model, mode):
        ids = encode(smollm2_vocab, text)
        refused, ours, theirs = compare(oracle, tag, ids, label.startswith("call"), stricter)
        if stricter:  # xgrammar takes it whole, tether refuses it (a token, or EOS)
            assert theirs and not ours, f"{label}: {text!r}"
        else:
            assert ours == theirs, f"{label}: EOS {ours} (tether) vs {theirs} (xgrammar): {text!r}"
        outcomes.append((label, refused is None and ours))
    accepted = {label for label, ok in outcomes if ok}
    assert f"call {NAMED}" in accepted  # the walks exercise both verdicts
    assert not {"unknown tool", "truncated", "invalid: missing required"} & accepted
    assert ("invalid: enum" in accepted) == (model == "hy_v4")
    assert ("text only" in accepted) == (mode == "auto")


def test_reasoning_prefix_agrees_with_xgrammar(oracle, smollm2_vocab):
    """kimi with reasoning: free text up to </think> (any_text inside a tag), then calls."""
    tag = vllm_tag("kimi", "auto", reasoning=True)
    call = kimi([(NAMED, args_text(NAMED, VALID[NAMED]))])
    for text, expected in [("Think first.</think>" + call, True),
                           ("no end of thinking " + call, False),
                           ("a</think>b</think>", False),  # </think> is excluded after it
                           ("</think>Plain answer.", True)]:
        ids = encode(smollm2_vocab, text)
        refused, ours, theirs = compare(oracle, tag, ids)
        assert ours == theirs == expected, text


# -- every format, on hand-made cases ---------------------------------------------------------

def tag_of(fmt):
    return {"type": "structural_tag", "format": fmt}


JSON_A = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
FORMAT_CASES = [
    ("const_string", {"type": "const_string", "value": "yes\n\u00e9"},
     {"yes\n\u00e9": True, "yes": False, "yes\n\u00e9!": False}),
    ("json_schema", {"type": "json_schema", "json_schema": JSON_A},
     {'{"a": 1}': True, '{ "a" :\n1 }': True, '{"a": 1, "b": 2}': False, " {\"a\": 1}": False,
      '{"a": "1"}': False, "{}": False}),
    ("json_schema true", {"type": "json_schema", "json_schema": True},
     {'[1, {"x": null}]': True, '"s"': True, "[1,": False}),
    ("any_text", {"type": "any_text"}, {"": True, "anything <at> all\n": True}),
    ("any_text excludes", {"type": "any_text", "excludes": ["bad", "</x>"]},
     {"good": True, "so bad": False, "b-a-d": True, "a</x>": False}),
    ("any_text max_chars", {"type": "any_text", "max_chars": 3},
     {"\u00e9\u00e9\u00e9": True, "abcd": False}),
    ("regex", {"type": "regex", "pattern": r"^\d{2}-\w+\s.$"},
     {"12-ab_9 \n": True, "12-ab \u00e9": True, "1-ab x": False, "12-\u00e9 x": False}),
    ("regex class and lazy", {"type": "regex", "pattern": r"[^/\d]+?/[\s\S]*"},
     {"ab/\n1": True, "a1/": False, "/": False}),
    ("grammar", {"type": "grammar", "grammar": 'root ::= ("yes" | "no") [0-9]*'},
     {"yes12": True, "no": True, "maybe": False}),
    ("sequence", {"type": "sequence", "elements": [
        {"type": "regex", "pattern": "[a-z]+"}, {"type": "const_string", "value": "x"}]},
     {"abx": True, "x": False, "abxx": True, "ab": False}),
    ("or", {"type": "or", "elements": [{"type": "const_string", "value": "a"},
                                       {"type": "json_schema", "json_schema": {"type": "integer"}}]},
     {"a": True, "12": True, "-3": True, "b": False}),
    ("tag, end list", {"type": "tag", "begin": "<r>", "content": {"type": "any_text"},
                       "end": ["</r>", "</answer>"]},
     {"<r>x</r>": True, "<r>x</answer>": True, "<r>x</r>y": False, "<r>x": False}),
    ("optional", {"type": "optional", "content": {"type": "const_string", "value": "hi"}},
     {"": True, "hi": True, "hihi": False}),
    ("plus", {"type": "plus", "content": {"type": "const_string", "value": "ab"}},
     {"": False, "ab": True, "ababab": True}),
    ("star", {"type": "star", "content": {"type": "tag", "begin": "<", "end": ">", "content": {
        "type": "json_schema", "json_schema": JSON_A}}},
     {"": True, '<{"a": 1}><{"a": 2}>': True, '<{"a": 1}>x': False}),
    ("repeat", {"type": "repeat", "min": 2, "max": 3, "content": {"type": "regex",
                                                                  "pattern": "[0-9]"}},
     {"1": False, "12": True, "123": True, "1234": False}),
    ("repeat unbounded", {"type": "repeat", "min": 1, "max": -1, "content": {
        "type": "sequence", "elements": [{"type": "json_schema", "json_schema": {"type": "boolean"}},
                                         {"type": "const_string", "value": ";"}]}},
     {"true;": True, "true;false;": True, "": False, "true": False}),
    ("tags_with_separator", {"type": "tags_with_separator", "separator": ", ", "tags": [
        {"begin": "<a>", "content": {"type": "json_schema", "json_schema": JSON_A}, "end": "</a>"}]},
     {"": True, '<a>{"a": 1}</a>': True, '<a>{"a": 1}</a>, <a>{"a": 2}</a>': True,
      '<a>{"a": 1}</a><a>{"a": 2}</a>': False}),
    ("tags_with_separator at_least_one stop_after_first", {
        "type": "tags_with_separator", "separator": "", "at_least_one": True,
        "stop_after_first": True,
        "tags": [{"begin": "<a>", "content": {"type": "any_text"}, "end": "</a>"}]},
     {"": False, "<a>x</a>": True, "<a>x</a><a>y</a>": False}),
]
TRIGGERED = {"type": "triggered_tags", "triggers": ["<f="], "excludes": ["STOP"], "tags": [
    {"begin": "<f=a>", "content": {"type": "json_schema", "json_schema": JSON_A}, "end": "</f>"},
    {"begin": "<f=b>", "content": {"type": "any_text"}, "end": "</f>"}]}
CALL_A, CALL_B = '<f=a>{"a": 1}</f>', "<f=b>free</f>"
TRIGGERED_TEXTS = ["", "hi", "hi " + CALL_A, CALL_A + " and " + CALL_B + " bye", CALL_A + CALL_B,
                   CALL_A + " tail", "<f=c>", "say STOP", CALL_B + "STOP", "x <f", "<f=a>{}</f>"]
FORMAT_CASES += [
    (f"triggered_tags at_least_one={one} stop_after_first={first}",
     dict(TRIGGERED, at_least_one=one, stop_after_first=first),
     {text: None for text in TRIGGERED_TEXTS})  # None: xgrammar alone decides
    for one in (False, True) for first in (False, True)]
FORMAT_CASES += [
    ("dispatch", {"type": "dispatch", "excludes": ["zz"], "rules": [
        ["<n>", {"type": "json_schema", "json_schema": {"type": "integer"}}],
        ["<y>", {"type": "const_string", "value": "es"}]]},
     {"a<n>12 b<y>es c": True, "a<y>no": False, "zz": False, "<n>": False}),
    ("dispatch once", {"type": "dispatch", "loop": False, "rules": [
        ["<y>", {"type": "const_string", "value": "es"}]]},
     {"a<y>es": True, "a<y>es b": False, "plain": True}),
    ("tag around dispatch", {"type": "tag", "begin": "<r>", "end": "</r>", "content": {
        "type": "dispatch", "excludes": ["</r>"], "rules": [["<y>", {"type": "const_string",
                                                                      "value": "es"}]]}},
     {"<r>a<y>es b</r>": True, "<r>a</r>b</r>": False}),
]


@pytest.mark.parametrize("name,fmt,texts", FORMAT_CASES, ids=[c[0] for c in FORMAT_CASES])
def test_format_translation(oracle, smollm2_vocab, name, fmt, texts):
    for text, expected in texts.items():
        ids = encode(smollm2_vocab, text)
        refused, ours, theirs = compare(oracle, tag_of(fmt), ids)
        assert ours == theirs, f"{name}: {text!r}: tether {ours}, xgrammar {theirs}"
        if expected is not None:
            assert ours == expected, f"{name}: {text!r}"


def test_triggered_tags_flags(oracle, smollm2_vocab):
    """What at_least_one and stop_after_first mean, spelled out (xgrammar agrees above)."""
    def ends(fmt, text):
        c = Constraint.from_spec(StructuralTag(tag_of(fmt)), smollm2_vocab)
        refused, state = walk(c, encode(smollm2_vocab, text))
        return refused is None and c.is_complete(state)

    loose = TRIGGERED
    assert ends(loose, "hi " + CALL_A + " and " + CALL_B) and ends(loose, "hi")
    assert not ends(loose, "<f=c>") and not ends(loose, "say STOP")
    at_least_one = dict(TRIGGERED, at_least_one=True)
    assert ends(at_least_one, CALL_A + " then text " + CALL_B)
    assert not ends(at_least_one, "hi " + CALL_A)  # no text before the first tag
    once = dict(TRIGGERED, stop_after_first=True)
    assert ends(once, "hi " + CALL_A) and not ends(once, CALL_A + " more")
    exactly_one = dict(TRIGGERED, at_least_one=True, stop_after_first=True)
    assert ends(exactly_one, CALL_B) and not ends(exactly_one, CALL_A + CALL_B)
    assert not ends(exactly_one, "")


# -- token-level formats and special tokens (Gemma 3: 6,322 special tokens) ---------------------

@pytest.fixture(scope="module")
def gemma():
    from tether import vocab_for

    vocab = vocab_for("gemma3")
    return vocab, Oracle(vocab)


def test_token_formats_agree_with_xgrammar(gemma):
    vocab, oracle = gemma
    start, end = 105, 106  # <start_of_turn>, <end_of_turn>: special tokens
    assert vocab.special[start] and vocab.special[end]
    hi = encode(vocab, "hi")
    json_a = encode(vocab, '{"a": 1}')
    tagged = {"type": "tag", "begin": {"type": "token", "token": "<start_of_turn>"},
              "content": {"type": "any_tokens"}, "end": {"type": "token", "token": end}}
    triggered = {"type": "token_triggered_tags", "trigger_tokens": [start],
                 "exclude_tokens": ["<start_of_image>"],
                 "tags": [{"begin": {"type": "token", "token": start},
                           "content": {"type": "json_schema", "json_schema": JSON_A},
                           "end": {"type": "token", "token": end}}]}
    image = 255999  # <start_of_image>
    cases = [
        (tagged, [start] + hi + [end], True),
        (tagged, [start, 107, end], True),  # any token inside, special ones too
        (tagged, [start] + hi, False),
        (tagged, [start, end, end], False),  # the end token ends it
        ({"type": "token", "token": "hi"}, hi, True),
        ({"type": "exclude_token", "exclude_tokens": [start]}, [end], True),
        ({"type": "exclude_token", "exclude_tokens": [start]}, [start], False),
        ({"type": "any_tokens", "max_tokens": 2}, hi + hi, True),
        ({"type": "any_tokens", "max_tokens": 2}, hi + hi + hi, False),
        (triggered, hi + [start] + json_a + [end] + hi, True),
        (triggered, hi + [image], False),
        (triggered, [start] + hi, False),
        (dict(triggered, at_least_one=True), hi + [start] + json_a + [end], False),
        ({"type": "token_dispatch", "rules": [[start, {"type": "const_string", "value": "hi"}]]},
         hi + [end, start] + hi + hi, True),
        ({"type": "token_dispatch", "loop": False, "rules": [[start, {"type": "any_text"}]]},
         [end, start] + hi, True),
    ]
    for fmt, ids, expected in cases:
        refused, ours, theirs = compare(oracle, tag_of(fmt), ids)
        assert ours == theirs == expected, (fmt["type"], ids)


def test_special_tokens_are_text_only_where_the_tag_spells_them(gemma, oracle, smollm2_vocab):
    """xgrammar reads a special token as its text (these tokenizers mark none as special for
    it). tether admits one where a string of the tag spells it (a delimiter such as Kimi's
    <|tool_calls_section_begin|>, which the model writes as that token) and in token formats,
    never in free text or inside JSON."""
    for vocab, orc, special in [(gemma[0], gemma[1], 105), (smollm2_vocab, oracle, 1)]:
        name = vocab.hf.convert_ids_to_tokens(special)
        spelled = list(vocab.hf.encode(name, add_special_tokens=False, split_special_tokens=True))
        assert special not in spelled
        text_only = [{"type": "any_text"}, {"type": "json_schema", "json_schema": True},
                     {"type": "regex", "pattern": ".*"},
                     {"type": "regex", "pattern": re.escape(name) + "x"}]  # forced: see mask()
        for fmt in text_only:
            c = Constraint.from_spec(StructuralTag(tag_of(fmt)), vocab)
            state = c.start()
            if fmt["type"] == "json_schema":
                state = c.advance(state, encode(vocab, '"')[0])
            assert not c.allows(state, special) and not c.mask(state)[special]
            specials = set(np.nonzero(c.mask(state) & vocab.special)[0].tolist())
            assert specials <= c.eos_token_ids  # of all special tokens, only EOS (complete)
        trigger = {"type": "triggered_tags", "triggers": [name], "tags": [
            {"begin": name + "go:", "content": {"type": "json_schema", "json_schema": JSON_A},
             "end": name}]}
        call = encode(vocab, 'go:{"a": 1}')
        for fmt, ids in [({"type": "const_string", "value": name}, [special]),
                         ({"type": "const_string", "value": name}, spelled),
                         (trigger, encode(vocab, "hi ")
                          + [special] + call + [special]),
                         (trigger, [special] + call + spelled)]:
            refused, ours, theirs = compare(orc, tag_of(fmt), list(ids))
            assert refused is None and ours and theirs, (fmt["type"], ids)


# -- the end-of-output check -------------------------------------------------------------------

def test_back_to_back_json_values_admit_whitespace_between(oracle, smollm2_vocab):
    """A documented difference: llguidance skips JSON whitespace between two JSON values that
    follow each other with nothing between (a star of a bare json_schema); xgrammar does not.
    Every tag vLLM builds delimits its JSON values."""
    fmt = {"type": "plus", "content": {"type": "json_schema", "json_schema": {"type": "boolean"}}}
    ids = encode(smollm2_vocab, "true true")
    c = Constraint.from_spec(StructuralTag(tag_of(fmt)), smollm2_vocab)
    refused, state = walk(c, ids)
    assert refused is None and c.is_complete(state)
    matcher = oracle.matcher(tag_of(fmt))
    assert not all(matcher.accept_token(t) for t in ids)


def test_growing_text_before_json_takes_the_longest_match(oracle, smollm2_vocab):
    """A documented difference: llguidance's lexer takes the longest match of a lexeme, so text
    that could still grow (``any_text``, ``[0-9]+``) directly followed by a JSON value or a
    sub-grammar keeps what xgrammar would give to the JSON. No tag vLLM builds does that: its
    JSON values follow fixed strings."""
    fmt = {"type": "sequence", "elements": [{"type": "regex", "pattern": "[0-9]+"},
                                            {"type": "json_schema", "json_schema": {"type": "integer"}}]}
    refused, ours, theirs = compare(oracle, tag_of(fmt), encode(smollm2_vocab, "123"), masks=False)
    assert refused is None and theirs and not ours


def test_json_values_validate_with_jsonschema(oracle, smollm2_vocab):
    """Keywords llguidance's grammar ignores are checked on each captured JSON value at the
    end, under the schema's draft, as tether's JSON constraints do; xgrammar admits them."""
    unique = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    calls = {"type": "triggered_tags", "triggers": ["<c>"], "tags": [
        {"begin": "<c>", "content": {"type": "json_schema", "json_schema": unique}, "end": "</c>"}]}
    not_three = {"type": "json_schema", "json_schema": {"type": "integer", "not": {"const": 3}}}
    for fmt, text, valid in [(calls, "x <c>[1, 2]</c> y <c>[3]</c>", True),
                             (calls, "x <c>[1, 2]</c> y <c>[3, 3]</c>", False),
                             (not_three, "4", True),
                             (not_three, "3", False)]:  # a value still open at the end
        ids = encode(smollm2_vocab, text)
        refused, ours, theirs = compare(oracle, tag_of(fmt), ids)
        assert refused is None and theirs and ours == valid, text


# -- refusals ----------------------------------------------------------------------------------

REFUSED = [
    ({"type": "json_schema", "json_schema": JSON_A, "style": "qwen_xml"},
     r"format.style: the 'qwen_xml' style writes arguments as XML"),
    ({"type": "tag", "begin": "<f>", "end": "</f>", "content": {
        "type": "json_schema", "json_schema": JSON_A, "style": "minimax_xml"}},
     r"format.content.style: the 'minimax_xml' style"),
    ({"type": "qwen_xml_parameter", "json_schema": JSON_A}, "qwen_xml_parameter"),
    ({"type": "json_schema", "json_schema": JSON_A, "any_order": True},
     "any_order: llguidance generates object properties in the schema's order"),
    ({"type": "json_schema", "json_schema": JSON_A, "excludes": ["x"]},
     "excludes: llguidance's JSON compiler cannot forbid substrings"),
    ({"type": "json_schema", "json_schema": JSON_A, "max_whitespace_cnt": 2},
     "max_whitespace_cnt: llguidance repeats its JSON whitespace pattern"),
    ({"type": "json_schema", "json_schema": False}, "the schema false admits no value"),
    ({"type": "json_schema", "json_schema": {"type": "object", "minProperties": "two"}},
     r"format.json_schema: invalid schema at /minProperties"),
    ({"type": "any_text", "max_tokens": 8}, "max_tokens: a budget in tokens over free text"),
    ({"type": "token", "token": "<no such token>"}, "'<no such token>' is not in the vocabulary"),
    ({"type": "token", "token": 10 ** 6}, "outside the vocabulary"),
    ({"type": "token", "token": "<|im_end|>"}, "is an end-of-sequence token"),
    ({"type": "regex", "pattern": r"(a)\1"}, r"format.pattern: backreferences"),
    ({"type": "regex", "pattern": r"a(?=b)"}, "group modifiers"),
    ({"type": "regex", "pattern": r"\bword"}, "word boundaries"),
    ({"type": "grammar", "grammar": "root ::= ("}, "format.grammar: cannot convert this EBNF"),
    ({"type": "triggered_tags", "triggers": ["<a"], "tags": [
        {"begin": "<b>", "content": {"type": "any_text"}, "end": "</b>"}]},
     r"format.tags\[0\].begin: '<b>' must start with exactly one trigger"),
    ({"type": "token_triggered_tags", "trigger_tokens": [1], "tags": [
        {"begin": "<b>", "content": {"type": "any_text"}, "end": "</b>"}]},
     "begin with a token format"),
    ({"type": "sequence", "elements": "no"}, "invalid structural tag at format.sequence.elements"),
]


@pytest.mark.parametrize("fmt,message", REFUSED, ids=[m[:40] for _, m in REFUSED])
def test_refusals_name_the_problem(smollm2_vocab, fmt, message):
    with pytest.raises(ConstraintError, match=message):
        Constraint.from_spec(StructuralTag(tag_of(fmt)), smollm2_vocab)


def test_vllm_xml_styles_are_refused_naming_the_style(smollm2_vocab):
    """The tags vLLM builds for Qwen3.5/Qwen3-Coder, GLM-4.7 (strict), MiniMax,
    DeepSeek-V3.2/V4 and MiMo write arguments as XML: refused, naming the style and where."""
    spec = normalize(StructuralTag(vllm_tag("qwen_3_5", "auto")))  # normalizing only parses
    with pytest.raises(ConstraintError, match=r"format\.tags\[0\]\.content\.style: the "
                                              r"'qwen_xml' style"):
        Constraint.from_spec(spec, smollm2_vocab)


def test_spec_forms_and_wire():
    """A dict, its JSON text, an xgrammar model and the legacy form are the same spec; it
    crosses the wire and stays hashable; a bad tag fails at normalize."""
    import xgrammar as xgr

    fmt = TRIGGERED
    spec = normalize(StructuralTag(tag_of(fmt)))
    assert spec.kind == "structural_tag"
    assert normalize(StructuralTag(json.dumps(tag_of(fmt)))) == spec
    assert normalize(xgr.StructuralTag.model_validate(tag_of(fmt))) == spec
    assert normalize(StructuralTag(fmt)) == spec  # a bare format
    assert Spec.from_wire(spec.to_wire()) == spec
    legacy = {"type": "structural_tag", "triggers": ["<f="], "structures": [
        {"begin": "<f=a>", "schema": JSON_A, "end": "</f>"}]}
    assert json.loads(normalize(StructuralTag(legacy)).source)["format"]["tags"][0][
        "content"]["json_schema"] == JSON_A
    legacy["structures"][0]["schema"] = json.dumps(JSON_A)  # the schema as text, too
    assert normalize(StructuralTag(legacy)) == normalize(StructuralTag(dict(fmt, tags=[
        {"begin": "<f=a>", "content": {"type": "json_schema", "json_schema": JSON_A},
         "end": "</f>"}], excludes=[])))
    with pytest.raises(ConstraintError, match="not valid JSON"):
        normalize(StructuralTag("{"))
    with pytest.raises(ConstraintError, match="structures\\[0\\] needs begin, schema and end"):
        normalize(StructuralTag({"structures": [{"begin": "a", "end": "b"}], "triggers": ["a"]}))


def test_xgrammar_regex_rewriting():
    assert xgrammar_regex(r"^a.b$") == "a(?s:.)b"
    assert xgrammar_regex(r"\d+?[\w/]") == r"[0-9]+[a-zA-Z0-9_\x{2F}]"
    assert xgrammar_regex(r"(?:ab)??") == "(?:ab)?"
    assert xgrammar_regex(r"\u00e9\x41") == r"\x{00e9}\x{41}"


def test_one_lexeme_between_tags(smollm2_vocab):
    """Free text before a trigger is one lexeme that ends at the first trigger: the grammar has
    no rule per character, and a token of free text costs one grammar check."""
    lark = compile_structural_tag(vllm_tag("hermes", "auto"), smollm2_vocab).lark
    start = lark.splitlines()[1]
    assert start.startswith("start: ") and start.count("json_") == 2 * len(TOOLS)  # 2 formats
    assert lark.count("%json") == len(TOOLS)  # one JSON rule per schema, both formats share it
    assert lark.count('(/(?s:.*)/ "<tool_call>")') == 1  # text up to the trigger: one lexeme


# -- checks agree with masks -------------------------------------------------------------------

def random_walk_states(constraint, rng, steps=25):
    state = constraint.start()
    for _ in range(steps):
        yield state
        allowed = [t for t in np.nonzero(constraint.mask(state))[0]
                   if t not in constraint.eos_token_ids]
        if not allowed:
            return
        state = constraint.advance(state, int(rng.choice(allowed)))


@pytest.mark.parametrize("model", ["hermes", "kimi"])
def test_masks_match_checks_on_random_walks(smollm2_vocab, model):
    c = Constraint.from_spec(StructuralTag(vllm_tag(model, "required")), smollm2_vocab)
    rng = np.random.default_rng(0)
    sample = rng.choice(smollm2_vocab.size, size=2000, replace=False)
    for state in random_walk_states(c, rng):
        mask = c.mask(state)
        checks = np.array([c.allows(state, int(t)) for t in sample])
        assert (mask[sample] == checks).all()
        for t in np.nonzero(mask)[0][:50]:
            assert c.allows(state, int(t))


def test_masks_match_checks_with_special_tokens(gemma):
    vocab, _ = gemma
    fmt = {"type": "token_triggered_tags", "trigger_tokens": [105], "tags": [
        {"begin": {"type": "token", "token": 105}, "end": {"type": "token", "token": 106},
         "content": {"type": "json_schema", "json_schema": JSON_A}}]}
    c = Constraint.from_spec(StructuralTag(tag_of(fmt)), vocab)
    rng = np.random.default_rng(1)
    sample = np.concatenate([rng.choice(vocab.size, size=2000, replace=False),
                             np.nonzero(vocab.special)[0][:200]])
    for state in random_walk_states(c, rng, steps=15):
        mask = c.mask(state)
        checks = np.array([c.allows(state, int(t)) for t in sample])
        assert (mask[sample] == checks).all()


def test_vllm_structured_outputs_plan_a_structural_tag(smollm2_vocab):
    """``structured_outputs.structural_tag`` (JSON text, as vLLM carries it) plans an AWRS
    request whose spec is the tag; one llguidance cannot express fails naming why."""
    from vllm.sampling_params import SamplingParams, StructuredOutputsParams

    from tether.decode.policy import Limits, Options, plan

    def planned(tag):
        params = SamplingParams(structured_outputs=StructuredOutputsParams(
            structural_tag=json.dumps(tag)))
        return plan(params, {"type": "token", "prompt_token_ids": [1, 2]},
                    Options(sampler="awrs"), Limits(), None)

    p = planned(tag_of(TRIGGERED))
    assert normalize(p.spec) == normalize(StructuralTag(TRIGGERED))
    assert Constraint.from_spec(p.spec, smollm2_vocab).engine == "llguidance"
    xml = planned(vllm_tag("qwen_3_5", "required").model_dump())
    with pytest.raises(ConstraintError, match="'qwen_xml' style"):
        Constraint.from_spec(xml.spec, smollm2_vocab)
