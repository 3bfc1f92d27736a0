"""ChatService (serving layer, no HTTP): prompts, limits, eager submission, improvement passes,
cancellation and errors, against the scripted engine."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from llm_server.conversation_engine.improvement import STAGE_HEADINGS
from llm_server.conversation_engine.improvement_parsing import REVISION_STOPS
from llm_server.engine.stream import GenerationStream
from llm_server.engine.types import (
    ContextLengthExceeded,
    EngineError,
    EngineOverloaded,
    EngineUnavailable,
    Finished,
    GenerationRequest,
    SamplingParams,
    TextDelta,
)
from llm_server.serving.request import ChatInputError, Message, Sampling, TurnRequest
from llm_server.serving.service import ChatService
from llm_server.serving.turn_stream import Cancel, ChatDelta, ChatDone, TurnStream
from tests.fakes import ScriptedEngine
from tests.spec_harness import wait_until

PROMPTS = {"assistant": "You are the assistant.", "reviser": "You are the reviser.", "poet": "You write poems."}


@pytest.fixture
def engine(tokenizer: Any) -> ScriptedEngine:
    scripted = ScriptedEngine(tokenizer, reply="A fine answer.")
    scripted.start()
    return scripted


@pytest.fixture
def service(engine: ScriptedEngine) -> ChatService:
    return ChatService(engine, PROMPTS, max_new_tokens_limit=100)


def collect(stream: TurnStream) -> tuple[str, ChatDone]:
    async def run() -> tuple[str, ChatDone]:
        text: list[str] = []
        done: ChatDone | None = None
        async for event in stream:
            if isinstance(event, ChatDelta):
                text.append(event.text)
            else:
                done = event
        assert done is not None
        return "".join(text), done

    return asyncio.run(run())


def turn(messages: list[Message], max_new_tokens: int | None = 50, temperature: float | None = None,
         top_p: float | None = None, **kw: Any) -> TurnRequest:
    """A turn of ``messages`` as they are (no system prompt added), 50 new tokens unless told."""
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    return TurnRequest(messages=tuple(messages), sampling=sampling, **kw)


# --- messages and template -----------------------------------------------------------------
def test_spec_messages_order_and_role(service: ChatService) -> None:
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    messages = service.spec_messages("Write one", history, "poet")
    assert messages == [
        {"role": "system", "content": "You write poems."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Write one"},
    ]


@pytest.mark.parametrize(
    ("prompt", "history", "role", "param"),
    [
        ("hi", [], "nobody", "role"),
        ("hi", [{"role": "robot", "content": "x"}], "assistant", "history.0.role"),
        ("hi", [{"role": "user"}], "assistant", "history.0.content"),
        ("hi", ["text"], "assistant", "history.0"),
    ],
)
def test_spec_messages_rejects(service: ChatService, prompt: str, history: list[Any], role: str, param: str) -> None:
    with pytest.raises(ChatInputError) as info:
        service.spec_messages(prompt, history, role)
    assert info.value.param == param


def test_open_applies_the_chat_template_once(service: ChatService, engine: ScriptedEngine, tokenizer: Any) -> None:
    messages = service.spec_messages("What is 2+2?", [], "assistant")
    text, done = collect(service.open(turn(messages)))
    assert text == "A fine answer." and done.result == {"reply": "A fine answer."}
    assert done.finish_reason == "stop" and done.completion_tokens == 3
    prompt = tokenizer.decode(engine.requests[-1].prompt_ids)
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == expected
    assert prompt.count("What is 2+2?") == 1


def test_sampling_params_are_passed_through(service: ChatService, engine: ScriptedEngine) -> None:
    params = SamplingParams(max_new_tokens=2, temperature=0.3, top_p=0.8)
    text, done = collect(service.open(turn(service.spec_messages("q", [], "assistant"), 2, 0.3, 0.8)))
    assert engine.requests[-1].params == params
    assert text == "A fine" and done.finish_reason == "length"


# --- limits (raised eagerly, before any event) ---------------------------------------------------
def test_max_new_tokens_limit(service: ChatService, engine: ScriptedEngine) -> None:
    with pytest.raises(ChatInputError) as info:
        service.open(turn(service.spec_messages("q", [], "assistant"), max_new_tokens=101))
    assert info.value.param == "max_new_tokens"
    assert engine.requests == []


def test_context_limit(tokenizer: Any) -> None:
    small = ScriptedEngine(tokenizer, max_context=64)
    small.start()
    service = ChatService(small, PROMPTS, max_new_tokens_limit=100)
    long_history = [{"role": "user", "content": "blah " * 100}]
    with pytest.raises(ContextLengthExceeded):
        service.open(turn(service.spec_messages("q", long_history, "assistant"), max_new_tokens=10))
    with pytest.raises(ContextLengthExceeded):  # prompt fits, prompt + max_new_tokens does not
        service.open(turn(service.spec_messages("q", [], "assistant"), max_new_tokens=60))
    assert small.requests == []


def test_fit_context_shrinks_a_default_budget(tokenizer: Any) -> None:
    small = ScriptedEngine(tokenizer, max_context=64)
    small.start()
    service = ChatService(small, PROMPTS, max_new_tokens_limit=100, defaults=SamplingParams(max_new_tokens=60))
    collect(service.open(turn(service.spec_messages("q", [], "assistant"), max_new_tokens=None)))
    request = small.requests[-1]
    assert len(request.prompt_ids) + request.params.max_new_tokens == 64


def test_overload_is_raised_by_open(tokenizer: Any) -> None:
    full = ScriptedEngine(tokenizer, max_waiting=0)
    full.start()
    service = ChatService(full, PROMPTS, max_new_tokens_limit=100)
    for improvement in (False, True):
        with pytest.raises(EngineOverloaded):
            service.open(turn(service.spec_messages("q", [], "assistant"), improvement=improvement))


# --- improvement ---------------------------------------------------------------------------
def _reviser_reply(prompt: str) -> str:
    if "You are the reviser." in prompt:
        return "Suggestions: 1. add detail Revised answer: A better answer. Comments: more detail."
    return "A first draft."


def test_improvement_runs_every_pass_through_the_engine(service: ChatService, engine: ScriptedEngine,
                                                         tokenizer: Any) -> None:
    engine.reply = _reviser_reply
    sampling = Sampling(max_new_tokens=50, repetition_penalty=1.3)
    text, done = collect(service.open(TurnRequest(messages=tuple(service.spec_messages("Explain", [], "assistant")),
                                                  sampling=sampling, improvement=True, intermediate_steps=True)))
    # draft, then review + revision twice (the scripted reviser's revision fails the gate's checks: no judge);
    # sampled, so stage 2 starts on the draft beside stage 1 (submitted together, the engine batches them)
    assert [r.request_id.rsplit("-", 1)[1] for r in engine.requests] == ["draft", "review1", "review2", "revision1",
                                                                         "revision2"]
    first = tokenizer.decode(engine.requests[0].prompt_ids)
    assert "You are the assistant." in first
    for r in engine.requests:  # a revision ends where it would echo its prompt's labels, and is not
        revision = "revision" in r.request_id  # pushed away from the answer it rewrites
        assert r.params.stop == (REVISION_STOPS if revision else ())
        assert r.params.repetition_penalty == (1.0 if revision else 1.3)
    assert all("You are the reviser." in tokenizer.decode(r.prompt_ids) for r in engine.requests[1:])
    positions = [text.index(h) for h in STAGE_HEADINGS]
    assert positions == sorted(positions)
    assert done.result["draft_answer"] == "A first draft."
    assert done.result["reply"] == done.result["revision2"]
    assert set(done.result) >= {"draft_answer", "suggestions1", "revision1", "comments1",
                                "suggestions2", "revision2", "comments2", "reply"}
    assert done.completion_tokens == sum(len(engine.reply(tokenizer.decode(r.prompt_ids)).split(" "))
                                         for r in engine.requests)


def test_a_revision_that_runs_away_is_cancelled_in_the_engine_and_rejected(service: ChatService,
                                                                          engine: ScriptedEngine) -> None:
    """A revision that starts to loop is cancelled in the engine at once (not generated to its 2,000 words);
    the pass ends as "stop", the gate keeps the draft and says why, and the turn ends normally."""
    loop = " ".join(["again and again the same words"] * 400)
    engine.reply = lambda prompt: loop if "Rewrite answer A" in prompt else _reviser_reply(prompt)
    engine.delay_s = 0.001
    messages = service.spec_messages("Explain", [], "assistant")
    text, done = collect(service.open(turn(messages, temperature=0.0, improvement=True, intermediate_steps=True)))
    assert [r.request_id.rsplit("-", 1)[1] for r in engine.requests] == ["draft", "review1", "revision1"]
    assert done.finish_reason == "stop"
    assert done.result["comments1"] == "Kept the previous answer: the revision repeats itself."
    assert done.result["reply"] == "A first draft."
    assert done.completion_tokens < 1000  # most of the revision's 2,000 words were never generated


def test_engine_request_ids_name_the_pass(service: ChatService, engine: ScriptedEngine) -> None:
    """Logs show which pass of which request ran: the request id, plus the stage when improving."""
    engine.reply = _reviser_reply
    collect(service.open(turn(service.spec_messages("Explain", [], "assistant"), request_id="req7")))
    messages = service.spec_messages("Explain", [], "assistant")
    collect(service.open(turn(messages, request_id="req8", improvement=True)))
    assert [r.request_id for r in engine.requests] == ["req7", "req8-draft", "req8-review1", "req8-review2",
                                                       "req8-revision1", "req8-revision2"]


def test_greedy_improvement_runs_stage_two_only_when_stage_one_changed_the_answer(service: ChatService,
                                                                                  engine: ScriptedEngine) -> None:
    """Greedy passes on the same prompt repeat word for word: when stage 1 kept the draft, stage 2 is
    not run again, and its keys say so."""
    engine.reply = _reviser_reply
    text, done = collect(service.open(turn(service.spec_messages("Explain", [], "assistant"), temperature=0,
                                           improvement=True, intermediate_steps=True, request_id="g1")))
    assert [r.request_id for r in engine.requests] == ["g1-draft", "g1-review1", "g1-revision1"]
    assert done.result["suggestions2"] == done.result["suggestions1"] and done.result["reply"] == "A first draft."
    assert "Review 2 was not run" in done.result["comments2"] and done.result["comments2"] in text
    positions = [text.index(h) for h in STAGE_HEADINGS]
    assert positions == sorted(positions)


def test_stage_two_beside_stage_one_keeps_the_streams_sections_in_order(service: ChatService, engine: ScriptedEngine,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Text reviews (no grammar library), sampled: review 1 streams live, review 2 (run beside it on the
    draft) is shown as a section once stage 1 is decided; the sections keep the spec's order."""
    monkeypatch.setattr("llm_server.serving.service.grammar_available", lambda: False)

    def reply(prompt: str) -> str:
        if "Rewrite answer A" in prompt:
            return "A first draft."  # repeats the answer: kept without a judgement
        return "Suggestions:\n1. add detail" if "Review answer A" in prompt else "A first draft."

    engine.reply = reply
    text, done = collect(service.open(turn(service.spec_messages("Explain", [], "assistant"), temperature=0.7,
                                           improvement=True, intermediate_steps=True, request_id="t1")))
    assert [r.request_id for r in engine.requests] == ["t1-draft", "t1-review1", "t1-review2", "t1-revision1",
                                                       "t1-revision2"]
    comments = "Comments: Kept the previous answer: the revision repeats it."
    assert text == ("### Draft answer\n\nA first draft.\n\n"
                    f"### Review 1\n\nSuggestions:\n1. add detail\n\n{comments}\n\n"
                    "### Revision 1\n\nA first draft.\n\n"
                    f"### Review 2\n\nSuggestions:\n1. add detail\n\n{comments}\n\n"
                    "### Final answer\n\nA first draft.\n\n")
    assert done.result["suggestions2"] == "1. add detail" and done.result["reply"] == "A first draft."


