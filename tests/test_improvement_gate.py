"""The improvement pipeline's acceptance gate, with a scripted fake model: a good draft survives a
junk revision, a better revision is adopted, and every decision is explained (no real model)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from llm_server.conversation_engine.improvement import (
    RESULT_KEYS,
    STAGE_HEADINGS,
    Pass,
    advance,
    improvement_pipeline,
    improvement_steps,
    opening,
    pass_options,
    review_schema,
)
from llm_server.conversation_engine.improvement_gate import (
    FALLBACK_JUDGE_PROMPT,
    JUDGE_MAX_NEW_TOKENS,
    LOOP_CHARS,
    RECITE_CHARS,
    VERDICT_SCHEMA,
    WATCH_EVERY,
    GateDecision,
    RunawayWatch,
    candidate_problem,
    read_verdict,
    recites,
    repeats_itself,
    runaway_problem,
)
from llm_server.conversation_engine.improvement_parsing import REVISION_STOPS, parse_revision, parse_suggestions

PROMPTS = {"assistant": "You answer.", "reviser": "You revise."}
QUESTION = "Explain how REST APIs work"
DRAFT = ("REST APIs expose resources at URLs. Clients use HTTP methods: GET reads a resource, POST creates one, "
         "PUT replaces it and DELETE removes it. Responses carry a status code and usually JSON.")
BETTER = DRAFT + " Each request is stateless: it carries everything the server needs, such as an auth token."
REVIEW = json.dumps({"suggestions": ["Mention statelessness.", "Give an example."]})

Judge = Callable[[str, str], str]  # (answer A, answer B) -> "A" | "B"


def prefers(text: str) -> Judge:
    """A judge that picks whichever answer contains ``text`` (else "A")."""
    return lambda a, b: "B" if text in b and text not in a else "A"


class FakeModel:
    """A scripted GenerateFn: answers each pass by its kind (draft, review, revision, judge)."""

    def __init__(self, revisions: list[str], judge: Judge | None = None, draft: str = DRAFT) -> None:
        self.draft = draft
        self.revisions = list(revisions)
        self.judge = judge or prefers("stateless")
        self.passes: list[tuple[list[dict[str, str]], dict[str, Any]]] = []

    def __call__(self, messages: list[dict[str, str]], **options: Any) -> Iterator[str]:
        self.passes.append((messages, options))
        text = self._reply(messages[-1]["content"], options)
        for start in range(0, len(text), 9):
            yield text[start : start + 9]

    def _reply(self, prompt: str, options: dict[str, Any]) -> str:
        if options.get("schema") == VERDICT_SCHEMA:
            a = prompt.split("Answer A:\n", 1)[1].split("\n\nAnswer B:\n", 1)[0]
            b = prompt.split("\n\nAnswer B:\n", 1)[1].split(f"\n\n{FALLBACK_JUDGE_PROMPT}", 1)[0]
            return json.dumps({"better": self.judge(a, b)})
        if _is_review(options):
            return REVIEW
        if "Rewrite answer A" in prompt:
            return self.revisions.pop(0)
        return self.draft

    def names(self) -> list[str]:
        return [kind for _, options in self.passes for kind in [_kind(options)]]


def _is_review(options: dict[str, Any]) -> bool:
    return "suggestions" in (options.get("schema") or {}).get("properties", {})


def _kind(options: dict[str, Any]) -> str:
    if options.get("schema") == VERDICT_SCHEMA:
        return "judge"
    if _is_review(options):
        return "review"
    return "revision" if options.get("prediction") else "draft"


Outcome = tuple[str, dict[str, str], list[GateDecision]]


def improve(model: FakeModel, steps: bool = False, gate: str = "judge") -> Outcome:
    result: dict[str, str] = {}
    decisions: list[GateDecision] = []
    text = "".join(improvement_pipeline(model, PROMPTS, [], QUESTION, intermediate_steps=steps, result=result,
                                        structured=True, decisions=decisions, gate=gate))
    return text, result, decisions


def test_a_stages_passes_share_their_opening() -> None:
    """Review, revision and the first verdict of a stage begin with the same messages (the reviser's
    prompt, the history, the question and the answer under review), so the engine's prefix cache
    prefills that part once per stage; the judge's instructions come after the two answers."""
    model = FakeModel([BETTER, BETTER])
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    list(improvement_pipeline(model, PROMPTS, history, QUESTION, structured=True))
    review, revision, verdict = (model.passes[i][0] for i in (1, 2, 3))
    assert [model.names()[i] for i in (1, 2, 3)] == ["review", "revision", "judge"]
    start = opening(QUESTION, DRAFT)
    for messages in (review, revision, verdict):
        assert messages[:-1] == [{"role": "system", "content": PROMPTS["reviser"]}, *history]
        assert messages[-1]["content"].startswith(start)
    assert verdict[-1]["content"].index(f"Answer B:\n{BETTER}") < verdict[-1]["content"].index(FALLBACK_JUDGE_PROMPT)


