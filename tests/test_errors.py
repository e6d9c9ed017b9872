"""Malformed specs of every kind raise ConstraintError at compile time, naming the problem."""

from __future__ import annotations

import pytest

from tether import Constraint, ConstraintError, Grammar, Regex


@pytest.mark.parametrize("spec,needle", [
    ({"type": "strnig"}, "/type"),
    ({"properties": {"a": {"minimum": "x"}}}, "/properties/a/minimum"),
    ({"type": "object", "required": "a"}, "/required"),
    ('{"type": "object", ', "did not parse as JSON"),
    ({"$ref": "#/definitions/missing"}, "missing"),
    (Regex("a(b"), "position 3"),
    (Regex("[z-a]"), "position"),
    (Regex("a{2,1}"), "position"),
    (Grammar('start: "x" b\n'), "unknown name"),
    (Grammar('start: "x" (\n'), "line 1, column"),
    (Grammar("   "), "Lark grammar"),
    ("^[a-z]+$", "tether.Regex"),
    (42, "unsupported constraint"),
])
def test_malformed_spec(smollm2_vocab, spec, needle):
    with pytest.raises(ConstraintError) as info:
        Constraint.from_spec(spec, smollm2_vocab)
    assert needle in str(info.value)


def test_error_is_a_value_error():
    # vLLM turns ValueError from request validation into HTTP 400.
    assert issubclass(ConstraintError, ValueError)


def test_outlines_types(smollm2_vocab):
    from outlines import types

    c = Constraint.from_spec(types.Regex(r"[0-9]{3}"), smollm2_vocab)
    assert c.spec.kind == "regex" and c.engine == "llguidance"
    c = Constraint.from_spec(types.JsonSchema({"type": "integer"}), smollm2_vocab)
    assert c.spec.kind == "json_schema"
    c = Constraint.from_spec(types.CFG('start: "a"+\n'), smollm2_vocab)
    assert c.spec.kind == "grammar"
    c = Constraint.from_spec(types.integer, smollm2_vocab)
    assert c.spec.kind == "regex"
