"""The OpenAPI document tells the truth (issue 12, defect 7), and schemathesis agrees.

The document is checked for what a generated client relies on; then schemathesis
(``--checks all``, every phase, a fixed seed, with the key; few examples here, more in
``make fuzz`` against the real model) runs against a live server on the scripted engine
and must find nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from llm_server.api.server import create_app
from llm_server.api.settings import ServerSettings
from tests.fakes import ScriptedEngine
from tests.fuzz_api import run_schemathesis, served

KEY = "doc-key"


@pytest.fixture(scope="module")
def client(tokenizer: Any) -> Iterator[TestClient]:
    app = create_app(lambda: ScriptedEngine(tokenizer), settings=ServerSettings(api_keys=(KEY,)))
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def doc(client: TestClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            yield method, path, op


def test_no_422_and_the_real_errors_are_listed(doc: dict[str, Any]) -> None:
    assert all("422" not in op["responses"] for _, _, op in operations(doc))
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "401", "404", "413", "499", "503"} <= set(chat)
    assert "Retry-After" in chat["503"]["headers"]
    spec = doc["paths"]["/chat/blocking"]["post"]["responses"]
    assert {"400", "401", "413", "499", "503"} <= set(spec)
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def test_the_key_is_a_security_scheme(doc: dict[str, Any]) -> None:
    schemes = doc["components"]["securitySchemes"]
    assert schemes["ApiKeyHeader"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["ApiKeyQuery"]["in"] == "query" and schemes["ApiKeyQuery"]["name"] == "x_api_key"
    get_security = doc["paths"]["/chat/blocking"]["get"]["security"]
    post_security = doc["paths"]["/chat/blocking"]["post"]["security"]
    assert {"ApiKeyQuery": []} in get_security and {"ApiKeyQuery": []} not in post_security
    assert doc["paths"]["/health"]["get"]["security"] == []


def test_get_chat_lists_its_query_parameters(doc: dict[str, Any]) -> None:
    for path in ("/chat/blocking", "/chat/stream"):
        params = {p["name"]: p for p in doc["paths"][path]["get"]["parameters"]}
        assert set(params) >= {"prompt", "history", "improvement", "intermediate_steps", "role", "max_new_tokens"}
        assert params["prompt"]["required"] is True


def test_media_types_are_the_real_ones(doc: dict[str, Any]) -> None:
    paths = doc["paths"]
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert set(paths["/chat/stream"]["post"]["responses"]["200"]["content"]) == {"text/plain"}
    assert "text/event-stream" in paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]


def test_operation_ids_are_distinct(doc: dict[str, Any]) -> None:
    ids = [op["operationId"] for _, _, op in operations(doc)]
    assert len(ids) == len(set(ids))
    assert doc["paths"]["/health"]["get"]["operationId"] != doc["paths"]["/health"]["head"]["operationId"]


def test_options_lists_every_method_of_the_path(client: TestClient) -> None:
    response = client.options("/chat/blocking")
    assert response.status_code == 204
    assert response.headers["allow"] == "GET, HEAD, POST, OPTIONS"  # HEAD: api/head.py
    assert client.options("/nowhere").status_code == 404


def test_405_lists_every_method_and_is_an_invalid_request(client: TestClient) -> None:
    response = client.delete("/chat/blocking", headers={"X-API-Key": KEY})
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD, POST, OPTIONS"  # HEAD: api/head.py
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_the_documented_chat_body_is_accepted(client: TestClient) -> None:
    """A request built from the document (role from its enum, bounds from its schema) is a 200."""
    doc = client.get("/openapi.json").json()
    fields = doc["paths"]["/chat/blocking"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    role = fields["properties"]["role"]["enum"][0]
    limit = fields["properties"]["max_new_tokens"]["anyOf"][0]["maximum"]
    response = client.post("/chat/blocking", json={"prompt": "Hi", "role": role, "max_new_tokens": limit},
                           headers={"X-API-Key": KEY})
    assert response.status_code == 200, response.text


def test_schemathesis_finds_nothing_on_the_scripted_engine() -> None:
    with served(real=False) as url:
        result = run_schemathesis(url, examples=8)
    assert result.returncode == 0, result.stdout[-15000:]
    assert "No issues found" in result.stdout
