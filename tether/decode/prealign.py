"""Pre-alignment's engine calls: decoding rewrites (``alignment.prealign`` holds the template,
guards and cache).

A rewrite is itself a constrained generation: the rewriter's prompt is the P-Aligner exchange
with the assistant turn started (``ANSWER_PREFIX``), decoded greedily under the rewrite grammar
(``rewrite_grammar``: bounded length, the end marker last, the instruction's spans demanded
where few). Where it runs:

* ``self``: on the engine that answers, in the same batch as the other requests (``LLM``:
  all prompts' rewrites in one ``generate``; the server: engine requests beside the others);
* a model (registered name, directory, hub id): on an engine of its own (``LLM`` for the
  Python API, an ``AsyncLLM`` in the server);
* a URL: an OpenAI-compatible server run by vLLM or tether, which gets the grammar as
  ``structured_outputs`` and the started assistant turn through vLLM's
  ``continue_final_message``.

Identical instructions are rewritten once per batch, and looked up in the aligner's cache
first. The time a rewrite took (its batch's wall time) is recorded: it is the latency that
pre-alignment adds.
"""

from __future__ import annotations

import time
from typing import Any

from tether.alignment.prealign import (ANSWER_PREFIX, PreAligner, Rewrite, chars_for_tokens,
                                       enforceable_span, rewrite_grammar, rewriter_messages)


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


def grammar_for(aligner: PreAligner, instruction: str, room: int | None = None,
                demand: bool = True) -> str:
    """The rewrite grammar for ``instruction``; ``room``: tokens left in the rewriter's context
    after its prompt (the body shrinks to fit, so that the marker always fits too);
    ``demand=False``: the plain grammar, for the retry of a decode that did not end."""
    chars = aligner.max_chars if room is None else min(aligner.max_chars, chars_for_tokens(room))
    return rewrite_grammar(chars, demanded_span(aligner, instruction) if demand else None)


def is_url(rewriter: str) -> bool:
    return rewriter.startswith(("http://", "https://"))


def rewriter_id(aligner: PreAligner, model: str | None) -> str:
    """What identifies the rewriter in the cache: the served model for "self"."""
    return str(model) if aligner.rewriter == "self" else aligner.rewriter


def align_sync(aligner: PreAligner, instructions: list[str], llm: Any = None) -> list[Rewrite]:
    """Rewrites of ``instructions``; ``llm`` (a ``tether.LLM``) is the "self" rewriter."""
    if aligner.rewriter == "self" and llm is None:
        raise ValueError('the "self" rewriter needs the model that answers: pass its LLM')
    rid = rewriter_id(aligner, llm.model_path if llm is not None else None)
    results: list[Rewrite | None] = [aligner.lookup(rid, x) for x in instructions]
    todo = sorted({x for x, r in zip(instructions, results) if r is None})
    if todo:
        t0 = time.perf_counter()
        if is_url(aligner.rewriter):
            generated = [_http_rewrite(aligner, x) for x in todo]
            generated = [_http_rewrite(aligner, x, demand=False)
                         if error and demanded_span(aligner, x) else (text, error)
                         for x, (text, error) in zip(todo, generated)]
        else:
            engine = llm if aligner.rewriter == "self" else _own_llm(aligner)
            generated = _generate(aligner, engine, todo)
            redo = [i for i, (x, (_, error)) in enumerate(zip(todo, generated))
                    if error and demanded_span(aligner, x)]
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
    generate."""
    from tether import Grammar

    room = engine.engine.args.get("max_model_len", 4096)
    prompts = [rewriter_prompt_ids(engine.tokenizer, x) for x in instructions]
    grammars = [Grammar(grammar_for(aligner, x, room - len(p), demand))
                for x, p in zip(instructions, prompts)]
    longest = max(room - len(p) for p in prompts)  # each grammar ends its rewrite in its room
    outs = engine.generate(prompts, grammars, max_tokens=min(aligner.max_tokens, longest),
                           temperature=0.0, seed=0)
    return [(out.text, None) if out.finish_reason == "stop" else
            (out.text, f"the rewrite ended with {out.finish_reason}") for out in outs]


def _own_llm(aligner: PreAligner) -> Any:
    """The rewriter model's engine, built once per aligner."""
    engine = getattr(aligner, "_engine", None)
    if engine is None:
        from tether.decode.llm import LLM

        engine = aligner._engine = LLM(aligner.rewriter)
    return engine


def url_request(aligner: PreAligner, instruction: str, model: str,
                demand: bool = True) -> dict:
    """The chat-completions body that asks a vLLM or tether server for a rewrite."""
    return {"model": model,
            "messages": rewriter_messages(instruction) + [
                {"role": "assistant", "content": ANSWER_PREFIX}],
            "continue_final_message": True, "add_generation_prompt": False,
            "temperature": 0.0, "max_tokens": aligner.max_tokens,
            "structured_outputs": {"grammar": grammar_for(aligner, instruction,
                                                          demand=demand)}}


def _reply(reply: dict) -> tuple[str | None, str | None]:
    """(the rewrite's decoded text, error or None) from a chat-completions reply."""
    choice = reply["choices"][0]
    text = choice["message"]["content"] or ""
    text = text[len(ANSWER_PREFIX):] if text.startswith(ANSWER_PREFIX) else text
    if choice.get("finish_reason") != "stop":
        return text, f"the rewrite ended with {choice.get('finish_reason')}"
    return text, None


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
