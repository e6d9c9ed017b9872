"""The HTTP layer of ``tether serve``: a middleware (vLLM's ``--middleware``) around every
request.

For each HTTP request it

1. opens the request's scope (``server.REQUEST_SCOPE``, a context variable, so that nothing is
   looked up by a client's request id): the particle limit is counted there, and the engine
   client leaves each ``generate`` call's ``tether`` field there;
2. with ``--pre-align``, rewrites the last user turn of a chat request, once vLLM's own request
   model has accepted the body (a request vLLM will refuse costs no rewrite); a request opts
   out with ``vllm_xargs: {"tether_pre_align": false}``;
3. refuses, on a chat or Responses request with ``tools``, a function tool whose parameters
   are not a valid JSON Schema, naming it (``policy.check_tools``), before vLLM builds a
   structural tag from it;
4. adds the ``tether`` field to the JSON response (one dict, or a list with one per prompt for
   ``/v1/completions`` and batches), with non-finite numbers as null; the pre-alignment's
   report goes there too, without whether it was cached or how long it took. A streamed
   response (server-sent events) gets it in one more event, the last before ``data: [DONE]``:
   a chunk with the stream's ``id``, ``object``, ``created`` and ``model``, no choices, and the
   ``tether`` field (the OpenAI client yields it as a chunk whose ``choices`` is empty);
5. refreshes the records gauge before ``/metrics`` answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any

from pydantic_core import to_jsonable_python

from tether.decode.policy import RequestError, RequestScope, check_tools
from tether.decode.server import REQUEST_SCOPE, TetherEngineClient

log = logging.getLogger("tether.serve")

CLIENT: TetherEngineClient | None = None  # the server's engine client (set by decode.serve)
CHAT_PATH = "/v1/chat/completions"
TOOL_PATHS = (CHAT_PATH, "/v1/responses")  # the endpoints whose requests carry tools
DONE = b"data: [DONE]"


async def tether_fields(request: Any, call_next: Any) -> Any:
    """The middleware (see the module docstring)."""
    from starlette.responses import Response

    client = CLIENT
    if client is None:
        return await call_next(request)
    path = request.url.path
    if path == "/metrics":
        try:
            await client.count_records()
        except Exception as e:  # /metrics must answer even when an engine does not
            log.warning("could not count particle records: %s", e)
    scope = RequestScope(path, client.settings.limits.max_particles)
    token = REQUEST_SCOPE.set(scope)
    try:
        if request.method == "POST" and path in TOOL_PATHS:
            refusal = await _check_tools(client, request)
            if refusal is not None:
                return refusal
        if client.aligner is not None and request.method == "POST" and path == CHAT_PATH:
            scope.rewrite = await _pre_align_body(client, request)
        response = await call_next(request)
    finally:
        REQUEST_SCOPE.reset(token)
    media_type = response.headers.get("content-type", "").split(";")[0]
    if media_type == "text/event-stream":
        return _with_stream_field(response, scope)
    field = _field(scope)
    if field is None or media_type != "application/json":
        return response
    body = b"".join([chunk async for chunk in response.body_iterator])
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and "error" not in data:
        data["tether"] = field
        body = json.dumps(to_jsonable_python(data, inf_nan_mode="null"),
                          allow_nan=False).encode()
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    return Response(body, status_code=response.status_code, headers=headers,
                    media_type="application/json")


def _with_stream_field(response: Any, scope: RequestScope) -> Any:
    """``response`` (server-sent events) with the ``tether`` field in an event of its own
    before ``data: [DONE]``, once the stream's requests have finished (none: unchanged)."""
    from starlette.responses import StreamingResponse

    async def events():
        last = None  # the last JSON event: its id, object, created and model are reused
        async for chunk in response.body_iterator:
            data = chunk.encode() if isinstance(chunk, str) else chunk
            done = data.find(DONE)
            last = _last_event(data if done < 0 else data[:done]) or last
            if done >= 0:
                try:
                    event = json.loads(last[len(b"data: "):]) if last is not None else None
                except ValueError:
                    event = None
                field = _field(scope)
                if field is not None and isinstance(event, dict) and "error" not in event:
                    event = {k: event[k] for k in ("id", "object", "created", "model")
                             if k in event}
                    event.update(choices=[], tether=field)
                    text = json.dumps(to_jsonable_python(event, inf_nan_mode="null"),
                                      allow_nan=False)
                    data = data[:done] + f"data: {text}\n\n".encode() + data[done:]
            yield data

    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    return StreamingResponse(events(), status_code=response.status_code, headers=headers,
                             media_type="text/event-stream")


