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

# why a rewrite may go unused, as PreAligner.judge words it
REASONS = ("missing span", "similarity", "unchanged", "empty rewrite", "rewriter error",
           "guard error", "busy", "format", "the instruction leaves")
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


def test_a_rewrite_is_bounded_by_its_instruction(smollm2_vocab):
    """The body may grow REWRITE_GROWTH times the instruction (at least MIN_BODY_CHARS, at most
    max_chars), and the job's token bound follows the body, not the maximum."""
    from tether.alignment.prealign import MIN_BODY_CHARS, REWRITE_GROWTH, tokens_for_chars
    from tether.decode.prealign import rewrite_job

    aligner = PreAligner(max_chars=2000, guards=False)
    assert aligner.body_chars("Hi.") == MIN_BODY_CHARS
    assert aligner.body_chars("x" * 100) == REWRITE_GROWTH * 100
    assert aligner.body_chars("x" * 5000) == 2000
    short = rewrite_job(aligner, "Name 3 fruits.", smollm2_vocab.hf, 4096)
    long = rewrite_job(aligner, "Describe the sea. " * 20, smollm2_vocab.hf, 16384)
    assert short.max_tokens == tokens_for_chars(MIN_BODY_CHARS) < long.max_tokens
    assert "{1,256}" in short.grammar.text and "{1,1440}" in long.grammar.text
    tight = rewrite_job(aligner, "Name 3 fruits.", smollm2_vocab.hf, 120)  # a small context
    assert tight.max_tokens <= 120 - len(tight.prompt_ids)
    assert rewrite_job(aligner, "x " * 100, smollm2_vocab.hf, 64).error is not None


def test_protected_spans_scale_with_the_message():
    """A long message of numbers: every number found, in a time linear up to a log factor
    (the pairwise test this replaced took 18 s on 40 KB): 4x the text, at most 8x the time."""
    import time

    def seconds(n):
        text = " ".join(str(i) for i in range(n))
        t0 = time.perf_counter()
        spans = protected_spans(text)
        assert len(spans) == n
        return time.perf_counter() - t0

    small, large = min(seconds(2000) for _ in range(3)), min(seconds(8000) for _ in range(3))
    assert large < 8 * small + 0.05
    # nested kinds are still dropped: the number inside the URL and the one in the quote
    assert protected_spans('see https://a.b/12 and "q 3" then 4') == [
        "https://a.b/12", '"q 3"', "4"]


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


class _BrokenEmbedder:
    def similarity(self, a, b):
        raise RuntimeError("embedding model failed")


def test_a_failing_guard_answers_the_raw_instruction_and_is_not_cached():
    aligner = PreAligner(embedder=_BrokenEmbedder())
    r = aligner.finish("m", "Tell a joke.", "Tell a funny joke." + END_MARKER, 0.1)
    assert not r.used and r.text == "Tell a joke."
    assert r.reason == "guard error: RuntimeError: embedding model failed"
    assert aligner.lookup("m", "Tell a joke.") is None  # the next request tries again


def test_clients_do_not_share_rewrites_and_responses_do_not_say_cached():
    aligner = PreAligner(embedder=_FixedEmbedder(0.9))
    aligner.finish("m", "Tell a joke.", "Tell a funny joke." + END_MARKER, 0.4, client="alice")
    assert aligner.lookup("m", "Tell a joke.", client="bob") is None
    hit = aligner.lookup("m", "Tell a joke.", client="alice")
    assert hit.cached and "cached" not in hit.public_dict() and \
        "seconds" not in hit.public_dict()


def test_url_rewrites_opt_out_of_the_rewriters_own_pre_alignment():
    from tether.decode.prealign import url_request

    body = url_request(PreAligner(guards=False), "Tell a joke.", "m")
    assert body["vllm_xargs"] == {"tether_pre_align": False}


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
        assert (r.reason is None) == r.used
        assert r.used or r.reason.startswith(("missing span", "similarity", "unchanged"))
    if rewrites[0].used:  # the guards keep the number
        assert "3" in rewrites[0].text
    assert rewrites[0].rewrite == rewrites[2].rewrite  # identical instructions: one rewrite
    again = align_sync(aligner, ["Name 3 fruits."], llm)[0]
    assert again.cached and again.seconds == 0.0 and again.rewrite == rewrites[0].rewrite
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
        assert line["rewrite"] is not None
        assert (line["reason"] is None) == line["used"]  # a reason exactly when not used
        assert line["used"] or line["reason"].startswith(REASONS)
    bad = subprocess.run([tether_cli, "align"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "give one instruction" in bad.stderr


@pytest.mark.engine
def test_serve_pre_align_through_openai(tmp_path_factory):
    from conftest import SERVER_ARGS, TETHER, free_port, metric, openai_client, running
    from tether.constraints import vocab_for

    port = free_port()
    cmd = [TETHER, "serve", *SERVER_ARGS, "--host", "127.0.0.1", "--port", str(port),
           "--pre-align"]
    hf = vocab_for("smollm2").hf
    with running([cmd], tmp_path_factory.mktemp("serve-prealign"), port) as (base, _):
        client = openai_client(base)
        messages = [{"role": "system", "content": "You answer in one line."},
                    {"role": "user", "content": "Name 3 colours."}]
        r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16,
                                           seed=0, extra_body={"return_token_ids": True})
        info = r.model_extra["tether"]["pre_align"]
        assert info["raw"] == "Name 3 colours." and info["rewrite"] is not None
        assert (info["reason"] is None) == info["used"]  # a reason exactly when not used
        assert info["used"] or info["reason"].startswith(REASONS)
        # nothing tells a client whether someone asked the same before
        assert "cached" not in info and "seconds" not in info
        # the engine answered the text the field reports: the rewrite when used
        prompt = hf.decode(r.model_extra["prompt_token_ids"])
        answered = info["rewrite"] if info["used"] else info["raw"]
        assert answered in prompt and "You answer in one line." in prompt
        if info["used"] and info["raw"] not in info["rewrite"]:
            assert info["raw"] not in prompt
        hits = metric(base, "tether_prealign_cache_hits_total")
        again = client.chat.completions.create(model="smollm2", messages=messages,
                                               max_tokens=16, seed=0)
        assert again.model_extra["tether"]["pre_align"]["rewrite"] == info["rewrite"]
        assert metric(base, "tether_prealign_cache_hits_total") == hits + 1
        # another client (other credentials) gets its own rewrite, not the first one's entry
        other = openai_client(base, api_key="someone-else")
        other.chat.completions.create(model="smollm2", messages=messages, max_tokens=4, seed=0)
        assert metric(base, "tether_prealign_cache_hits_total") == hits + 1
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
        # a body vLLM refuses costs no rewrite
        import openai

        rewrites = metric(base, "tether_prealign_rewrites_total")
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.chat.completions.create(model="smollm2", max_tokens=-4, messages=[
                {"role": "user", "content": "Name 5 birds."}])
        assert metric(base, "tether_prealign_rewrites_total") == rewrites
        # the same client with the same new instruction twice at once: one rewrite, shared
        same = [{"role": "user", "content": "Name 4 rivers."}]
        hits = metric(base, "tether_prealign_cache_hits_total")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            both = list(pool.map(lambda _: client.chat.completions.create(
                model="smollm2", messages=same, max_tokens=8, seed=0), range(2)))
        shared = [b.model_extra["tether"]["pre_align"] for b in both]
        assert shared[0]["rewrite"] == shared[1]["rewrite"]
        assert metric(base, "tether_prealign_cache_hits_total") == hits + 1
