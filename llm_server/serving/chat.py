"""ChatService: the one place where a chat turn becomes engine work.

Routes (spec endpoints, OpenAI endpoints, the chat page) all call this; none of them
tokenizes or generates on its own. ``open`` validates the chat-level inputs (messages, role,
the server's ``max_new_tokens`` limit), applies the chat template once and submits the turn's
first pass to the engine *eagerly* (the engine checks token ids and the context window), so
input and capacity errors surface before a response starts. The returned
:class:`~llm_server.serving.chat_stream.ChatStream` is an async iterable of
:class:`ChatDelta` ... then one :class:`ChatDone`, and owns the turn's cancellation.

A turn is a sans-IO generator of passes: one pass for a plain answer, or, with
``options.improvement``, the spec's answer-improvement pipeline
(``conversation_engine.improvement.improvement_steps``). ``open`` takes the turn's first pass
from that generator and submits it; the ChatStream runs the later passes on the same engine (so
they are batched with everything else), from the event loop. Engine request ids are
``<request id>`` for a single pass and ``<request id>-draft`` / ``-review1`` / ``-review2`` for
the improvement passes.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial

from llm_server.conversation_engine.improvement import (
    Advance,
    Pass,
    Steps,
    advance,
    grammar_available,
    improvement_steps,
)
from llm_server.conversation_engine.inputs import (
    ChatTemplateError,
    HistoryError,
    UnknownRoleError,
    build_messages,
    chat_token_ids,
)
from llm_server.engine.interface import Engine
from llm_server.engine.stream import GenerationStream
from llm_server.engine.types import GenerationRequest, SamplingParams
from llm_server.serving.chat_stream import ChatDelta, ChatDone, ChatEvent, ChatStream, single_pass
from llm_server.serving.schema_check import check_instance

logger = logging.getLogger(__name__)

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}
#: Improvement passes after the first may shrink max_new_tokens to fit the context, down to this.
MIN_PASS_TOKENS = 16


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
    #: The client did not ask for a number of new tokens: shrink the default to fit the context.
    fit_context: bool = False


class ChatService:
    """Turns chat requests into engine requests (template, limits, improvement passes)."""

    def __init__(self, engine: Engine, system_prompts: Mapping[str, str], max_new_tokens_limit: int) -> None:
        self.engine = engine
        self.system_prompts = dict(system_prompts)
        self.max_new_tokens_limit = max_new_tokens_limit

    # --- building prompts -----------------------------------------------------------------
    def spec_messages(self, prompt: str, history: list[Message], role: str) -> list[Message]:
        """System prompt of ``role`` + history + the user's prompt, built and validated by the
        Python API's :func:`~llm_server.conversation_engine.inputs.build_messages` (the improvement
        pipeline's draft pass uses it too); its errors become :class:`ChatInputError`. (A blank
        prompt is the wire format's to refuse: ``api.protocol_chat``.)"""
        try:
            return build_messages(self.system_prompts, prompt, role, history)
        except UnknownRoleError as exc:
            raise _unknown_role(role, exc.known) from exc
        except HistoryError as exc:
            where = f"history.{exc.index}" + (f".{exc.field}" if exc.field else "")
            raise ChatInputError(f"{where} {exc.problem}", param=where) from exc

    def openai_messages(self, messages: list[Message], role: str | None) -> list[Message]:
        """The OpenAI API's ``role`` extension: that role's system prompt, then ``messages``.

        Only when the client sent no system message of its own (an explicit one wins). Without
        ``role`` nothing is added: a plain OpenAI request gets exactly the messages it sent.
        """
        if role is None:
            return messages
        if role not in self.system_prompts:
            raise _unknown_role(role, sorted(self.system_prompts))
        if any(m["role"] == "system" for m in messages):
            return messages
        return [{"role": "system", "content": self.system_prompts[role]}, *messages]

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """Prompt token ids through the Python API's one chat -> tokens path
        (:func:`~llm_server.conversation_engine.inputs.chat_token_ids`): the chat template applied
        once with the generation prompt, or a plain transcript for a model without a template."""
        try:
            return chat_token_ids(self.engine.tokenizer, messages)
        except ChatTemplateError as exc:  # e.g. a template that demands alternating user/assistant turns
            raise ChatInputError(str(exc), param="messages", code="invalid_messages") from exc

    # --- opening streams ------------------------------------------------------------------
    def open(self, messages: list[Message], options: ChatOptions) -> ChatStream:
        """Validate and submit the turn's first pass now; raises ChatInputError /
        ContextLengthExceeded / EngineError.

        ``messages`` is ``[system?, *history, user]``. The first pass is the answer itself or,
        with ``options.improvement``, the pipeline's draft: taken from the turn's own steps, so
        the pass submitted here is the one the pipeline asked for.
        """
        self._check_params(options.params)
        if not messages:
            raise ChatInputError("messages must not be empty", param="messages")
        steps = self._improvement(messages, options) if options.improvement else single_pass(messages)
        opening = advance(steps)
        messages = opening.next_pass.messages if opening.next_pass is not None else []
        return self._start(steps, opening, self.prompt_ids(messages), options)

    def open_completion(self, prompt: str, options: ChatOptions) -> ChatStream:
        """A raw prompt (no chat template, no system prompt): for /v1/completions."""
        self._check_params(options.params)
        prompt_ids = list(self.engine.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        steps = single_pass([])  # no messages: the raw prompt's ids are the pass's prompt
        return self._start(steps, advance(steps), prompt_ids, options)

    def _start(self, steps: Steps, opening: Advance, prompt_ids: list[int], options: ChatOptions) -> ChatStream:
        """Submit the opening pass (``prompt_ids``) now; the stream runs the rest of ``steps``."""
        first = opening.next_pass
        assert first is not None  # every turn starts with a pass
        options = self._fitted(options, len(prompt_ids))
        request_id = options.request_id or uuid.uuid4().hex
        stream = self.engine.submit(GenerationRequest(_pass_id(request_id, first), prompt_ids, options.params))
        later = partial(self._submit_later, options.params, request_id)
        chat_stream = ChatStream(steps, opening, stream, later, len(prompt_ids))
        schema = getattr(options.params.constraint, "schema", None)
        if schema is not None and not options.improvement:  # the answer itself is the schema's instance
            chat_stream.final_check = partial(check_instance, schema=schema)
        return chat_stream

    def _improvement(self, messages: list[Message], options: ChatOptions) -> Steps:
        """The improvement pipeline's steps for ``[system?, *history, user]``: the system prompts
        are the service's, with the role's entry replaced by the turn's own system message."""
        system, history, message = _split_messages(messages)
        prompts = dict(self.system_prompts)
        prompts[options.role] = system if system is not None else prompts.get(options.role, "")
        return improvement_steps(prompts, history, message, options.role, options.intermediate_steps,
                                 structured=grammar_available())

    def _submit_later(self, params: SamplingParams, request_id: str, later: Pass) -> GenerationStream:
        """A pass after the first (a review): constrained to its schema, and its max_new_tokens
        shrunk to the room its prompt leaves (down to :data:`MIN_PASS_TOKENS`)."""
        if later.schema is not None:  # a structured review: compiled here, off the event loop
            from llm_server.serving.structured import compile_schema, constrained

            params = constrained(params, compile_schema(self.engine.tokenizer, later.schema, "review"))
        prompt_ids = self.prompt_ids(later.messages)
        room = self.engine.max_context - len(prompt_ids)
        if room < params.max_new_tokens:  # too little room is the engine's to refuse
            params = replace(params, max_new_tokens=max(room, min(params.max_new_tokens, MIN_PASS_TOKENS)))
        return self.engine.submit(GenerationRequest(_pass_id(request_id, later), prompt_ids, params))

    # --- checks -----------------------------------------------------------------------------
    def _check_params(self, params: SamplingParams) -> None:
        """The server's limit (the wire formats refuse a max_new_tokens below 1)."""
        if params.max_new_tokens > self.max_new_tokens_limit:
            raise ChatInputError(
                f"max_new_tokens is {params.max_new_tokens}, above this server's limit of "
                f"{self.max_new_tokens_limit}",
                param="max_new_tokens",
            )

    def _fitted(self, options: ChatOptions, prompt_tokens: int) -> ChatOptions:
        """With ``fit_context``, a default max_new_tokens shrinks to the room the prompt leaves."""
        room = self.engine.max_context - prompt_tokens
        if options.fit_context and 0 < room < options.params.max_new_tokens:
            return replace(options, params=replace(options.params, max_new_tokens=room))
        return options


def _pass_id(request_id: str, one: Pass) -> str:
    """The engine request id of one pass: the request's, plus the pass's name if it has one."""
    return f"{request_id}-{one.name}" if one.name else request_id


def _unknown_role(role: str, known: Iterable[str]) -> ChatInputError:
    return ChatInputError(f"unknown role {role!r}; known roles: {', '.join(known)}", param="role",
                          code="unknown_role")


def _split_messages(messages: list[Message]) -> tuple[str | None, list[Message], str]:
    """[system?, *history, user] -> (system text, history, user text) for the pipeline."""
    system: str | None = None
    body = list(messages)
    if body and body[0].get("role") == "system":
        system = body.pop(0).get("content", "")
    if not body or body[-1].get("role") != "user":
        raise ChatInputError("the last message must come from the user", param="messages")
    return system, body[:-1], body[-1].get("content", "")


__all__ = ["ChatDelta", "ChatDone", "ChatEvent", "ChatInputError", "ChatOptions", "ChatService", "ChatStream",
           "Message"]