def _last_event(data: bytes) -> bytes | None:
    """The last ``data: {...}`` line of ``data`` (None if there is none)."""
    for line in reversed(data.splitlines()):
        if line.startswith(b"data: {"):
            return line
    return None


async def _check_tools(client: TetherEngineClient, request: Any) -> Any:
    """A 400 response naming the first malformed tool of the request (``policy.check_tools``),
    or None."""
    from starlette.responses import JSONResponse

    body = await request.body()
    if b'"tools"' not in body:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None  # vLLM answers the malformed body itself
    try:
        check_tools(data, client.settings.options)
    except RequestError as e:
        return JSONResponse({"error": {"message": str(e), "type": "BadRequestError",
                                       "param": e.parameter, "code": 400}}, status_code=400)
    return None


def _field(scope: RequestScope) -> dict | list | None:
    """The ``tether`` field of the request: its engine calls' fields (one per prompt, in
    prompt order) and the pre-alignment's report."""
    fields = [scope.fields[k] for k in sorted(scope.fields, key=_prompt_index)]
    field: dict | list | None = None
    if len(fields) == 1:
        field = dict(fields[0])
    elif fields:
        field = fields
    if scope.rewrite is not None:
        field = dict(field if isinstance(field, dict) else {},
                     pre_align=scope.rewrite.public_dict())
    return field


def _prompt_index(request_id: str) -> tuple[int, str]:
    """vLLM numbers a request's prompts ``{id}-{i}`` (completions) or ``{id}_{i}`` (batch)."""
    match = re.search(r"[-_](\d+)$", request_id)
    return (int(match.group(1)), request_id) if match else (0, request_id)


def client_identity(request: Any) -> str:
    """Who is asking, for the rewrite cache: a hash of the credentials the client sent (the
    same for every client of a server without --api-key)."""
    credentials = request.headers.get("authorization", "")
    return hashlib.sha256(credentials.encode()).hexdigest()[:16]


async def _pre_align_body(client: TetherEngineClient, request: Any) -> Any:
    """Rewrite the last user turn of a chat request's body in place; returns the Rewrite, or
    None (opted out, no text turn, or a body vLLM will refuse)."""
    from tether.alignment.prealign import replace_last_user_turn, user_text

    try:
        data = json.loads(await request.body())
    except ValueError:
        return None  # vLLM answers the malformed body itself
    if not isinstance(data, dict):
        return None
    xargs = data.get("vllm_xargs")
    enabled = True
    if isinstance(xargs, dict) and "tether_pre_align" in xargs:
        enabled = xargs.pop("tether_pre_align") is not False
    rewrite = None
    if enabled and _valid_chat_request(data):
        text = user_text(data["messages"])
        if text is not None:
            rewrite = await client.pre_align(text, client_identity(request))
            data["messages"] = replace_last_user_turn(data["messages"], rewrite.text)
    body = json.dumps(data).encode()
    request._body = body  # what the app downstream receives (starlette's cached body)
    request.scope["headers"] = [(k, v) for k, v in request.scope["headers"]
                                if k.lower() != b"content-length"] + [
        (b"content-length", str(len(body)).encode())]
    return rewrite


def _valid_chat_request(data: dict) -> bool:
    """Whether vLLM's own chat request model and sampling parameters accept ``data`` (else
    vLLM answers 400, and no rewrite is paid for)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.exceptions import VLLMClientError

    try:  # pydantic's ValidationError is a ValueError
        request = ChatCompletionRequest.model_validate(data)
        request.to_sampling_params(request.max_completion_tokens or request.max_tokens or 1, {})
    except (ValueError, TypeError, VLLMClientError):
        return False
    return True
