"""ChatService: the one place where a chat turn becomes engine work (interface first).

Routes (spec endpoints, OpenAI endpoints, the chat page) all call this; none of them
tokenizes or generates on its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from llm_server.engine.interface import Engine
from llm_server.engine.types import FinishReason, SamplingParams

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}


class ChatInputError(ValueError):
    """A request the client must fix (HTTP 400). ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class ChatOptions:
    """How to answer one turn."""

    role: str = "assistant"  # system-prompt name from system_prompt_config.yaml
    improvement: bool = False
    intermediate_steps: bool = False
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""


@dataclass(frozen=True)
class ChatDelta:
    """Text to show the client now (with intermediate steps: stage headings and stages too)."""

    text: str


@dataclass(frozen=True)
class ChatDone:
    """End of a turn. ``result`` holds the spec's ``last_result`` keys (``reply`` always)."""

    result: dict[str, str]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


ChatEvent = ChatDelta | ChatDone