def test_improvement_without_steps_streams_only_the_answer(service: ChatService, engine: ScriptedEngine) -> None:
    engine.reply = _reviser_reply
    text, done = collect(service.open(turn(service.spec_messages("Explain", [], "assistant"), improvement=True)))
    assert "###" not in text
    assert text == done.result["reply"]


def test_improvement_pass_error_is_raised_from_iteration(service: ChatService, engine: ScriptedEngine) -> None:
    stream = service.open(turn(service.spec_messages("Explain", [], "assistant"), improvement=True))
    engine.fail_with = EngineError("pass failed")  # affects the passes not yet running
    with pytest.raises(EngineError, match="pass failed"):
        collect(stream)


def _consume_then_abandon(stream: TurnStream, n: int, after: Callable[[], None] | None = None) -> list[str]:
    async def run() -> list[str]:
        seen: list[str] = []
        async for event in stream:
            if isinstance(event, ChatDelta):
                seen.append(event.text)
                if len(seen) == n:
                    break
        if after:
            after()
        return seen

    return asyncio.run(run())


def test_abandoning_a_plain_stream_cancels_it(service: ChatService, engine: ScriptedEngine) -> None:
    engine.reply = " ".join(["w"] * 5000)
    engine.delay_s = 0.02
    stream = service.open(turn(service.spec_messages("q", [], "assistant"), max_new_tokens=100))
    seen = _consume_then_abandon(stream, 2)
    assert seen == ["w", " w"]
    wait_until(lambda: engine.stats().running == 0, what="cancellation")


