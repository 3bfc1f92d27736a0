"""ChatService: the one place where a :class:`~llm_server.serving.request.TurnRequest` becomes engine work.

Every protocol adapter (spec ``/chat``, OpenAI Chat Completions and Completions, the chat page)
builds one ``TurnRequest`` and calls :meth:`ChatService.open`; none of them tokenizes, compiles a
grammar or generates on its own. ``open`` resolves the request once, in this order:

1. combinations that cannot work (improvement with ``response_format``, logprobs or tools);
2. sampling: the server's defaults (``model_config.yaml`` ``parameters``, one place:
   :class:`~llm_server.helper_functionality.config_models.ModelParameters`) overridden where
   the client said (:func:`~llm_server.serving.sampling.request_sampling`), the server's
   ``max_new_tokens`` limit;
3. the messages: the role's system prompt (by the request's rule), tools described in the prompt;
4. the constraint: a required tool call or ``response_format`` compiled to one grammar;
5. logprobs, then the chat template applied once and the turn's first pass submitted *eagerly*
   (the engine checks token ids and the context window), so input and capacity errors surface
   before a response starts.

The returned :class:`~llm_server.serving.turn_stream.TurnStream` is an async iterable of
:class:`ChatDelta` ... then one :class:`ChatDone`, and owns the turn's cancellation.

A turn is a sans-IO generator of passes: one pass for a plain answer, or, with
``improvement``, the spec's answer-improvement pipeline
(``conversation_engine.improvement.improvement_steps``). The stream runs the later passes on
the same engine (so they are batched with everything else), from the event loop. Engine request
ids are ``<request id>`` for a single pass and ``<request id>-draft`` / ``-review1`` / ... for
the improvement passes.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from llm_server.conversation_engine.improvement import (
    Advance,
    Pass,
    Steps,
    advance,
    grammar_available,
    improvement_steps,
)
from llm_server.conversation_engine.inputs import (
    DEFAULT_ROLE,
    ChatTemplateError,
    HistoryError,
    UnknownRoleError,
    build_messages,
    chat_token_ids,
    has_chat_template,
)
from llm_server.engine.interface import Engine
from llm_server.engine.stream import GenerationStream
from llm_server.engine.types import GenerationRequest, SamplingParams
from llm_server.serving.request import ChatInputError, Message, TurnRequest
from llm_server.serving.sampling import request_filters, request_sampling
from llm_server.serving.schema_check import check_instance
from llm_server.serving.structured import LogprobReader, compile_schema, response_format_grammar, with_logprobs
from llm_server.serving.tools import ToolSet, call_grammar, parse_tools, with_tools_prompt
from llm_server.serving.turn_stream import ChatDelta, ChatDone, ChatEvent, TurnStream, single_pass

logger = logging.getLogger(__name__)

#: Improvement passes after the first may shrink max_new_tokens to fit the context, down to this.
MIN_PASS_TOKENS = 16


@dataclass(frozen=True)
class _Resolved:
    """A request after :meth:`ChatService.open` resolved it: what the turn runs with."""

    params: SamplingParams
    tools: ToolSet | None
    logprobs: LogprobReader | None
    request_id: str
    improvement: bool
    prediction: str | None = None  # OpenAI's Predicted Outputs (speculative decoding)


class ChatService:
    """Turns :class:`TurnRequest` s into engine requests (defaults, template, tools, grammar, passes)."""

    def __init__(self, engine: Engine, system_prompts: Mapping[str, str], max_new_tokens_limit: int,
                 defaults: SamplingParams | None = None) -> None:
        self.engine = engine
        self.system_prompts = dict(system_prompts)
        self.max_new_tokens_limit = max_new_tokens_limit
        #: Generation settings of a request that names none (model_config.yaml ``parameters``).
        self.defaults = defaults if defaults is not None else SamplingParams()

    # --- opening a turn ---------------------------------------------------------------------
    def open(self, request: TurnRequest) -> TurnStream:
        """Resolve ``request`` and submit its first pass now (see the module docstring); raises
        ChatInputError / ContextLengthExceeded / EngineError before any event."""
        _check_combinations(request)
        tools = self._tools(request)
        params = self._sampling(request)
        if request.prompt is not None:  # a raw prompt: no chat template, no system prompt
            prompt_ids = list(self.engine.tokenizer(request.prompt, add_special_tokens=True)["input_ids"])
            steps: Steps = single_pass([])
        else:
            messages = self._messages(request, tools)
            steps = self._improvement(messages, request, params) if request.improvement else single_pass(messages)
        grammar = self._grammar(request, tools)
        params = params if grammar is None else replace(params, constraint=grammar)
        params, log = with_logprobs(params, request.logprobs)
        params = replace(params, prompt_logprobs=request.prompt_logprobs)
        reader = LogprobReader(self.engine.tokenizer, log) if log is not None else None
        opening = advance(steps)
        if request.prompt is None:
            first = opening.next_pass
            prompt_ids = self.prompt_ids(first.messages if first is not None else [])
        resolved = _Resolved(self._fitted(params, request, len(prompt_ids)), tools, reader,
                             request.request_id or uuid.uuid4().hex, request.improvement, request.prediction)
        return self._start(steps, opening, prompt_ids, resolved)

    def _start(self, steps: Steps, opening: Advance, prompt_ids: list[int], turn: _Resolved) -> TurnStream:
        """Submit the opening pass (``prompt_ids``) now; the stream runs the rest of ``steps``."""
        first = opening.next_pass
        assert first is not None  # every turn starts with a pass
        stream = self.engine.submit(GenerationRequest(_pass_id(turn.request_id, first), prompt_ids, turn.params,
                                                      self._prediction_ids(turn.prediction)))
        later = partial(self._submit_later, turn.params, turn.request_id)
        schema = getattr(turn.params.constraint, "schema", None)
        final_check = partial(check_instance, schema=schema) if schema is not None and not turn.improvement else None
        return TurnStream(steps, opening, stream, later, len(prompt_ids), tools=turn.tools, logprobs=turn.logprobs,
                          final_check=final_check)

    # --- resolving --------------------------------------------------------------------------
    def _sampling(self, request: TurnRequest) -> SamplingParams:
        """The server's defaults overridden by the request; the server's max_new_tokens limit."""
        asked = request.sampling
        params = request_sampling(self.defaults, max_new_tokens=asked.max_new_tokens, temperature=asked.temperature,
                                  top_p=asked.top_p, repetition_penalty=asked.repetition_penalty, seed=asked.seed,
                                  stop=asked.stop)
        params = request_filters(params, asked)
        if asked.max_new_tokens is None:
            params = replace(params, max_new_tokens=min(params.max_new_tokens, self.max_new_tokens_limit))
        elif params.max_new_tokens > self.max_new_tokens_limit:
            raise ChatInputError(
                f"max_new_tokens is {params.max_new_tokens}, above this server's limit of "
                f"{self.max_new_tokens_limit}",
                param="max_new_tokens",
            )
        return params

    def _messages(self, request: TurnRequest, tools: ToolSet | None) -> list[Message]:
        """The conversation with the role's system prompt (by the request's rule) and the tools."""
        messages = list(request.messages)
        if not messages:
            raise ChatInputError("messages must not be empty", param="messages")
        if request.system_prompt_rule == "spec":
            *history, prompt = messages
            messages = self.spec_messages(prompt["content"], history, request.role or DEFAULT_ROLE)
        else:
            messages = self.openai_messages(messages, request.role)
        return with_tools_prompt(messages, tools) if tools is not None else messages

    def _tools(self, request: TurnRequest) -> ToolSet | None:
        """The request's tools (None when no call may be made); ChatInputError for what cannot work."""
        if request.tools is None:
            return None
        tools = parse_tools(request.tools.tools, request.tools.choice, request.tools.parallel)
        if tools is None:
            return None
        if not has_chat_template(self.engine.tokenizer):
            raise ChatInputError("this model has no chat template, so it cannot be given tools", param="tools",
                                 code="unsupported_parameter")
        if request.improvement:
            raise ChatInputError("tools cannot be combined with improvement", param="tools", code="unsupported_value")
        if tools.constrained and _structured_format(request.response_format):
            raise ChatInputError("response_format cannot be combined with a required tool call",
                                 param="response_format", code="unsupported_value")
        return tools

    def _grammar(self, request: TurnRequest, tools: ToolSet | None) -> Any:
        """The one grammar of the turn: a required tool call's, else ``response_format``'s (None: free)."""
        if tools is not None and tools.constrained:
            return call_grammar(self.engine.tokenizer, tools)
        return response_format_grammar(self.engine.tokenizer, request.response_format)

    def spec_messages(self, prompt: str, history: list[Message], role: str) -> list[Message]:
        """System prompt of ``role`` + history + the user's prompt, built and validated by the
        Python API's :func:`~llm_server.conversation_engine.inputs.build_messages` (the improvement
        pipeline's draft pass uses it too); its errors become :class:`ChatInputError`. (A blank
        prompt is the wire format's to refuse: ``api.protocols.spec_chat_wire``.)"""
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

    def tokenize(self, prompt: str | None, messages: list[Message] | None, add_special_tokens: bool) -> list[int]:
        """The ids of a raw ``prompt`` (``add_special_tokens`` as given), or of ``messages`` exactly
        as a chat turn would feed them to the model (template and generation prompt applied)."""
        if messages is not None:
            if not messages:
                raise ChatInputError("messages must not be empty", param="messages")
            return self.prompt_ids(messages)
        return list(self.engine.tokenizer(prompt or "", add_special_tokens=add_special_tokens)["input_ids"])

    def detokenize(self, token_ids: list[int]) -> str:
        """The text of ``token_ids`` (special tokens included); an id outside the vocabulary is a 400."""
        size = len(self.engine.tokenizer)
        for i, token_id in enumerate(token_ids):
            if not 0 <= token_id < size:
                raise ChatInputError(f"token id {token_id} is outside the vocabulary (0..{size - 1})",
                                     param=f"tokens.{i}", code="invalid_value")
        return str(self.engine.tokenizer.decode(token_ids))

    def _improvement(self, messages: list[Message], request: TurnRequest, params: SamplingParams) -> Steps:
        """The improvement pipeline's steps for ``[system?, *history, user]``: the system prompts
        are the service's, with the role's entry replaced by the turn's own system message. The
        stream runs independent passes together (the engine batches them); ``params`` say whether
        the passes decode greedily."""
        role = request.role or DEFAULT_ROLE
        system, history, message = _split_messages(messages)
        prompts = dict(self.system_prompts)
        prompts[role] = system if system is not None else prompts.get(role, "")
        return improvement_steps(prompts, history, message, role, request.intermediate_steps,
                                 structured=grammar_available(), greedy=params.greedy, together=True)

    def _submit_later(self, params: SamplingParams, request_id: str, later: Pass) -> GenerationStream:
        """A pass after the first (a review, revision or verdict): constrained to its schema, greedy and
        short when it asks, and its max_new_tokens shrunk to the room its prompt leaves (down to
        :data:`MIN_PASS_TOKENS`). ``later.prediction`` (a revision's previous answer) feeds the
        engine's speculative decoding."""
        if later.schema is not None:  # a structured review or verdict: compiled here, off the event loop
            params = replace(params, constraint=compile_schema(self.engine.tokenizer, later.schema, "review"))
        if later.greedy:  # a verdict is not sampled
            params = replace(params, do_sample=False)
        if later.stop:  # a revision ends where it starts echoing its prompt
            params = replace(params, stop=(*params.stop, *later.stop))
        if later.repetition_penalty is not None:  # a revision is not pushed away from the answer it rewrites
            params = replace(params, repetition_penalty=later.repetition_penalty)
        if later.max_new_tokens is not None:  # a short pass (a verdict)
            params = replace(params, max_new_tokens=min(params.max_new_tokens, later.max_new_tokens))
        prompt_ids = self.prompt_ids(later.messages)
        room = self.engine.max_context - len(prompt_ids)
        if room < params.max_new_tokens:  # too little room is the engine's to refuse
            params = replace(params, max_new_tokens=max(room, min(params.max_new_tokens, MIN_PASS_TOKENS)))
        return self.engine.submit(GenerationRequest(_pass_id(request_id, later), prompt_ids, params,
                                                    self._prediction_ids(later.prediction)))  # a revision's drafts

    def _prediction_ids(self, text: str | None) -> tuple[int, ...] | None:
        """The ids of a prediction (speculative decoding's drafts); None without one."""
        return tuple(self.engine.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else None

    def _fitted(self, params: SamplingParams, request: TurnRequest, prompt_tokens: int) -> SamplingParams:
        """A default max_new_tokens (the client named none) shrinks to the room the prompt leaves."""
        room = self.engine.max_context - prompt_tokens
        if request.fit_context and 0 < room < params.max_new_tokens:
            return replace(params, max_new_tokens=room)
        return params


def _structured_format(response_format: Any) -> bool:
    return isinstance(response_format, dict) and response_format.get("type", "text") != "text"


def _check_combinations(request: TurnRequest) -> None:
    """What the improvement pipeline cannot honour (its passes are free text and reviews); the
    prompt's log-probabilities need a raw prompt and logprobs."""
    if request.prompt_logprobs and (request.prompt is None or request.logprobs is None):
        raise ChatInputError("the prompt's log-probabilities need a raw prompt and logprobs", param="logprobs",
                             code="unsupported_value")
    if not request.improvement:
        return
    if _structured_format(request.response_format):
        raise ChatInputError("response_format cannot be combined with improvement", param="response_format",
                             code="unsupported_value")
    if request.logprobs is not None:
        raise ChatInputError("logprobs cannot be combined with improvement", param="logprobs",
                             code="unsupported_value")


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


__all__ = ["ChatDelta", "ChatDone", "ChatEvent", "ChatInputError", "ChatService", "Message", "TurnRequest",
           "TurnStream"]
