"""Pre-alignment's engine calls: how a rewrite is decoded (``alignment.prealign`` holds the
template, guards and cache).

A rewrite is itself a constrained generation: the rewriter's prompt is the P-Aligner exchange
with the assistant turn started (``ANSWER_PREFIX``), decoded greedily under the rewrite grammar
(``rewrite_grammar``: a body bounded in proportion to the instruction, the end marker last, the
instruction's span demanded where there is one short one). One description of that decode
(``rewrite_job``) serves every rewriter:

* ``self``: the engine that answers, in the same batch as the other requests (``LLM``: all
  prompts' rewrites in one ``generate``; the server: engine requests beside the others);
* a model (registered name, directory, hub id): an engine of its own (the caller builds it: an
  ``LLM`` for the Python API, an ``AsyncLLM`` in the server);
* a URL: an OpenAI-compatible server run by vLLM or tether (``url_request``), which gets the
  grammar as ``structured_outputs``, the started assistant turn through vLLM's
  ``continue_final_message``, and ``tether_pre_align: false`` so that a tether server there
  does not pre-align the rewrite request in turn (which would recurse when the URL is the
  server itself, or two servers point at each other).

A decode under the demanding grammar that did not end is redone under the plain one
(``needs_plain_retry``), which always can. Identical instructions are rewritten once per batch
and looked up in the aligner's cache first. The time a rewrite took (its batch's wall time) is
recorded: it is the latency that pre-alignment adds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tether.alignment.prealign import (ANSWER_PREFIX, MIN_REWRITE_CHARS, PreAligner, Rewrite,
                                       chars_for_tokens, enforceable_span, rewrite_grammar,
                                       rewriter_messages, tokens_for_chars)


def rewriter_prompt_ids(tokenizer: Any, instruction: str) -> list[int]:
    """Token ids of the rewriter's prompt: its chat template with the assistant turn started
    (a model without a chat template gets the exchange as plain text)."""
    messages = rewriter_messages(instruction)
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        ids = list(tokenizer.encode(messages[0]["content"] + "\n\n", add_special_tokens=True))
    return ids + list(tokenizer.encode(ANSWER_PREFIX, add_special_tokens=False))


def demanded_span(aligner: PreAligner, instruction: str) -> str | None:
    """The span the rewrite grammar demands for ``instruction`` (with guards only)."""
    return enforceable_span(instruction) if aligner.guards else None


def needs_plain_retry(aligner: PreAligner, instruction: str) -> bool:
    """Whether a failed decode should be redone under the plain grammar (it demanded a span)."""
    return demanded_span(aligner, instruction) is not None


def grammar_for(aligner: PreAligner, instruction: str, room: int | None = None,
                demand: bool = True) -> str:
    """The rewrite grammar for ``instruction``; ``room``: tokens left in the rewriter's context
    after its prompt (the body shrinks to fit, so that the marker always fits too);
    ``demand=False``: the plain grammar, for the retry of a decode that did not end."""
    chars = aligner.body_chars(instruction)
    if room is not None:
        chars = min(chars, chars_for_tokens(room))
    return rewrite_grammar(chars, demanded_span(aligner, instruction) if demand else None)


@dataclass
class RewriteJob:
    """One rewrite to decode greedily: prompt, grammar (a ``tether.Grammar``), token bound; or
    why there is none (``error``)."""

    prompt_ids: list[int]
    grammar: Any
    max_tokens: int
    error: str | None = None


def rewrite_job(aligner: PreAligner, instruction: str, tokenizer: Any, max_model_len: int,
                demand: bool = True) -> RewriteJob:
    """How to decode the rewrite of ``instruction`` on an engine with ``max_model_len``."""
    from tether import Grammar

    prompt_ids = rewriter_prompt_ids(tokenizer, instruction)
    room = max_model_len - len(prompt_ids)
    if chars_for_tokens(room) < MIN_REWRITE_CHARS:
        return RewriteJob(prompt_ids, None, 0,
                          "the instruction leaves the rewriter no room for a rewrite")
    chars = min(aligner.body_chars(instruction), chars_for_tokens(room))
    grammar = Grammar(grammar_for(aligner, instruction, room, demand))
    return RewriteJob(prompt_ids, grammar, min(tokens_for_chars(chars), room))


def outcome(finish_reason: str | None, text: str) -> tuple[str, str | None]:
    """(decoded continuation, error or None) of a finished rewrite decode."""
    if finish_reason != "stop":
        return text, f"the rewrite ended with {finish_reason}"
    return text, None


def is_url(rewriter: str) -> bool:
    return rewriter.startswith(("http://", "https://"))


def rewriter_id(aligner: PreAligner, model: str | None) -> str:
    """What identifies the rewriter in the cache: the served model for "self"."""
    return str(model) if aligner.rewriter == "self" else aligner.rewriter


def align_sync(aligner: PreAligner, instructions: list[str], engine: Any = None,
               model: str | None = None) -> list[Rewrite]:
    """Rewrites of ``instructions``. ``engine`` (a ``tether.LLM``) decodes them: the model
    that answers for "self", the rewriter model's own for a model (None for a URL);
    ``model`` names the answering model (the cache's key for "self")."""
    if not is_url(aligner.rewriter) and engine is None:
        raise ValueError("a rewriter engine is needed: pass the LLM that rewrites")
    rid = rewriter_id(aligner, model or getattr(engine, "model_path", None))
    results: list[Rewrite | None] = [aligner.lookup(rid, x) for x in instructions]
    todo = sorted({x for x, r in zip(instructions, results) if r is None})
    if todo:
        t0 = time.perf_counter()
        if is_url(aligner.rewriter):
            generated = [_http_rewrite(aligner, x) for x in todo]
            generated = [_http_rewrite(aligner, x, demand=False)
                         if error and needs_plain_retry(aligner, x) else (text, error)
                         for x, (text, error) in zip(todo, generated)]
        else:
            generated = _generate(aligner, engine, todo)
            redo = [i for i, (x, (_, error)) in enumerate(zip(todo, generated))
                    if error and needs_plain_retry(aligner, x)]
            if redo:  # the demanding grammar left no way to end: the plain one always has
                again = _generate(aligner, engine, [todo[i] for i in redo], demand=False)
                for i, out in zip(redo, again):
                    generated[i] = out
        seconds = time.perf_counter() - t0
        done = {x: aligner.finish(rid, x, text, seconds, error)
                for x, (text, error) in zip(todo, generated)}
        results = [r if r is not None else done[x] for x, r in zip(instructions, results)]
    return results  # type: ignore[return-value]


def _generate(aligner: PreAligner, engine: Any, instructions: list[str], demand: bool = True):
    """[(decoded continuation, error or None)] from one batched, greedy, constrained
    generate on ``engine`` (a ``tether.LLM``)."""
    max_len = engine.engine.args.get("max_model_len", 4096)
    jobs = [rewrite_job(aligner, x, engine.tokenizer, max_len, demand) for x in instructions]
    out: list = [(None, job.error) for job in jobs]
    ready = [i for i, job in enumerate(jobs) if job.error is None]
    if ready:
        # one batch: each grammar ends its rewrite within its own bound
        results = engine.generate([jobs[i].prompt_ids for i in ready],
                                  [jobs[i].grammar for i in ready],
                                  max_tokens=max(jobs[i].max_tokens for i in ready),
                                  temperature=0.0, seed=0)
        for i, r in zip(ready, results):
            out[i] = outcome(r.finish_reason, r.text)
    return out


def url_request(aligner: PreAligner, instruction: str, model: str,
                demand: bool = True) -> dict:
    """The chat-completions body that asks a vLLM or tether server for a rewrite."""
    return {"model": model,
            "messages": rewriter_messages(instruction) + [
                {"role": "assistant", "content": ANSWER_PREFIX}],
            "continue_final_message": True, "add_generation_prompt": False,
            "temperature": 0.0,
            "max_tokens": tokens_for_chars(aligner.body_chars(instruction)),
            "structured_outputs": {"grammar": grammar_for(aligner, instruction, demand=demand)},
            "vllm_xargs": {"tether_pre_align": False}}


def _reply(reply: dict) -> tuple[str | None, str | None]:
    """(the rewrite's decoded text, error or None) from a chat-completions reply."""
    choice = reply["choices"][0]
    text = choice["message"]["content"] or ""
    text = text[len(ANSWER_PREFIX):] if text.startswith(ANSWER_PREFIX) else text
    return outcome(choice.get("finish_reason"), text)


def _http_rewrite(aligner: PreAligner, instruction: str,
                  demand: bool = True) -> tuple[str | None, str | None]:
    import httpx

    base = aligner.rewriter.rstrip("/")
    try:
        model = httpx.get(base + "/v1/models", timeout=60).json()["data"][0]["id"]
        r = httpx.post(base + "/v1/chat/completions",
                       json=url_request(aligner, instruction, model, demand), timeout=600)
        r.raise_for_status()
        return _reply(r.json())
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        return None, f"{type(e).__name__}: {str(e)[:200]}"


async def http_rewrite_async(aligner: PreAligner, instruction: str, client: Any,
                             demand: bool = True) -> tuple[str | None, str | None]:
    import httpx

    base = aligner.rewriter.rstrip("/")
    try:
        model = (await client.get(base + "/v1/models", timeout=60)).json()["data"][0]["id"]
        r = await client.post(base + "/v1/chat/completions",
                              json=url_request(aligner, instruction, model, demand), timeout=600)
        r.raise_for_status()
        return _reply(r.json())
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        return None, f"{type(e).__name__}: {str(e)[:200]}"