# --------------------------------------------------------------------------- keeping a good draft


@pytest.mark.parametrize("junk, reason", [
    ("6.5", "bare number"),
    ("improved version of suggested improvements", "under a third"),
    ("1. Mention statelessness. 2. Give an example.", "under a third"),
    ("{{json_object}}}", "template"),
    ("This includes providing examples.", "under a third"),
    ("", "empty"),
])
def test_a_good_draft_survives_junk_revisions(junk: str, reason: str) -> None:
    model = FakeModel([junk, junk])
    text, result, decisions = improve(model)
    assert result["reply"] == result["revision1"] == result["revision2"] == DRAFT == text
    assert reason in result["comments1"] and reason in result["comments2"]
    assert result["comments1"].startswith("Kept the previous answer")
    assert not any(d.adopted for d in decisions)
    assert "judge" not in model.names()  # a revision failing the checks costs no judgement


def test_a_judge_with_position_bias_cannot_adopt_a_revision() -> None:
    """A model that always answers "A" prefers the revision in one order only: it is kept out."""
    model = FakeModel([BETTER.replace("stateless", "sessionless"), BETTER], judge=lambda a, b: "A")
    _, result, decisions = improve(model)
    assert result["reply"] == DRAFT
    assert [d.votes for d in decisions] == [(False,), (False,)]  # lost the first order: no second asked
    model = FakeModel([BETTER, BETTER], judge=lambda a, b: "B")
    _, result, decisions = improve(model)
    assert result["reply"] == DRAFT and decisions[0].votes == (True, False)
    assert "1 of 2 orders" in result["comments1"]


def test_a_revision_repeating_the_answer_is_not_judged() -> None:
    model = FakeModel([DRAFT.upper(), DRAFT])
    _, result, _ = improve(model)
    assert "repeats it" in result["comments1"] and "judge" not in model.names()


# --------------------------------------------------------------------------- adopting a better revision


def test_a_better_revision_is_adopted_when_it_wins_both_orders() -> None:
    model = FakeModel([BETTER, BETTER + " Example: GET /users/7 returns one user."])
    text, result, decisions = improve(model)
    assert result["revision1"] == BETTER
    assert result["comments1"].startswith("Adopted the revision") and "both orders" in result["comments1"]
    assert result["reply"] == result["revision2"] == BETTER  # revision 2 did not beat revision 1 (no new fact)
    assert text == BETTER
    assert [d.votes for d in decisions] == [(True, True), (False,)]
    assert model.names() == ["draft", "review", "revision", "judge", "judge", "review", "revision", "judge"]


def test_checks_policy_adopts_a_sane_revision_without_judging_and_none_adopts_junk() -> None:
    model = FakeModel([BETTER, BETTER])
    _, result, _ = improve(model, gate="checks")
    assert result["reply"] == BETTER and "judge" not in model.names()
    _, result, _ = improve(FakeModel(["6.5", "6.5"]), gate="none")
    assert result["reply"] == "6.5"  # what the gate prevents


def test_unknown_gate_policy_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown gate 'maybe'"):
        improve(FakeModel([]), gate="maybe")


# --------------------------------------------------------------------------- the passes and the stream


