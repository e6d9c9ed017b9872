"""Tool calls for ``LLM.chat``, the way ``tether serve`` makes them: with vLLM's own request
model, tool parsers and structured-output rules, none rewritten here.

1. ``ChatCompletionRequest`` validates the messages, tools and tool choice (a malformed tool
   raises ``ValueError`` naming it, as the server answers 400);
2. the tool parser's ``adjust_request`` (``--tool-call-parser``) turns the tools into the
   request's constraint: a structural tag (hermes, llama, ...: named and "required" always,
   "auto" when a tool is strict or ``tool_strict_level`` says so) or one JSON schema over the
   tools (parsers without a tag, for named and "required"); ``to_sampling_params`` adds a
   ``response_format``; ``policy.spec_from_structured_outputs`` makes it a tether spec (None:
   nothing to constrain, the output is sampled freely);
3. the prompt is the chat template (the model's, or the one given) rendered with the tools;
4. each output is read back by the parser (``Parser.parse``): content, reasoning, calls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class ToolPlan:
    """One chat request, ready to decode: its prompt, constraint and how to read outputs."""

    request: Any  # vLLM's ChatCompletionRequest, after the parser adjusted it
    parser: Any  # vLLM's Parser class (one instance per output: parsers keep state)
    spec: Any  # the tether spec of the request's constraint, or None
    prompt_ids: list[int]

    def read(self, tokenizer: Any, token_ids: list[int]) -> dict:
        """``content``, ``reasoning`` and ``tool_calls`` (id, name, arguments as a dict where
        they are JSON, else as the text) of one output, as vLLM's parser reads it."""
        text = tokenizer.decode(token_ids,
                                skip_special_tokens=self.request.skip_special_tokens)
        reasoning, content, calls = self.parser(tokenizer, self.request.tools).parse(
            text, self.request, enable_auto_tools=True, model_output_token_ids=token_ids)
        tool_calls = []
        for call in calls or []:
            try:
                arguments = json.loads(call.arguments)
            except (TypeError, ValueError):
                arguments = call.arguments
            tool_calls.append({"id": call.id, "name": call.name, "arguments": arguments})
        if tool_calls and self.request.parallel_tool_calls is False:
            tool_calls = tool_calls[:1]  # as vLLM's server does (the grammar ends at one)
        return {"content": content or None, "reasoning": reasoning, "tool_calls": tool_calls}


def plan_chat(tokenizer: Any, messages: list[dict], tools: list[dict] | None,
              tool_choice: Any, parallel_tool_calls: bool, tool_parser: str,
              tool_strict_level: str, chat_template: str | None,
              response_format: dict | None, max_tokens: int) -> ToolPlan:
    """The ``ToolPlan`` of a chat request (see the module docstring)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.parser.parser_manager import ParserManager

    from tether.decode.policy import spec_from_structured_outputs

    body: dict = {"model": "tether", "messages": messages, "max_tokens": max_tokens}
    if tools:
        body.update(tools=tools, tool_choice=tool_choice or "auto",
                    parallel_tool_calls=parallel_tool_calls)
    elif tool_choice not in (None, "none", "auto"):
        raise ValueError(f"tool_choice {tool_choice!r} needs tools")
    if response_format is not None:
        body["response_format"] = response_format
    request = ChatCompletionRequest.model_validate(body)  # pydantic's errors name the field
    parser = ParserManager.get_parser(tool_parser_name=tool_parser, enable_auto_tools=True,
                                      tool_strict_level=tool_strict_level,
                                      tokenizer=tokenizer)
    if request.tools:
        request = parser(tokenizer, request.tools).adjust_request(request)
    params = request.to_sampling_params(max_tokens, {})
    template = chat_template
    if template is not None and "{" not in template and Path(template).is_file():
        template = Path(template).read_text()
    ids = tokenizer.apply_chat_template(
        messages, tools=[t.model_dump(exclude_none=True) for t in request.tools or []] or None,
        chat_template=template, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return ToolPlan(request, parser, spec_from_structured_outputs(params.structured_outputs),
                    list(ids))
