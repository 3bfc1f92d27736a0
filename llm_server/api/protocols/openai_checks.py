"""Request-side checks of the OpenAI API's structured-output fields: ``logprobs`` /
``top_logprobs``, ``tools`` / ``tool_choice`` / ``parallel_tool_calls``, and which of them (and
``response_format``) may be combined. Each refusal is a 400 naming the field.
"""

from __future__ import annotations

from typing import Any

from llm_server.api.plumbing.turns import api_error_for
from llm_server.api.plumbing.errors import APIError
from llm_server.api.protocols.openai_wire import ChatCompletionRequest, CompletionRequest
from llm_server.conversation_engine.inputs import has_chat_template
from llm_server.engine.types import LogprobLog
from llm_server.serving.service import ChatInputError
from llm_server.serving.structured import MAX_TOP_LOGPROBS
from llm_server.serving.tools import ToolSet, parse_tools


def chat_top_logprobs(body: ChatCompletionRequest) -> int | None:
    """None: no logprobs; else how many alternatives per token (``top_logprobs``)."""
    if body.logprobs not in (None, False, True):
        raise APIError(400, "logprobs must be a boolean", param="logprobs", code="invalid_value")
    top = body.top_logprobs
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs",
                       code="invalid_value")
    if not body.logprobs:
        if top:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs",
                           code="invalid_value")
        return None
    return top or 0



def completion_top_logprobs(body: CompletionRequest) -> int | None:
    value = body.logprobs
    if value is None or value is False:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}", param="logprobs",
                       code="invalid_value")
    return value



def check_combination(response_format: Any, log: LogprobLog | None, improvement: bool) -> None:
    if improvement and response_format and response_format.get("type", "text") != "text":
        raise APIError(400, "response_format cannot be combined with improvement", param="response_format",
                       code="unsupported_value")
    if improvement and log is not None:
        raise APIError(400, "logprobs cannot be combined with improvement", param="logprobs",
                       code="unsupported_value")



def request_tools(body: ChatCompletionRequest, chat: Any) -> ToolSet | None:
    """The request's tools (None when no call may be made); 400 for what cannot work."""
    try:
        tools = parse_tools(body.tools, body.tool_choice, (body.model_extra or {}).get("parallel_tool_calls"))
    except ChatInputError as exc:
        raise api_error_for(exc) from exc
    if tools is None:
        return None
    if not has_chat_template(chat.engine.tokenizer):
        raise APIError(400, "this model has no chat template, so it cannot be given tools", param="tools",
                       code="unsupported_parameter")
    if body.improvement:
        raise APIError(400, "tools cannot be combined with improvement", param="tools", code="unsupported_value")
    if tools.constrained and body.response_format and body.response_format.get("type", "text") != "text":
        raise APIError(400, "response_format cannot be combined with a required tool call",
                       param="response_format", code="unsupported_value")
    return tools
