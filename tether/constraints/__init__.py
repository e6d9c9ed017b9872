"""Constraint specs and their compiled token-level checkers (see ``base`` for the protocol)."""

from tether.constraints.base import Constraint, compile_constraint
from tether.constraints.specs import (Canonical, Choice, Grammar, JsonSchema, Predicate, Regex, Spec,
                                     StructuralTag, normalize)
from tether.constraints.vocab import TokenVocab, vocab_for

__all__ = [
    "Canonical", "Choice", "Constraint", "Grammar", "JsonSchema", "Predicate", "Regex", "Spec",
    "StructuralTag", "TokenVocab", "compile_constraint", "normalize", "vocab_for",
]
