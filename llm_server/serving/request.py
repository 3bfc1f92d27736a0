"""The one request model under every protocol: what a client asked for, in the serving layer's terms.

Each protocol adapter (``llm_server.api.protocols``: the spec's ``/chat``, OpenAI's Chat
Completions and Completions) turns its wire format into one :class:`TurnRequest` and hands it
to :meth:`llm_server.serving.service.ChatService.open`, which resolves it once: server defaults
for what the client left out, the role's system prompt, the chat template, tools and
``response_format`` into one grammar, logprobs, the server's limits. Nothing in this module
knows a wire format; field names in errors are the serving layer's (``max_new_tokens``), and an
adapter renames them for its clients (``max_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}

#: How the role's system prompt joins the conversation. ``spec``: the spec's ``/chat`` rule
#: (``messages`` are the history then the prompt, always under the role's system prompt, the
#: history checked as ``history.N``); ``unless_given``: only when the messages carry no system
#: message and a role was named (OpenAI's ``role`` extension).
SystemPromptRule = Literal["spec", "unless_given"]


class ChatInputError(ValueError):
    """A request the client must fix (HTTP 400). ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class Sampling:
    """The sampling settings a client sent; None (or empty) means the server's default."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    #: ``(token_id, bias)`` pairs; ids are checked against the vocabulary by the engine.
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: None: the model's default top-k; 0 or -1: off; k > 0: keep the k likeliest ids.
    top_k: int | None = None
    min_p: float | None = None


@dataclass(frozen=True)
class ToolRequest:
    """OpenAI-style tools as the client sent them (validated by ``serving.tools.parse_tools``)."""

    tools: Any = None
    choice: Any = None
    parallel: Any = None


@dataclass(frozen=True)
class TurnRequest:
    """One turn to generate: a chat (``messages``) or a raw prompt (``prompt``), and how.

    - ``messages``: the conversation, oldest first, ending with the user's message (for the
      ``spec`` rule: the history, then the prompt);
    - ``prompt``: a raw prompt (``/v1/completions``): no chat template, no system prompt;
    - ``role``: the system prompt to use (``system_prompt_config.yaml``), see :data:`SystemPromptRule`;
    - ``response_format``: OpenAI's object (``json_object`` / ``json_schema``), held by a grammar;
    - ``logprobs``: None, or how many alternatives to record per token (``prompt_logprobs``: prompt tokens too);
    - ``improvement`` / ``intermediate_steps``: the spec's answer-improvement pipeline.
    """

    request_id: str = ""
    messages: tuple[Message, ...] = ()
    prompt: str | None = None
    role: str | None = None
    system_prompt_rule: SystemPromptRule = "unless_given"
    sampling: Sampling = field(default_factory=Sampling)
    response_format: Any = None
    tools: ToolRequest | None = None
    logprobs: int | None = None
    #: With ``logprobs`` on a raw ``prompt``: the prompt's tokens and log-probabilities too (OpenAI's echo).
    prompt_logprobs: bool = False
    improvement: bool = False
    intermediate_steps: bool = False
    #: OpenAI's Predicted Outputs: text the answer will likely repeat (speculative decoding's drafts).
    prediction: str | None = None

    @property
    def fit_context(self) -> bool:
        """The client named no max_new_tokens: the default shrinks to the room the prompt leaves."""
        return self.sampling.max_new_tokens is None


__all__ = ["ChatInputError", "Message", "Sampling", "SystemPromptRule", "ToolRequest", "TurnRequest"]