def test_abandoning_an_improvement_stream_stops_the_pipeline(service: ChatService, engine: ScriptedEngine) -> None:
    engine.reply = " ".join(["w"] * 5000)
    engine.delay_s = 0.02
    stream = service.open(turn(service.spec_messages("q", [], "assistant"), improvement=True,
                               intermediate_steps=True, max_new_tokens=100))
    seen = _consume_then_abandon(stream, 3)
    assert seen[0].startswith("### Draft answer")
    wait_until(lambda: engine.stats().running == 0, what="the draft pass to be cancelled")
    assert len(engine.requests) == 1  # no review pass after the cancel


def test_cancel_before_iterating(service: ChatService, engine: ScriptedEngine) -> None:
    engine.reply = " ".join(["w"] * 5000)
    engine.delay_s = 0.02
    stream = service.open(turn(service.spec_messages("q", [], "assistant"), improvement=True, max_new_tokens=100))
    stream.cancel(Cancel.CLIENT_GONE)
    wait_until(lambda: engine.stats().running == 0, what="cancellation")
    assert len(engine.requests) == 1


def test_template_errors_are_input_errors(service: ChatService, engine: ScriptedEngine,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def strict_template(*args: Any, **kwargs: Any) -> str:
        raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")

    monkeypatch.setattr(engine.tokenizer, "apply_chat_template", strict_template)
    with pytest.raises(ChatInputError, match="alternate") as info:
        service.open(turn(service.spec_messages("q", [], "assistant")))
    assert info.value.param == "messages"


def test_improvement_needs_a_final_user_message(service: ChatService, engine: ScriptedEngine) -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(ChatInputError):
        service.open(turn(messages, improvement=True))
    assert engine.requests == []


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "Explain"}],  # no system message: the role's prompt is used
        [{"role": "system", "content": ""}, {"role": "user", "content": "Explain"}],  # an empty one: none
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Explain"}],
    ],
)
def test_the_eager_first_pass_is_the_pipelines_draft(service: ChatService, engine: ScriptedEngine,
                                                     tokenizer: Any, messages: list[dict[str, str]]) -> None:
    """open() submits the draft pass the pipeline then uses: five passes, none thrown away."""
    engine.reply = _reviser_reply
    text, done = collect(service.open(turn(messages, improvement=True)))
    assert len(engine.requests) == 5  # draft, review + revision twice: no resubmitted draft
    assert done.result["draft_answer"] == "A first draft."
    system = messages[0]["content"] if messages[0]["role"] == "system" else PROMPTS["assistant"]
    draft = [{"role": "system", "content": system}] if system else []
    expected = tokenizer.apply_chat_template([*draft, messages[-1]], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(engine.requests[0].prompt_ids) == expected
    assert done.prompt_tokens == sum(len(r.prompt_ids) for r in engine.requests)


# --- one message builder and one chat -> tokens path, shared with the Python API -------------
def test_a_model_without_a_chat_template_gets_the_plain_transcript(tokenizer: Any) -> None:
    """A base model (no chat template) is served, prompted exactly as the Python API prompts it."""
    import copy

    from llm_server.conversation_engine.inputs import prepare_inputs

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    base = ScriptedEngine(plain, reply="Plain answer.")
    base.start()
    service = ChatService(base, PROMPTS, max_new_tokens_limit=100)
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    text, done = collect(service.open(turn(service.spec_messages("q", history, "assistant"))))
    assert text == "Plain answer." and done.finish_reason == "stop"
    prompt_ids = base.requests[-1].prompt_ids
    assert plain.decode(prompt_ids, skip_special_tokens=True).endswith(
        "System: You are the assistant.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: q\n\nAssistant:")
    python_api = prepare_inputs(plain, None, PROMPTS, "q", conversation_history=history)["input_ids"][0].tolist()
    assert prompt_ids == python_api  # same text, same special-token rule (no doubled BOS)
    if plain.bos_token_id is not None:
        assert prompt_ids.count(plain.bos_token_id) <= 1


def test_templated_prompt_has_no_doubled_bos(service: ChatService, engine: ScriptedEngine, tokenizer: Any) -> None:
    from llm_server.conversation_engine.inputs import prepare_inputs

    collect(service.open(turn(service.spec_messages("q", [], "assistant"))))
    python_api = prepare_inputs(tokenizer, None, PROMPTS, "q")["input_ids"][0].tolist()
    assert engine.requests[-1].prompt_ids == python_api
    assert python_api[:2].count(tokenizer.bos_token_id) <= 1


def test_history_errors_name_the_field(service: ChatService) -> None:
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "bot", "content": "c"}]
    with pytest.raises(ChatInputError, match=r"history\.2\.role must be one of user, assistant, system") as info:
        service.spec_messages("q", history, "assistant")
    assert info.value.param == "history.2.role"
    with pytest.raises(ChatInputError, match=r"history\.0\.content") as info:
        service.spec_messages("q", [{"role": "user", "content": 3}], "assistant")
    assert info.value.param == "history.0.content"


