"""OpenAI's Predicted Outputs on /v1/chat/completions: the official client sends ``prediction``, the
usage reports accepted / rejected prediction tokens, the text is the greedy text without it; a bad
``prediction`` is a 400 naming the field, and the server stays healthy."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.openai_harness import API_KEY, build_app, live_server

MODEL = "tiny"
QUESTION = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def url(tokenizer: Any, tiny_model: Any) -> Iterator[str]:
    from llm_server.engine.batch_engine import BatchEngine, EngineConfig

    engine = BatchEngine(tokenizer, tiny_model, MODEL, EngineConfig(max_running=4, max_total_tokens=4096))
    with live_server(build_app(engine)) as base:  # type: ignore[arg-type]
        yield base


def chat(url: str, **fields: Any) -> Any:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
    fields.setdefault("max_tokens", 30)
    return client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, **fields)


def test_prediction_is_used_and_reported(url: str) -> None:
    plain = chat(url)
    text = plain.choices[0].message.content
    predicted = chat(url, prediction={"type": "content", "content": text})
    assert predicted.choices[0].message.content == text
    details = predicted.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 0
    assert details.rejected_prediction_tokens >= 0
    assert plain.usage.completion_tokens_details.accepted_prediction_tokens == 0
    parts = chat(url, prediction={"type": "content", "content": [{"type": "text", "text": text}]})
    assert parts.choices[0].message.content == text


@pytest.mark.parametrize("prediction, param", [
    ("just text", "prediction"),
    ({"type": "image", "content": "x"}, "prediction"),
    ({"type": "content"}, "prediction"),
    ({"type": "content", "content": 5}, "prediction.content"),
])
def test_bad_prediction_is_a_400_naming_the_field(url: str, prediction: Any, param: str) -> None:
    response = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": MODEL, "messages": QUESTION, "max_tokens": 4, "prediction": prediction})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert chat(url, max_tokens=3).choices[0].message.content is not None  # still healthy