@pytest.mark.parametrize(("answer", "items", "longest"), [
    ("The capital of Egypt is Cairo.", 1, 60),  # a one-line answer: one short suggestion
    ("x" * 159, 1, 159),
    ("x" * 160, 2, 80),
    ("x" * 300, 2, 150),  # two suggestions that together are no longer than the answer
    ("x" * 479, 2, 200),
    ("x" * 480, 3, 160),
    ("x" * 2000, 3, 200),
])
def test_a_review_is_bounded_by_the_answer_it_reviews(answer: str, items: int, longest: int) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = review_schema(answer)
    good = {"suggestions": ["Say more."] * items}
    jsonschema.validate(good, schema)
    for bad in ({"suggestions": ["Say more."] * (items + 1)}, {"suggestions": ["y" * (longest + 1)]},
                {"suggestions": []}, {"suggestions": ["{{<ref>"]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    jsonschema.validate({"suggestions": ["y" * longest]}, schema)
    words = {1: "List one improvement ", 2: "List one or two improvements ", 3: "List one to three improvements "}
    steps = improvement_steps(PROMPTS, [], QUESTION, structured=True)
    advance(steps)
    review = advance(steps, answer).next_pass
    assert review is not None and review.schema == schema and words[items] in review.messages[-1]["content"]


def test_passes_carry_budget_prediction_and_verdict_constraints() -> None:
    result: dict[str, str] = {}
    steps = improvement_steps(PROMPTS, [], QUESTION, result=result, structured=True)
    draft = advance(steps).next_pass
    assert draft is not None and draft.name == "draft" and pass_options(draft) == {}
    review = advance(steps, DRAFT).next_pass
    assert review is not None and review.name == "review1" and review.schema == review_schema(DRAFT)
    revision = advance(steps, REVIEW).next_pass
    assert revision is not None and isinstance(revision.stop_when, RunawayWatch)  # ended once it runs away
    assert revision == Pass(revision.messages, name="revision1", prediction=DRAFT,  # the draft's budget, free text
                            stop=REVISION_STOPS,  # ended where it echoes its prompt
                            repetition_penalty=1.0,  # not pushed away from the answer it rewrites
                            stop_when=revision.stop_when)
    assert DRAFT in revision.messages[-1]["content"] and "Mention statelessness." in revision.messages[-1]["content"]
    judge = advance(steps, BETTER).next_pass
    assert judge is not None and judge.name == "judge1a"
    assert pass_options(judge) == {"schema": VERDICT_SCHEMA, "max_new_tokens": JUDGE_MAX_NEW_TOKENS,
                                   "do_sample": False}
    assert judge.messages[-1]["content"].split("Answer B:\n")[1].startswith(BETTER)  # the revision second
    second = advance(steps, '{"better": "B"}').next_pass
    assert second is not None and second.name == "judge1b"
    assert second.messages[-1]["content"].split("Answer B:\n")[1].startswith(DRAFT + "\n")  # then first
    review2 = advance(steps, '{"better": "A"}').next_pass
    assert review2 is not None and review2.name == "review2" and BETTER in review2.messages[-1]["content"]
    assert result["revision1"] == BETTER and result["suggestions1"] == "1. Mention statelessness.\n2. Give an example."


def test_greedy_stage_two_is_not_run_again_when_stage_one_kept_the_draft() -> None:
    model = FakeModel(["6.5"])
    result: dict[str, str] = {}
    list(improvement_pipeline(model, PROMPTS, [], QUESTION, result=result, structured=True, greedy=True))
    assert model.names() == ["draft", "review", "revision"]
    assert result["suggestions2"] == result["suggestions1"] and "bare number" in result["comments2"]
    assert "Review 2 was not run" in result["comments2"] and result["reply"] == result["revision2"] == DRAFT


def test_greedy_stage_two_runs_on_an_adopted_revision() -> None:
    model = FakeModel([BETTER, "6.5"])
    result: dict[str, str] = {}
    list(improvement_pipeline(model, PROMPTS, [], QUESTION, result=result, structured=True, greedy=True))
    assert model.names() == ["draft", "review", "revision", "judge", "judge", "review", "revision"]
    assert result["revision1"] == result["reply"] == BETTER and "bare number" in result["comments2"]
    assert BETTER in model.passes[5][0][-1]["content"]  # review 2 reads the adopted revision


@pytest.mark.parametrize("do_sample, passes", [(False, ["draft", "review", "revision"]),
                                               (True, ["draft", "review", "revision", "review", "revision"])])
def test_the_python_api_reads_greedy_decoding_from_the_configured_parameters(
    monkeypatch: pytest.MonkeyPatch, do_sample: bool, passes: list[str]
) -> None:
    """``do_sample: false`` in model_config.yaml's parameters (not passed by the caller) is greedy
    decoding: stage 2 is not run again when stage 1 kept the draft."""
    from llm_server.conversation_engine import outputs

    model = FakeModel(["6.5", "6.5"])
    monkeypatch.setattr(outputs, "make_generate_fn", lambda tok, hf_model, **kwargs: model)
    monkeypatch.setattr(outputs, "grammar_available", lambda: True)
    result: dict[str, str] = {}
    list(outputs.stream_and_improve_reply(None, object(), PROMPTS, QUESTION, result=result,
                                          config_parameters={"max_new_tokens": 8, "do_sample": do_sample}))
    assert model.names() == passes
    assert ("Review 2 was not run" in result["comments2"]) is not do_sample and result["reply"] == DRAFT


def _together(model: FakeModel) -> tuple[dict[str, str], list[GateDecision], list[list[str]]]:
    """An improvement turn whose driver runs passes together (in order here): its result, decisions and the
    names of the passes asked at each step."""
    result: dict[str, str] = {}
    decisions: list[GateDecision] = []
    steps = improvement_steps(PROMPTS, [], QUESTION, result=result, structured=True, decisions=decisions,
                              together=True)
    asked: list[list[str]] = []
    step = advance(steps)
    while step.passes:
        asked.append([one.name for one in step.passes])
        texts = tuple("".join(model(one.messages, **pass_options(one))) for one in step.passes)
        step = advance(steps, step.reply(texts))
    return result, decisions, asked


def test_stage_two_runs_beside_stage_one_on_the_draft_when_sampled() -> None:
    result, decisions, asked = _together(FakeModel(["6.5", "Paris"]))
    assert asked == [["draft"], ["review1", "review2"], ["revision1", "revision2"]]
    assert [d.stage for d in decisions] == [1, 2] and decisions[1].previous == DRAFT
    assert "bare number" in result["comments1"] and "fragment" in result["comments2"] and result["reply"] == DRAFT


def test_stage_two_is_run_again_on_the_revision_stage_one_adopts() -> None:
    """What running the stages one after the other gives: stage 2 reviews the answer stage 1 put in force."""
    result, decisions, asked = _together(FakeModel([BETTER, "6.5", "Paris"]))
    assert asked == [["draft"], ["review1", "review2"], ["revision1", "revision2"], ["judge1a"], ["judge1b"],
                     ["review2"], ["revision2"]]
    assert [d.stage for d in decisions] == [1, 2] and decisions[1].previous == BETTER
    assert result["revision1"] == result["reply"] == BETTER and "fragment" in result["comments2"]


def test_intermediate_steps_show_each_decision_under_its_review() -> None:
    text, result, _ = improve(FakeModel([BETTER, "6.5"]), steps=True)
    positions = [text.index(heading + "\n\n") for heading in STAGE_HEADINGS]
    assert positions == sorted(positions) and text.count("### ") == len(STAGE_HEADINGS)
    assert (f"### Review 1\n\nSuggestions:\n1. Mention statelessness.\n2. Give an example.\n\n"
            f"Comments: {result['comments1']}\n\n### Revision 1\n\n{BETTER}\n\n") in text
    assert f"Comments: {result['comments2']}\n\n### Final answer\n\n{BETTER}\n\n" in text
    assert "bare number" in result["comments2"] and tuple(result) == RESULT_KEYS


def test_text_reviews_stream_live_and_the_decision_follows() -> None:
    def generate(messages: list[dict[str, str]], **options: Any) -> Iterator[str]:
        prompt = messages[-1]["content"]
        if "Which answer is better" in prompt:
            yield "B" if "stateless" in prompt.split("Answer B:")[1] else "A"
        elif "Rewrite answer A" in prompt:
            yield BETTER
        elif "Review answer A" in prompt:
            yield "Suggestions:\n1. Mention statelessness."
        else:
            yield DRAFT

    result: dict[str, str] = {}
    text = "".join(improvement_pipeline(generate, PROMPTS, [], QUESTION, intermediate_steps=True, result=result))
    assert "### Review 1\n\nSuggestions:\n1. Mention statelessness.\n\nComments: Adopted the revision" in text
    assert result["suggestions1"] == "1. Mention statelessness."
    assert result["reply"] == BETTER  # the unconstrained judge's letters are read from free text
    assert "repeats it" in result["comments2"]


def test_a_generate_function_without_options_still_runs_every_pass() -> None:
    calls: list[list[dict[str, str]]] = []

    def generate(messages: list[dict[str, str]]) -> Iterator[str]:
        calls.append(messages)
        yield DRAFT if len(calls) == 1 else "Suggestions:\n1. x"

    result: dict[str, str] = {}
    list(improvement_pipeline(generate, PROMPTS, [], QUESTION, result=result))
    assert result["reply"] == DRAFT and len(calls) == 5  # draft, then review + revision twice (no judge needed)


# --------------------------------------------------------------------------- checks and parsers


@pytest.mark.parametrize("candidate, previous, problem", [
    ("42", "The answer is 42.", "bare number"),
    ("Paris", "The capital of France is Paris.", "fragment"),
    ("The capital of France is Paris.", "Paris", None),
    ("Paris is the capital and largest city of France.", "The capital of France is Paris.", None),
    ("As the draft answer says, Paris.", "The capital of France is Paris.", "talks about the review"),
    ("<the complete improved answer>", "The capital of France is Paris.", "template"),
    # seen on the embedded model (docs/improvement.md): review talk and a Jinja echo
    ("The original answer was incorrect, 7 times 8 is 54.", "7 * 8 = 56.", "talks about the review"),
    ("The suggested improvement is to add the year of the landing.", "Humans first landed on the Moon in 1969.",
     "talks about the review"),
    ("{% highlight python %} print(1) {% endhighlight %}", "Use print(1) to print one.", "template"),
    ("The original recipe uses two eggs and a cup of flour.", "Use two eggs.", None),
])
def test_candidate_checks(candidate: str, previous: str, problem: str | None) -> None:
    found = candidate_problem(candidate, previous, previous, "1. Add the river.")
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_a_copy_of_the_suggestions_is_rejected() -> None:
    suggestions = "1. Mention that the Seine flows through Paris.\n2. Give the population of the city."
    copy = "Mention that the Seine flows through Paris. Give the population of the city."
    assert "copies the suggestions" in (candidate_problem(copy, "Paris is the capital.", "Paris is the capital.",
                                                          suggestions) or "")


@pytest.mark.parametrize("text, verdict", [
    ('{"better": "A"}', "A"), ('{"better": "B"}', "B"), ("B is better.", "B"), ("Answer A.", "A"),
    ("Both are fine.", None), ('{"better": "C"}', None),
])
def test_read_verdict(text: str, verdict: str | None) -> None:
    assert read_verdict(text) == verdict


@pytest.mark.parametrize("text, answer", [
    ("Paris is the capital.\n\nRemoved unnecessary spaces.\n\nThis response meets all the requirements.",
     "Paris is the capital."),
    ("Here is the improved answer:\nParis is the capital.", "Paris is the capital."),
    ("Revised answer:\nParis is the capital.\n\nComments:\nAdded nothing.", "Paris is the capital."),
    ('"Paris is the capital."', "Paris is the capital."),
    ("None", ""),
    ("The capital of Egypt is Cairo.\n\nRewrite answer A, applying the suggestions", "The capital of Egypt is Cairo."),
    ("Cairo is the capital.\n\nQuestion:\nWhat is", "Cairo is the capital."),
])
def test_parse_revision(text: str, answer: str) -> None:
    assert parse_revision(text) == answer


@pytest.mark.parametrize("text, suggestions", [
    ('{"suggestions": ["Add the river.", " ", "Name the  mayor."]}', "1. Add the river.\n2. Name the mayor."),
    ('{"suggestions": ["Add the river.", "Name the ma', "1. Add the river."),  # cut short by max_new_tokens
    ("Suggestions:\n1. Add the river.\nComments: x", "1. Add the river."),
])
def test_parse_suggestions(text: str, suggestions: str) -> None:
    assert parse_suggestions(text, structured=True) == suggestions


# --- runaway revisions ----------------------------------------------------------------------
INSTRUCTIONS = ("You are an expert at taking the user's drafts and improving them. Your job is to make draft "
                "answers better by including more relevant facts and correcting errors.")
LOOPING = DRAFT + " That is the end of the last part of the last part of the last part of the last part of it."
RECITING = DRAFT + " Your job is to make draft answers better by including more relevant facts, always."


def test_runaway_checks() -> None:
    assert repeats_itself(LOOPING) and not repeats_itself(DRAFT) and not repeats_itself(BETTER)
    assert not repeats_itself("ab" * 11)  # a passage under LOOP_CHARS[0] characters is not a loop
    assert repeats_itself("x" * LOOP_CHARS[0] * 2)
    assert recites(RECITING, INSTRUCTIONS) and not recites(DRAFT, INSTRUCTIONS)
    assert not recites(INSTRUCTIONS[: RECITE_CHARS - 1], INSTRUCTIONS)
    assert runaway_problem(LOOPING, DRAFT, INSTRUCTIONS) == "repeats itself"
    assert runaway_problem(RECITING, DRAFT, INSTRUCTIONS) == "recites its instructions"
    assert runaway_problem(BETTER, DRAFT, INSTRUCTIONS) is None
    # what the previous answer already did is not held against its revision
    assert runaway_problem(LOOPING + " More.", LOOPING, INSTRUCTIONS) is None
    assert runaway_problem(RECITING + " More.", RECITING, INSTRUCTIONS) is None


@pytest.mark.parametrize("text", [LOOPING * 3, RECITING + " " + BETTER * 2, BETTER * 1 + " And more words." * 3])
def test_the_watch_fires_only_once_the_checks_hold_and_soon_after(text: str) -> None:
    """Fed the text chunk by chunk, the watch fires only on a prefix the checks reject (so stopping
    there decides what running to the end would), and within WATCH_EVERY + a chunk of where they first do."""
    watch = RunawayWatch(DRAFT, INSTRUCTIONS)
    first_bad = next((end for end in range(len(text) + 1) if runaway_problem(text[:end], DRAFT, INSTRUCTIONS)), None)
    fired = next((end for end in range(7, len(text) + 7, 7) if watch(text[:end])), None)
    if first_bad is None:
        assert fired is None
    else:
        assert fired is not None and runaway_problem(text[:fired], DRAFT, INSTRUCTIONS) is not None
        assert fired - first_bad <= WATCH_EVERY + 7


class _Endless(FakeModel):
    """Its revisions loop for 2,000 chunks, counting how many were read."""

    def __init__(self) -> None:
        super().__init__([])
        self.revision_chunks = 0

    def __call__(self, messages: list[dict[str, str]], **options: Any) -> Iterator[str]:
        if "Rewrite answer A" not in messages[-1]["content"]:
            yield from super().__call__(messages, **options)
            return
        self.passes.append((messages, options))
        for _ in range(2000):
            self.revision_chunks += 1
            yield "of the last part "


def test_a_revision_that_loops_is_stopped_at_once_and_the_draft_kept() -> None:
    model = _Endless()
    text, result, decisions = improve(model, steps=True)
    assert 0 < model.revision_chunks < 20  # about WATCH_EVERY characters, not the 2,000 chunks
    assert result["comments1"] == "Kept the previous answer: the revision repeats itself."
    assert result["reply"] == result["revision2"] == DRAFT
    assert "judge" not in model.names()  # rejected without a verdict
    assert decisions[0].problem == "repeats itself" and "Comments: Kept the previous answer" in text


def test_without_a_gate_revisions_are_not_watched() -> None:
    steps = improvement_steps(PROMPTS, [], QUESTION, structured=True, gate="none")
    advance(steps)
    advance(steps, DRAFT)
    revision = advance(steps, REVIEW).next_pass
    assert revision is not None and revision.name == "revision1" and revision.stop_when is None
