"""The structured-output libraries people use, against the server on the embedded model (issue 26).

instructor's ``Mode.TOOLS`` and LangChain's ``with_structured_output(method="function_calling")``
both send a named ``tool_choice`` and accept exactly one call whose arguments validate. Each must
succeed ten times in a row at the server's default temperature (the request sets none), with no
retry by the library: one extra call, or arguments that do not fit the schema, fails the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from tests.openai_harness import API_KEY
from tests.test_tools_api import client, embedded_url  # noqa: F401

RUNS = 10
TEXT = "Extract the person from this sentence: Maria Lopez is a 34 year old engineer from Madrid."


class Person(BaseModel):
    name: str
    age: int


@pytest.fixture(scope="module")
def url(embedded_url: str) -> Iterator[str]:  # noqa: F811
    yield embedded_url


@pytest.mark.integration
def test_instructor_tools_mode_ten_in_a_row(url: str) -> None:
    instructor = pytest.importorskip("instructor")
    api = instructor.from_openai(client(url), mode=instructor.Mode.TOOLS)
    people: list[Any] = []
    for _ in range(RUNS):
        person = api.chat.completions.create(model="m", response_model=Person, max_retries=0, max_tokens=120,
                                             messages=[{"role": "user", "content": TEXT}])
        assert isinstance(person, Person)
        people.append(person)
    assert len(people) == RUNS


@pytest.mark.integration
def test_langchain_function_calling_ten_in_a_row(url: str) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    model = langchain_openai.ChatOpenAI(base_url=f"{url}/v1", api_key=API_KEY, model="m", max_retries=0,
                                        max_tokens=120)
    structured = model.with_structured_output(Person, method="function_calling", include_raw=True)
    for _ in range(RUNS):
        result = structured.invoke(TEXT)
        assert result["parsing_error"] is None, result["raw"]
        assert isinstance(result["parsed"], Person)
        assert len(result["raw"].tool_calls) == 1