def test_spec_messages_are_the_python_apis_messages(engine: ScriptedEngine) -> None:
    """The serving layer builds a turn's messages with the Python API's own builder (so a plain
    turn and the improvement pipeline's draft agree, e.g. an empty system prompt sends none)."""
    from llm_server.conversation_engine.inputs import build_messages

    prompts = {**PROMPTS, "silent": ""}
    service = ChatService(engine, prompts, max_new_tokens_limit=100)
    history = [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Note."}]
    for role in ("poet", "silent"):
        assert service.spec_messages("Write", history, role) == build_messages(prompts, "Write", role, history)
    assert service.spec_messages("Write", [], "silent") == [{"role": "user", "content": "Write"}]


# --- a turn runs on the event loop, and its stream owns cancellation ------------------------
class HeldEngine(ScriptedEngine):
    """Submits without generating: the test pushes each pass's events itself (no engine thread)."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        self.streams: list[GenerationStream] = []

    def submit(self, request: GenerationRequest) -> GenerationStream:
        self.requests.append(request)
        stream = GenerationStream(request.request_id)
        self.streams.append(stream)
        return stream


def _answer(stream: GenerationStream, text: str) -> None:
    stream.push(TextDelta(text))
    stream.push(Finished("stop", 5, 1, text))


class RoomEngine(HeldEngine):
    """Holds at most ``room`` unanswered passes; a submission beyond that is refused with ``refusal``."""

    def __init__(self, tokenizer: Any, room: int, refusal: type[Exception] = EngineOverloaded) -> None:
        super().__init__(tokenizer)
        self.room, self.refusal, self.answered, self.busiest = room, refusal, 0, 0

    def submit(self, request: GenerationRequest) -> GenerationStream:
        if len(self.streams) - self.answered >= self.room:
            raise self.refusal()
        stream = super().submit(request)
        self.busiest = max(self.busiest, len(self.streams) - self.answered)
        return stream

    def answer(self, index: int, text: str) -> None:
        self.answered += 1
        _answer(self.streams[index], text)


def _text_review_turn(monkeypatch: pytest.MonkeyPatch, engine: RoomEngine) -> TurnStream:
    monkeypatch.setattr("llm_server.serving.service.grammar_available", lambda: False)
    engine.start()
    service = ChatService(engine, PROMPTS, max_new_tokens_limit=100)
    return service.open(turn([{"role": "user", "content": "Explain"}], temperature=0.7, improvement=True))


def test_a_pass_with_no_room_beside_the_others_runs_after_them(tokenizer: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage 2 beside stage 1 on a full engine: review 2 is refused for room (EngineOverloaded), so it
    waits for review 1 and runs after it; the turn ends as it would one pass at a time."""
    engine = RoomEngine(tokenizer, room=1)
    stream = _text_review_turn(monkeypatch, engine)
    replies = {"draft": "A draft.", "review1": "Suggestions:\n1. x", "review2": "Suggestions:\n1. y",
               "revision1": "A draft.", "revision2": "A draft."}  # revisions repeat it: kept, no judge

    async def run() -> ChatDone:
        pending = asyncio.ensure_future(_last_event(stream))
        for index in range(len(replies)):
            await asyncio.to_thread(wait_until, lambda n=index: len(engine.streams) > n, what=f"pass {index}")
            engine.answer(index, replies[engine.requests[index].request_id.rsplit("-", 1)[1]])
        return await pending

    done = asyncio.run(run())
    assert [r.request_id.rsplit("-", 1)[1] for r in engine.requests] == list(replies)
    assert engine.busiest == 1 and done.result["suggestions2"] == "1. y" and done.result["reply"] == "A draft."


async def _last_event(stream: TurnStream) -> ChatDone:
    events = [event async for event in stream]
    assert isinstance(events[-1], ChatDone)
    return events[-1]


def test_passes_submitted_together_are_cancelled_when_one_is_refused(tokenizer: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Review 2 refused for another reason than room: the turn ends in that error, and review 1 is not
    left generating for nobody."""
    engine = RoomEngine(tokenizer, room=1, refusal=EngineUnavailable)
    stream = _text_review_turn(monkeypatch, engine)

    async def run() -> None:
        events = stream.__aiter__()
        engine.answer(0, "A draft.")
        with pytest.raises(EngineUnavailable):
            while True:
                await anext(events)

    asyncio.run(run())
    assert [r.request_id.rsplit("-", 1)[1] for r in engine.requests] == ["draft", "review1"]
    assert engine.streams[1].cancelled


def test_an_improvement_turn_holds_no_thread_and_its_stream_cancels_the_pass_in_flight(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("llm_server.serving.service.grammar_available", lambda: False)  # text reviews, streamed
    engine = HeldEngine(tokenizer)
    engine.start()
    service = ChatService(engine, PROMPTS, max_new_tokens_limit=100)

    async def run() -> None:
        threads = threading.active_count()
        opts = turn([{"role": "user", "content": "Explain"}], improvement=True, intermediate_steps=True,
                    request_id="r1")
        stream = service.open(opts)
        events = stream.__aiter__()
        assert await anext(events) == ChatDelta("### Draft answer\n\n")
        assert threading.active_count() == threads  # the turn waits on the event loop, in no thread
        _answer(engine.streams[0], "A draft.")
        assert await anext(events) == ChatDelta("A draft.")
        assert await anext(events) == ChatDelta("\n\n")
        assert await anext(events) == ChatDelta("### Review 1\n\n")
        pending = asyncio.ensure_future(anext(events))  # both reviews are submitted together, then waited on
        await asyncio.to_thread(wait_until, lambda: len(engine.streams) == 3, what="the review passes")
        assert [r.request_id for r in engine.requests] == ["r1-draft", "r1-review1", "r1-review2"]
        pending.cancel()  # the reader goes away mid-review
        await asyncio.gather(pending, return_exceptions=True)
        await events.aclose()
        assert engine.streams[1].cancelled and engine.streams[2].cancelled and len(engine.streams) == 3

    asyncio.run(run())
