"""tether: constrained decoding (AWRS + SMC) and friends, next to vLLM.

Public API:
    generate, LLM, Result (loaded on first use: they import vLLM)
    Constraint, Regex, Grammar, JsonSchema, Choice, Predicate, StructuralTag, ConstraintError
    Canonical(spec): spec, spelled only with the tokenizer's own encodings
    PreAligner, Rewrite: P-Aligner instruction pre-alignment (``generate(..., pre_align=...)``)
    viz.write_html / viz.render_html: an SMC run as an HTML page
"""

from tether.constraints import (Canonical, Choice, Constraint, Grammar, JsonSchema, Predicate, Regex,
                                StructuralTag, TokenVocab, vocab_for)
from tether.errors import ConstraintError, TetherError
from tether.alignment.prealign import PreAligner, Rewrite

__version__ = "0.1.0"

__all__ = [
    "Canonical", "Choice", "Constraint", "ConstraintError", "Grammar", "JsonSchema", "PreAligner",
    "Predicate", "Regex", "Rewrite", "StructuralTag", "TetherError", "TokenVocab", "vocab_for",
]


def __getattr__(name):
    # The engine-side API imports vLLM (seconds); load it only when asked for.
    if name in ("LLM", "Result", "generate"):
        from tether.decode import llm

        return getattr(llm, name)
    if name == "viz":
        import tether.viz

        return tether.viz
    raise AttributeError(f"module 'tether' has no attribute {name!r}")
