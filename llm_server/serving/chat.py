"""ChatService: the one place where a chat turn becomes engine work.

Routes (spec endpoints, OpenAI endpoints, the chat page) all call this; none of them
tokenizes or generates on its own. ``open`` validates, applies the chat template once,
checks the context window and submits to the engine *eagerly*, so input and capacity
errors surface before a response starts. The returned :class:`ChatStream` is an async
iterable of :class:`ChatDelta` ... then one :class:`ChatDone`.

With ``options.improvement`` the spec's answer-improvement pipeline
(``conversation_engine.improvement``) runs in a worker thread; each of its passes is
submitted to the same engine (so it is batched with everything else) and its chunks are
bridged back to asyncio. Its first (draft) pass is the one ``open`` submitted eagerly, built
exactly as the pipeline builds its draft (``inputs.build_messages``), so the pipeline's first
``generate`` call takes it over. Engine request ids are ``<request id>`` for a single pass and
``<request id>-draft`` / ``-review1`` / ``-review2`` for the improvement passes. Cancelling the
stream (or abandoning its iteration) cancels the pass in flight and stops the pipeline.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from llm_server.conversation_engine.improvement import grammar_available, improvement_pipeline
from llm_server.conversation_engine.inputs import (
    ChatTemplateError,
    HistoryError,
    UnknownRoleError,
    build_messages,
    chat_token_ids,
)
from llm_server.engine.interface import Engine
from llm_server.engine.stream import GenerationStream
from llm_server.engine.types import (
    ContextLengthExceeded,
    Finished,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TextDelta,
)

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


class ChatStream:
    """Async iterable of ``ChatDelta``... then exactly one ``ChatDone``; errors raise.

    Iterate it once. Abandoning the iteration (break, task cancelled, client gone) cancels
    the generation, as does :meth:`cancel`.
    """

    def __init__(self, events: AsyncIterator[ChatEvent], cancel: Callable[[], None], prompt_tokens: int) -> None:
        self._events = events
        self._cancel = cancel
        self._done = False
        #: Prompt tokens of the (first) pass, known before generation starts.
        self.prompt_tokens = prompt_tokens

    def cancel(self) -> None:
        """Stop generating (thread-safe, idempotent, harmless after the end)."""
        if not self._done:
            self._cancel()

    def __aiter__(self) -> AsyncIterator[ChatEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ChatEvent]:
        try:
            async for event in self._events:
                if isinstance(event, ChatDone):
                    self._done = True
                yield event
        finally:
            if not self._done:
                self._cancel()
                self._done = True


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
        pipeline's draft pass uses it too); its errors become :class:`ChatInputError`."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ChatInputError("prompt must be a non-empty string", param="prompt")
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
        """Validate and submit now; raises ChatInputError / ContextLengthExceeded / EngineError.

        ``messages`` is ``[system?, *history, user]``. The pass submitted here is the turn's
        first: the answer itself, or, with ``options.improvement``, the pipeline's draft pass
        (:attr:`_ImprovementPlan.draft_messages`), which the pipeline then consumes.
        """
        self._check_params(options.params)
        if not messages:
            raise ChatInputError("messages must not be empty", param="messages")
        plan = _ImprovementPlan.of(messages, options.role, self.system_prompts) if options.improvement else None
        request_id = options.request_id or uuid.uuid4().hex
        prompt_ids = self.prompt_ids(plan.draft_messages if plan is not None else messages)
        options = self._fitted(options, len(prompt_ids))
        self._check_context(len(prompt_ids), options.params.max_new_tokens)
        if plan is None:
            answer = self.engine.submit(GenerationRequest(request_id, prompt_ids, options.params))
            return ChatStream(_plain_events(answer), answer.cancel, len(prompt_ids))
        draft = self.engine.submit(GenerationRequest(f"{request_id}-draft", prompt_ids, options.params))
        return _ImprovementRun(self, plan, options, request_id, draft, len(prompt_ids)).stream()

    def open_completion(self, prompt: str, options: ChatOptions) -> ChatStream:
        """A raw prompt (no chat template, no system prompt): for /v1/completions."""
        self._check_params(options.params)
        if not isinstance(prompt, str) or not prompt:
            raise ChatInputError("prompt must be a non-empty string", param="prompt")
        prompt_ids = list(self.engine.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        options = self._fitted(options, len(prompt_ids))
        self._check_context(len(prompt_ids), options.params.max_new_tokens)
        request_id = options.request_id or uuid.uuid4().hex
        stream = self.engine.submit(GenerationRequest(request_id, prompt_ids, options.params))
        return ChatStream(_plain_events(stream), stream.cancel, len(prompt_ids))

    # --- checks -----------------------------------------------------------------------------
    def _check_params(self, params: SamplingParams) -> None:
        if params.max_new_tokens < 1:
            raise ChatInputError("max_new_tokens must be at least 1", param="max_new_tokens")
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

    def _check_context(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens + max_new_tokens > self.engine.max_context:
            raise ContextLengthExceeded(prompt_tokens, max_new_tokens, self.engine.max_context)

    def submit_pass(self, messages: list[Message], params: SamplingParams, pass_id: str) -> GenerationStream:
        """One improvement pass: max_new_tokens shrinks to fit the context if it must."""
        prompt_ids = self.prompt_ids(messages)
        room = self.engine.max_context - len(prompt_ids)
        if room < min(params.max_new_tokens, MIN_PASS_TOKENS):
            raise ContextLengthExceeded(len(prompt_ids), params.max_new_tokens, self.engine.max_context)
        if room < params.max_new_tokens:
            params = replace(params, max_new_tokens=room)
        return self.engine.submit(GenerationRequest(pass_id, prompt_ids, params))


def _unknown_role(role: str, known: Iterable[str]) -> ChatInputError:
    return ChatInputError(f"unknown role {role!r}; known roles: {', '.join(known)}", param="role",
                          code="unknown_role")


async def _plain_events(stream: GenerationStream) -> AsyncIterator[ChatEvent]:
    """Engine events -> chat events for a single pass."""
    async for event in stream:
        if isinstance(event, TextDelta):
            if event.text:
                yield ChatDelta(event.text)
        else:
            yield ChatDone({"reply": event.text}, event.reason, event.prompt_tokens, event.completion_tokens)


class _PassCancelled(Exception):
    """Raised inside the pipeline thread when the client has gone."""


@dataclass(frozen=True)
class _ImprovementPlan:
    """The improvement pipeline's inputs for one turn, derived once from its messages.

    ``messages`` is ``[system?, *history, user]``. The system prompts are the service's,
    with ``role``'s entry replaced by the turn's own system message when it has one.
    ``draft_messages`` are the pipeline's first (draft) pass, built as the pipeline builds
    them (``build_messages(system_prompts, message, role, history)``).
    """

    system_prompts: Mapping[str, str]
    history: list[Message]
    message: str
    role: str
    draft_messages: list[Message]

    @classmethod
    def of(cls, messages: list[Message], role: str, system_prompts: Mapping[str, str]) -> _ImprovementPlan:
        system, history, message = _split_messages(messages)
        prompts = dict(system_prompts)
        prompts[role] = system if system is not None else prompts.get(role, "")
        return cls(prompts, history, message, role, build_messages(prompts, message, role, history))


class _ImprovementRun:
    """Runs the improvement pipeline in a worker thread, one engine pass at a time.

    The draft pass was submitted eagerly by :meth:`ChatService.open` with the plan's draft
    messages; the pipeline's first ``generate`` call (its draft) takes that stream, later
    calls (the reviews) submit.
    A :class:`GenerationStream` doubles as the thread -> asyncio bridge: the worker pushes
    the pipeline's chunks as ``TextDelta`` and ends with ``Finished`` (or an exception).
    """

    def __init__(
        self,
        service: ChatService,
        plan: _ImprovementPlan,
        options: ChatOptions,
        request_id: str,
        first: GenerationStream,
        first_prompt_tokens: int,
    ) -> None:
        self.service = service
        self.plan = plan
        self.options = options
        self.request_id = request_id
        self.first_prompt_tokens = first_prompt_tokens
        self._pending_first: GenerationStream | None = first
        self._current: GenerationStream | None = first
        self._reviews = 0  # review passes submitted so far (they are labelled -review1, -review2)
        self._lock = threading.Lock()
        self.bridge = GenerationStream(request_id)
        self.result: dict[str, str] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: FinishReason = "stop"

    def stream(self) -> ChatStream:
        threading.Thread(target=self._work, name=f"improve-{self.request_id[:8]}", daemon=True).start()
        return ChatStream(self._events(), self.cancel, self.first_prompt_tokens)

    def cancel(self) -> None:
        self.bridge.cancel()
        with self._lock:
            current = self._current
        if current is not None:
            current.cancel()

    async def _events(self) -> AsyncIterator[ChatEvent]:
        async for event in self.bridge:
            if isinstance(event, TextDelta):
                if event.text:
                    yield ChatDelta(event.text)
            else:
                result = dict(self.result) or {"reply": event.text}
                yield ChatDone(result, event.reason, event.prompt_tokens, event.completion_tokens)

    # --- worker thread ----------------------------------------------------------------------
    def _work(self) -> None:
        try:
            plan = self.plan
            for chunk in improvement_pipeline(
                self._generate, plan.system_prompts, plan.history, plan.message, role=plan.role,
                intermediate_steps=self.options.intermediate_steps, result=self.result,
                structured=grammar_available(),
            ):
                if self.bridge.cancelled:
                    raise _PassCancelled()
                if chunk:
                    self.bridge.push(TextDelta(chunk))
            self._finish(self.finish_reason)
        except _PassCancelled:
            self._finish("cancelled")
        except BaseException as exc:  # delivered to the consumer, raised from its iteration
            logger.warning("improvement pipeline failed (request %s): %s", self.request_id, type(exc).__name__)
            self.bridge.push(exc)
        finally:
            first = self._take_pending_first()
            if first is not None:  # the pipeline ended before its first pass (it failed): free it
                first.cancel()

    def _finish(self, reason: FinishReason) -> None:
        reply = self.result.get("reply", "")
        self.bridge.push(Finished(reason, self.prompt_tokens, self.completion_tokens, reply))

    def _take_pending_first(self) -> GenerationStream | None:
        with self._lock:
            first, self._pending_first = self._pending_first, None
        return first

    def _take_stream(self, messages: list[Message], schema: dict[str, Any] | None = None) -> GenerationStream:
        """The eagerly submitted draft pass on the first call, a new review pass after that."""
        first = self._take_pending_first()
        if first is not None:  # the draft: ``messages`` are the plan's draft_messages (same builder, same inputs)
            return first
        self._reviews += 1
        pass_id = f"{self.request_id}-review{self._reviews}"
        params = self.options.params
        if schema is not None:  # a structured review: compiled here, in the pipeline's thread
            from llm_server.serving.structured import compile_schema, constrained

            params = constrained(params, compile_schema(self.service.engine.tokenizer, schema, "review"))
        stream = self.service.submit_pass(messages, params, pass_id)
        with self._lock:
            self._current = stream
        if self.bridge.cancelled:
            stream.cancel()
        return stream

    def _generate(self, messages: list[Message], schema: dict[str, Any] | None = None) -> Iterator[str]:
        """An ``improvement.GenerateFn``: one pass through the engine, iterated synchronously."""
        if self.bridge.cancelled:
            raise _PassCancelled()
        stream = self._take_stream(messages, schema)
        for event in stream:
            if isinstance(event, TextDelta):
                if self.bridge.cancelled:
                    stream.cancel()
                    continue
                yield event.text
            else:
                self.prompt_tokens += event.prompt_tokens
                self.completion_tokens += event.completion_tokens
                if event.reason == "cancelled" or self.bridge.cancelled:
                    raise _PassCancelled()
                self.finish_reason = event.reason


def _split_messages(messages: list[Message]) -> tuple[str | None, list[Message], str]:
    """[system?, *history, user] -> (system text, history, user text) for the pipeline."""
    system: str | None = None
    body = list(messages)
    if body and body[0].get("role") == "system":
        system = body.pop(0).get("content", "")
    if not body or body[-1].get("role") != "user":
        raise ChatInputError("the last message must come from the user", param="messages")
    return system, body[:-1], body[-1].get("content", "")
