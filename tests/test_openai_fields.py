"""OpenAI sampling fields through the official client on a real engine (tiny seeded model).

Each field is checked by what it does to the text: ``logit_bias`` bans and forces tokens, the
penalties stop repeats, ``top_k=1`` and ``min_p=1`` sample the greedy text; bad values are a 400
naming the field, and the server stays healthy.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.openai_harness import API_KEY, build_app, live_server

MODEL = "tiny"


@pytest.fixture(scope="module")
def url(tokenizer: Any, tiny_model: Any) -> Iterator[str]:
    from llm_server.engine.batch_engine import BatchEngine, EngineConfig

    engine = BatchEngine(tokenizer, tiny_model, MODEL, EngineConfig(max_running=4, max_total_tokens=4096))
    with live_server(build_app(engine)) as base:  # type: ignore[arg-type]
        yield base


def api(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)


def complete(url: str, **fields: Any) -> Any:
    extra = {k: fields.pop(k) for k in ("top_k", "min_p", "repetition_penalty") if k in fields}
    fields.setdefault("max_tokens", 24)
    return api(url).completions.create(model=MODEL, prompt="Hi", extra_body=extra or None, **fields)


def tokens(choice: Any) -> list[str]:
    return list(choice.logprobs.tokens)


def test_logit_bias_bans_and_forces_tokens(url: str, tokenizer: Any) -> None:
    plain = complete(url, temperature=0, logprobs=0).choices[0]
    plain_ids = {tokenizer.convert_tokens_to_ids(t) for t in tokens(plain)}
    banned = complete(url, temperature=0, logprobs=0, logit_bias={str(i): -100 for i in plain_ids}).choices[0]
    assert not plain_ids & {tokenizer.convert_tokens_to_ids(t) for t in tokens(banned)}
    forced_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" banana")[-1])
    forced = complete(url, temperature=1.0, max_tokens=6, logit_bias={str(forced_id): 100}).choices[0]
    assert forced.text == tokenizer.decode([forced_id] * 6)


def test_penalties_stop_repeats(url: str) -> None:
    plain = tokens(complete(url, temperature=0, logprobs=0, max_tokens=40).choices[0])
    assert len(set(plain)) < len(plain)  # the tiny model repeats itself
    for fields in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        penalised = tokens(complete(url, temperature=0, logprobs=0, max_tokens=40, **fields).choices[0])
        assert penalised != plain
        assert len(set(penalised)) > len(set(plain))
    chat = api(url).chat.completions
    question = [{"role": "user", "content": "Hi"}]
    first = chat.create(model=MODEL, messages=question, temperature=0, max_tokens=30, frequency_penalty=1.5)
    again = chat.create(model=MODEL, messages=question, temperature=0, max_tokens=30, frequency_penalty=1.5)
    plain_chat = chat.create(model=MODEL, messages=question, temperature=0, max_tokens=30)
    assert first.choices[0].message.content == again.choices[0].message.content  # greedy stays deterministic
    assert first.choices[0].message.content != plain_chat.choices[0].message.content


def test_top_k_one_and_min_p_one_give_the_greedy_text(url: str) -> None:
    greedy = complete(url, temperature=0).choices[0].text
    assert complete(url, temperature=1.5, top_k=1).choices[0].text == greedy
    assert complete(url, temperature=1.5, min_p=1.0).choices[0].text == greedy
    assert complete(url, temperature=1.5, top_k=-1, seed=3).choices[0].text != greedy


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"logit_bias": {"abc": 5}}, "logit_bias.abc"),
        ({"logit_bias": {"12": 150}}, "logit_bias.12"),
        ({"logit_bias": {"99999999": 1}}, None),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"top_k": -2}, "top_k"),
        ({"n": 17}, "n"),
        ({"n": 2, "best_of": 1}, "best_of"),
    ],
)
def test_bad_sampling_fields_are_400_naming_them(url: str, fields: dict[str, Any], param: str | None) -> None:
    for path, body in (("chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                       ("completions", {"prompt": "Hi"})):
        response = httpx.post(f"{url}/v1/{path}", json={"model": MODEL, "max_tokens": 4, **body, **fields},
                              headers={"Authorization": f"Bearer {API_KEY}"})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        if param is not None:
            assert error["param"] == param
        assert "logit_bias" in error["message"] or next(iter(fields)) in str(error)
    assert complete(url, temperature=0, max_tokens=3).choices[0].finish_reason == "length"  # still healthy


def test_n_choices(url: str) -> None:
    sampled = complete(url, temperature=1.0, n=3, seed=5, max_tokens=12)
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert len({c.text for c in sampled.choices}) == 3  # each choice its own draw
    assert sampled.usage.completion_tokens == 36 and sampled.usage.prompt_tokens > 0
    assert [c.text for c in complete(url, temperature=1.0, n=3, seed=5, max_tokens=12).choices] == [
        c.text for c in sampled.choices]  # seeded: reproducible
    greedy = api(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2,
                                              temperature=0, max_tokens=8)
    assert len(greedy.choices) == 2 and greedy.choices[0].message.content == greedy.choices[1].message.content
    assert greedy.usage is not None and greedy.usage.completion_tokens == 16


def test_echo_writes_the_prompt_before_the_completion(url: str) -> None:
    plain = complete(url, temperature=0, max_tokens=8).choices[0].text
    assert complete(url, temperature=0, max_tokens=8, echo=True).choices[0].text == "Hi" + plain
    chunks = list(api(url).completions.create(model=MODEL, prompt="Hi", max_tokens=8, temperature=0, echo=True,
                                              stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hi" + plain
