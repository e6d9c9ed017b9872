"""P-Aligner pre-alignment: the template and its grammar, the guards, the cache, and the three
ways in (Python, the CLI, `tether serve --pre-align` through a real OpenAI client)."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tether import Constraint, Grammar
from tether.alignment.prealign import (ANSWER_PREFIX, END_MARKER, REWRITE_TEMPLATE, PreAligner,
                                       RewriteCache, Rewrite, enforceable_span, missing_span,
                                       parse_rewrite, protected_spans, replace_last_user_turn,
                                       rewrite_grammar, user_text)

INSTRUCTION = "Summarize https://example.org/report in 3 bullet points and quote \"net zero\"."


def test_template_is_p_aligners():
    text = REWRITE_TEMPLATE.format(instruction="Tell me a joke.")
    assert text.startswith("You are an expert prompt engineer. Please help me optimize this "
                           "prompt to get better response:\n\n[The Start of Raw Prompt]\n")
    assert text.endswith("Tell me a joke.\n[The End of Raw Prompt]")
    assert ANSWER_PREFIX == "The Optimized Prompt:\n\n[The Start of Optimized Prompt]\n"
    assert END_MARKER == "\n[The End of Optimized Prompt]"


def test_parse():
    assert parse_rewrite("Tell me a funny joke." + END_MARKER) == "Tell me a funny joke."
    assert parse_rewrite("no marker at all") is None


def test_protected_spans():
    text = ('Write "hello world" 3 times, see https://a.b/c?d=1 and `x = 2` at 10:30, '
            "```py\nprint(1)\n```")
    assert protected_spans(text) == ['"hello world"', "3", "https://a.b/c?d=1", "`x = 2`",
                                     "10:30", "```py\nprint(1)\n```"]
    assert missing_span(INSTRUCTION, "Summarize the report in three bullets.") == \
        "https://example.org/report"
    assert missing_span(INSTRUCTION, 'Read https://example.org/report; 3 bullets; "net zero".') \
        is None


def _walk(constraint, vocab, text):
    state = constraint.start()
    for t in vocab.hf.encode(text, add_special_tokens=False):
        if not constraint.allows(state, t):
            return "refused"
        state = constraint.advance(state, t)
    return "complete" if constraint.is_complete(state) else "open"


def test_grammar_ends_every_rewrite_with_the_marker(smollm2_vocab):
    c = Constraint.from_spec(Grammar(rewrite_grammar(60)), smollm2_vocab)
    assert _walk(c, smollm2_vocab, "A clearer instruction." + END_MARKER) == "complete"
    assert _walk(c, smollm2_vocab, "x" * 61 + END_MARKER) == "refused"  # bounded length
    assert _walk(c, smollm2_vocab, "a" + END_MARKER + " more") == "refused"  # first marker ends
    assert _walk(c, smollm2_vocab, "x" * 60) == "open"  # only the marker can follow now


def test_grammar_demands_a_single_short_span(smollm2_vocab):
    assert enforceable_span("Give 3 reasons.") == "3"
    c = Constraint.from_spec(Grammar(rewrite_grammar(60, "3")), smollm2_vocab)
    assert _walk(c, smollm2_vocab, "List 3 reasons." + END_MARKER) == "complete"
    assert _walk(c, smollm2_vocab, "List reasons." + END_MARKER) == "open"  # not the end yet
    assert _walk(c, smollm2_vocab, "x" * 60) == "refused"  # no room left for the span
    state = c.start()
    for t in smollm2_vocab.hf.encode("x" * 59, add_special_tokens=False):
        state = c.advance(state, t)
    allowed = c.mask(state).nonzero()[0].tolist()
    assert allowed and all(smollm2_vocab.hf.decode([t]).startswith("3") for t in allowed)
    # two spans, or a long one, blow up llguidance's lexer at real lengths: checked at the end
    assert enforceable_span("Give 3 reasons, see https://x.org/a.") is None
    assert enforceable_span('Quote "' + "a" * 40 + '".') is None


def test_the_token_budget_holds_for_any_characters(smollm2_vocab):
    from tether.alignment.prealign import chars_for_tokens, tokens_for_chars

    for text in ("plain words " * 20, "今天天气很好" * 20, "🙂é" * 40):
        ids = smollm2_vocab.hf.encode(text + END_MARKER, add_special_tokens=False)
        assert len(ids) <= tokens_for_chars(len(text)), text[:12]
    assert tokens_for_chars(chars_for_tokens(500)) <= 500
    assert PreAligner(max_chars=100).max_tokens == tokens_for_chars(100)


class _FixedEmbedder:
    def __init__(self, value):
        self.value = value

    def similarity(self, a, b):
        return self.value


def test_guards_fall_back_with_a_reason():
    aligner = PreAligner(embedder=_FixedEmbedder(0.9))
    ok = aligner.finish("m", INSTRUCTION, 'Read https://example.org/report and give 3 bullets '
                        'quoting "net zero".' + END_MARKER, 0.5)
    assert ok.used and ok.reason is None and ok.text != INSTRUCTION
    dropped = aligner.finish("m", "Name 7 colours.", "Name some colours." + END_MARKER, 0.5)
    assert not dropped.used and dropped.reason == "missing span: 7"
    assert dropped.text == "Name 7 colours."  # the raw instruction is answered
    far = PreAligner(embedder=_FixedEmbedder(0.2)).finish("m", "Tell a joke.",
                                                          "Write a poem." + END_MARKER, 0.1)
    assert not far.used and far.reason.startswith("similarity 0.20 < 0.60")
    unguarded = PreAligner(guards=False).finish("m", "Name 7 colours.",
                                                "Name colours." + END_MARKER, 0.1)
    assert unguarded.used
    assert PreAligner(guards=False).finish("m", "x", None, 1.0, "timeout").reason == \
        "rewriter error: timeout"


def test_similarity_embedder_is_real():
    from tether.alignment.prealign import Embedder

    e = Embedder()
    near = e.similarity("A man is eating food.", "Someone is having a meal.")
    far = e.similarity("A man is eating food.", "The stock market fell sharply today.")
    assert near > 0.6 > 0.1 > far


def test_cache(tmp_path):
    path = tmp_path / "rewrites.jsonl"
    aligner = PreAligner(embedder=_FixedEmbedder(0.9), cache_path=path, cache_size=2)
    assert aligner.lookup("m", "Tell a joke.") is None
    aligner.finish("m", "Tell a joke.", "Tell a funny joke." + END_MARKER, 0.4)
    hit = aligner.lookup("m", "Tell a joke.")
    assert hit.cached and hit.seconds == 0.0 and hit.text == "Tell a funny joke."
    assert aligner.lookup("other rewriter", "Tell a joke.") is None
    assert aligner.cache.hits == 1 and aligner.cache.misses == 2
    again = PreAligner(embedder=_FixedEmbedder(0.9), cache_path=path)  # read back from disk
    assert again.lookup("m", "Tell a joke.").rewrite == "Tell a funny joke."
    small = RewriteCache(size=2)
    for i in range(3):
        small.put(str(i), {"raw": str(i)})
    assert small.get("0") is None and small.get("2") is not None  # least recently used out


def test_only_the_last_user_turn_is_touched():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "text", "text": "second"}]}]
    assert user_text(messages) == "second"
    out = replace_last_user_turn(messages, "SECOND")
    assert out[3]["content"] == "SECOND" and out[:3] == messages[:3]
    assert messages[3]["content"] == [{"type": "text", "text": "second"}]  # a copy
    # malformed turns (a client's, before vLLM validates them) are not ours to rewrite
    assert user_text([1, "x", {"role": "user", "content": ["text", 3]}]) is None
    assert user_text([{"role": "user", "content": [{"type": "image_url"}, "t"]}]) is None
    assert user_text(["junk", {"role": "user", "content": "hi"}]) == "hi"


@pytest.mark.engine
def test_python_api_rewrites_then_answers(llm):
    from tether.decode.prealign import align_sync

    aligner = PreAligner()
    rewrites = align_sync(aligner, ["Name 3 fruits.", "Tell me about the sea.",
                                    "Name 3 fruits."], llm)
    for r in rewrites:
        assert isinstance(r, Rewrite) and r.rewrite is not None  # the format never fails
        assert r.reason is None or r.reason.startswith(("missing span", "similarity", "unchan"))
    if rewrites[0].used:  # the guards keep the number
        assert "3" in rewrites[0].text
    assert rewrites[0].rewrite == rewrites[2].rewrite  # identical instructions: one rewrite
    again = align_sync(aligner, ["Name 3 fruits."], llm)[0]
    assert again.cached and again.seconds == 0.0
    results = llm.generate([[{"role": "system", "content": "Answer briefly."},
                             {"role": "user", "content": "Tell me about the sea."}]],
                           max_tokens=16, seed=0, pre_align=aligner)
    assert results[0].pre_align.raw == "Tell me about the sea."
    assert results[0].pre_align.cached  # rewritten above


def test_cli_align(tmp_path):
    tether_cli = str(Path(sys.executable).parent / "tether")
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in [
        {"id": 1, "instruction": "Name 2 planets."},
        {"id": 2, "context": [{"role": "user", "content": "Describe rain."}]},
        "Tell a joke."]) + "\n")
    out = tmp_path / "out.jsonl"
    run = subprocess.run([tether_cli, "align", "--input", str(src), "--output", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line.get("id") for line in lines] == [1, 2, None]
    assert [line["raw"] for line in lines] == ["Name 2 planets.", "Describe rain.",
                                               "Tell a joke."]
    for line in lines:
        assert set(line) >= {"raw", "rewrite", "used", "reason", "similarity", "seconds"}
        assert line["rewrite"] is not None and (line["used"] or line["reason"])
    bad = subprocess.run([tether_cli, "align"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "give one instruction" in bad.stderr


@pytest.mark.engine
def test_serve_pre_align_through_openai(tmp_path_factory):
    from conftest import SERVER_ARGS, TETHER, free_port, openai_client, running

    port = free_port()
    cmd = [TETHER, "serve", *SERVER_ARGS, "--host", "127.0.0.1", "--port", str(port),
           "--pre-align"]
    with running([cmd], tmp_path_factory.mktemp("serve-prealign"), port) as (base, _):
        client = openai_client(base)
        messages = [{"role": "system", "content": "You answer in one line."},
                    {"role": "user", "content": "Name 3 colours."}]
        r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16,
                                           seed=0)
        info = r.model_extra["tether"]["pre_align"]
        assert info["raw"] == "Name 3 colours." and info["rewrite"] is not None
        assert info["used"] or info["reason"]
        assert info["seconds"] > 0 and not info["cached"]
        again = client.chat.completions.create(model="smollm2", messages=messages,
                                               max_tokens=16, seed=0)
        assert again.model_extra["tether"]["pre_align"]["cached"]
        opted_out = client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=16, seed=0,
            extra_body={"vllm_xargs": {"tether_pre_align": False}})
        assert "tether" not in (opted_out.model_extra or {})
        constrained = client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=24, seed=0,
            response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": {
                "type": "object", "properties": {"c": {"type": "string"}}, "required": ["c"]}}})
        ext = constrained.model_extra["tether"]
        assert "pre_align" in ext and "choices" in ext  # both stages report
        # two clients with the same new instruction at once: one rewrite, shared
        same = [{"role": "user", "content": "Name 4 rivers."}]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            both = list(pool.map(lambda _: client.chat.completions.create(
                model="smollm2", messages=same, max_tokens=8, seed=0), range(2)))
        shared = [b.model_extra["tether"]["pre_align"] for b in both]
        assert sorted(x["cached"] for x in shared) == [False, True]
        assert shared[0]["rewrite"] == shared[1]["rewrite"]
