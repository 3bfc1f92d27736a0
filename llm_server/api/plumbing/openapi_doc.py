"""The OpenAPI document (``/openapi.json``, ``/docs``): what the server really does.

FastAPI's generated document is the starting point; :func:`install_openapi` rewrites it so
generated clients and fuzzers are not misled:

- every error a route can answer is listed (400, 401, 404, 408, 413, 499, 500, 503, in
  OpenAI's ``{"error": {...}}`` shape, 503 with ``Retry-After``) and FastAPI's 422, which
  never happens (validation errors are 400), is gone;
- the API key is a security scheme: ``X-API-Key`` header, ``Authorization: Bearer``, and the
  ``x_api_key`` query parameter on GET when the server allows it; none on ``/health`` (and
  on ``/metrics`` unless it needs a key);
- the GET forms of ``/chat/*`` list their query parameters; bodies and query values carry
  the bounds the server enforces (roles of this server, the max_new_tokens limit, seeds...);
- media types are the real ones: ``/metrics`` text/plain, ``/chat/stream`` text/plain,
  streamed ``/v1`` answers text/event-stream;
- each operation has its own id (GET and HEAD ``/health`` included).
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from llm_server.api.settings import ServerSettings
from llm_server.conversation_engine.inputs import HISTORY_ROLES
from llm_server.serving import sampling

Schema = dict[str, Any]

_ERROR_BODY: Schema = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}
_ERROR_WORDS = {
    400: "Invalid request: the message and `param` name the field",
    401: "Missing or wrong API key",
    404: "Unknown model (or path)",
    408: "The request body did not arrive in time",
    413: "Request body larger than the server's limit",
    499: "The client went away before the answer (logged and counted; never received)",
    500: "Generation failed",
    503: "Model loading, server overloaded or shutting down: retry after `Retry-After` seconds",
}
#: The one request rule of the OpenAI extension that JSON Schema cannot express (no "last item" keyword).
IMPROVEMENT_RULE = ("With `improvement: true` the last message (after any system message) must be the user's: "
                    "otherwise the answer is 400 with `param: messages`.")
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}
_HEALTH: Schema = {"type": "object", "required": ["status"], "properties": {
    "status": {"type": "string", "enum": ["ok", "loading", "draining", "error"]},
    "model": {"type": ["string", "null"]}, "running": {"type": "integer"}, "waiting": {"type": "integer"}}}
_PING: Schema = {"type": "object", "required": ["status"], "properties": {
    "status": {"type": "string", "enum": ["ok", "loading", "error"]}, "message": {"type": "string"}}}
_MODEL: Schema = {"type": "object", "required": ["id", "object"], "properties": {
    "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
    "owned_by": {"type": "string"}, "max_model_len": {"type": "integer"}}}
_COMPLETION: Schema = {"type": "object", "required": ["id", "object", "choices"], "properties": {
    "id": {"type": "string"}, "object": {"type": "string"}, "created": {"type": "integer"},
    "model": {"type": "string"}, "choices": {"type": "array"}, "usage": {"type": "object"}}}


#: ``POST /tokenize`` and ``/detokenize`` (api/protocols/tokenize_routes.py): their answers.
_TOKENIZER_PATHS: dict[str, Schema] = {
    "/tokenize": {"type": "object", "required": ["count", "max_model_len", "tokens", "token_strs"], "properties": {
        "count": {"type": "integer"}, "max_model_len": {"type": "integer"},
        "tokens": {"type": "array", "items": {"type": "integer"}},
        "token_strs": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]}}},
    "/detokenize": {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
}


_ANTHROPIC_ERROR_BODY: Schema = {
    "type": "object", "required": ["type", "error"],
    "properties": {"type": {"const": "error"}, "error": {
        "type": "object", "required": ["type", "message"],
        "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}},
}
_RESPONSE: Schema = {"type": "object", "required": ["id", "object", "status", "output"], "properties": {
    "id": {"type": "string"}, "object": {"const": "response"}, "status": {"type": "string"},
    "output": {"type": "array"}, "usage": {"type": ["object", "null"]}}}
_MESSAGE: Schema = {"type": "object", "required": ["id", "type", "role", "content", "stop_reason", "usage"],
                    "properties": {"id": {"type": "string"}, "type": {"const": "message"}, "content": {"type": "array"},
                                   "usage": {"type": "object"}}}
#: Paths whose errors are in Anthropic's shape (``{"type": "error", "error": {type, message}}``).
ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")
#: Paths that generate (400, 404 for an unknown model, 499, 500).
_GENERATING = ("/chat/", "/v1/chat", "/v1/completions", "/v1/responses", "/v1/messages")


def _error(status: int, headers: bool = False, anthropic: bool = False) -> Schema:
    body = _ANTHROPIC_ERROR_BODY if anthropic else _ERROR_BODY
    out: Schema = {"description": _ERROR_WORDS[status], "content": {"application/json": {"schema": body}}}
    if headers:
        out["headers"] = _RETRY_AFTER
    return out


def _json(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _text(description: str, media: str = "text/plain") -> Schema:
    return {"description": description, "content": {media: {"schema": {"type": "string"}}}}


# --- request schemas --------------------------------------------------------------------------
def _chat_fields(settings: ServerSettings) -> dict[str, Schema]:
    """The fields of the spec's chat request, with the bounds the server enforces."""
    turn = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"type": "string", "enum": list(HISTORY_ROLES)}, "content": {"type": "string"}}}
    return {
        "prompt": {"type": "string", "pattern": r"\S", "description": "the user's message (not blank)"},
        "history": {"type": "array", "items": turn, "description": "earlier turns, oldest first"},
        "improvement": {"type": "boolean", "default": False},
        "intermediate_steps": {"type": "boolean", "default": False},
        "role": {"type": "string", "enum": sorted(settings.system_prompts), "default": "assistant",
                 "description": "which system prompt (system_prompt_config.yaml) answers"},
        "max_new_tokens": _nullable({"type": "integer", "minimum": 1, "maximum": settings.max_new_tokens_limit}),
        "temperature": _nullable({"type": "number", "minimum": 0, "maximum": sampling.MAX_TEMPERATURE,
                                  "description": f"below {sampling.MIN_TEMPERATURE:g}: greedy"}),
        "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
    }


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _chat_body(settings: ServerSettings) -> Schema:
    return {"type": "object", "required": ["prompt"], "properties": _chat_fields(settings)}


def _chat_query(settings: ServerSettings) -> list[Schema]:
    params = []
    for name, schema in _chat_fields(settings).items():
        param: Schema = {"name": name, "in": "query", "required": name == "prompt"}
        if name == "history":  # JSON text in the query string
            param["content"] = {"application/json": {"schema": schema}}
        else:
            param["schema"] = schema
        params.append(param)
    return params


def _tighten_openai(schemas: dict[str, Schema], settings: ServerSettings) -> None:
    """The OpenAI request schemas, limited to what this server implements (else it answers 400)."""
    served = settings.served_model_name
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        props = schemas.get(name, {}).get("properties", {})
        if not props:
            continue
        props["model"] = {"type": "string", "description": f"this server serves `{served}`"}
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                props[field] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": settings.max_new_tokens_limit},
                                          {"type": "null"}]}
        if "best_of" in props:
            props["best_of"] = {"anyOf": [{"const": 1}, {"type": "null"}], "description": "only 1 is supported"}
        if "n" in props:
            props["n"] = {"anyOf": [{"const": 1}, {"type": "null"}],
                          "description": "1 .. 16 choices; above 1 only without stream (400 naming n)"}
        for field in ("presence_penalty", "frequency_penalty"):
            if field in props:
                props[field] = _nullable({"type": "number", "minimum": -2, "maximum": 2})
        if "min_p" in props:
            props["min_p"] = _nullable({"type": "number", "minimum": 0, "maximum": 1})
        if "top_k" in props:
            props["top_k"] = _nullable({"type": "integer", "minimum": -1, "description": "-1 or 0: off"})
        for field in ("tool_choice", "function_call"):
            if field in props:
                props[field] = {"anyOf": [{"enum": ["none", "auto"]}, {"type": "null"}]}
        if name == "ChatCompletionRequest" and "improvement" in props:  # a rule JSON Schema cannot say
            props["improvement"] = {**props["improvement"], "description": IMPROVEMENT_RULE}
        if name == "ChatCompletionRequest" and "role" in props:  # extension: a system-prompt name
            props["role"] = _nullable({"type": "string", "enum": sorted(settings.system_prompts)})
        if name == "CompletionRequest":
            text = {"type": "string", "minLength": 1}
            props["prompt"] = {"anyOf": [text, {"type": "array", "items": text, "minItems": 1, "maxItems": 1}],
                               "description": "one non-empty prompt"}
        if "seed" in props:  # exact 64-bit bounds do not survive JSON number handling in generators
            props["seed"] = _nullable({"type": "integer", "format": "int64"})
        for field in ("logit_bias", "tools", "functions", "audio", "prediction", "reasoning_effort",
                      "web_search_options", "suffix", "top_logprobs", "modalities"):
            props.pop(field, None)
        if "logprobs" in props:
            props["logprobs"] = {"anyOf": [{"const": False}, {"type": "null"}], "description": "not supported"}
        if "echo" in props:
            props["echo"] = {"type": "boolean", "description": "the prompt before the completion (not with logprobs)"}
        schemas[name]["additionalProperties"] = False
        schemas[name]["description"] = "Fields this server does not implement are refused with 400."
    if "ChatMessage" in schemas:
        msg = schemas["ChatMessage"]
        msg["properties"]["role"] = {"type": "string", "enum": ["system", "developer", "user", "assistant"]}
        msg["required"] = ["role", "content"]
        msg["properties"]["content"] = {"anyOf": [
            {"type": "string"}, {"type": "array", "items": {"$ref": "#/components/schemas/TextPart"}}]}
        msg["additionalProperties"] = False
    if "TextPart" in schemas:
        schemas["TextPart"] = {"type": "object", "required": ["type", "text"], "additionalProperties": False,
                               "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}


def _tighten_protocols(schemas: dict[str, Schema], settings: ServerSettings) -> None:
    """The Responses and Messages request schemas: the served model, the token limit, the roles."""
    limit = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": settings.max_new_tokens_limit}, {"type": "null"}]}
    for name, tokens in (("ResponsesRequest", "max_output_tokens"), ("MessagesRequest", "max_tokens"),
                         ("CountTokensRequest", None)):
        props = schemas.get(name, {}).get("properties", {})
        if not props:
            continue
        props["model"] = {"const": settings.served_model_name, "description": "the served model (else 404)"}
        if tokens is not None:
            props[tokens] = limit if name == "ResponsesRequest" else limit["anyOf"][0]
        for field in ("reasoning", "background", "top_logprobs", "max_tool_calls", "conversation", "prompt",
                      "thinking", "top_k", "truncation"):
            props.pop(field, None)
        schemas[name]["description"] = "Fields this server does not implement are refused with 400."
    if "MessageParam" in schemas:
        schemas["MessageParam"]["properties"]["role"] = {"type": "string", "enum": ["user", "assistant"]}


def _response_links(doc: Schema) -> None:
    """Links from a created response to reading and deleting it (for generated clients and fuzzers)."""
    created = doc.get("paths", {}).get("/v1/responses", {}).get("post", {}).get("responses", {}).get("200")
    if created is None:
        return
    by_id = {"response_id": "$response.body#/id"}
    created["links"] = {"GetResponse": {"operationId": "get_v1_responses_response_id", "parameters": by_id},
                        "DeleteResponse": {"operationId": "delete_v1_responses_response_id", "parameters": by_id}}


# --- operations -------------------------------------------------------------------------------
def _security(doc: Schema, settings: ServerSettings) -> tuple[list[Schema], list[Schema]]:
    """(for POST, for GET) security requirements, registering the schemes in ``doc``."""
    if getattr(settings, "open_access", False):
        return [], []
    schemes = doc.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes["ApiKeyHeader"] = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    schemes["BearerAuth"] = {"type": "http", "scheme": "bearer", "description": "the API key as a bearer token"}
    post: list[Schema] = [{"ApiKeyHeader": []}, {"BearerAuth": []}]
    if not settings.allow_query_api_key:
        return post, post
    schemes["ApiKeyQuery"] = {"type": "apiKey", "in": "query", "name": "x_api_key",
                              "description": "GET requests only (a browser link); never logged"}
    return post, [*post, {"ApiKeyQuery": []}]


def _errors(method: str, path: str, keyed: bool) -> dict[str, Schema]:
    out: dict[str, Schema] = {}
    if path == "/health":  # its 503 is the health body itself
        return out
    error = partial(_error, anthropic=path in ANTHROPIC_PATHS)
    generates = path.startswith(_GENERATING) and not path.startswith("/v1/responses/")
    tokenizer = path in _TOKENIZER_PATHS
    if generates or tokenizer or path.startswith("/v1/models/"):
        out["400"] = error(400)
    if path == "/v1/chat/completions":
        out["400"] = {**out["400"], "description": f"{_ERROR_WORDS[400]}. {IMPROVEMENT_RULE}"}
    if keyed:
        out["401"] = error(401)
    if path.startswith(("/v1/models/", "/v1/responses")) or generates and path.startswith("/v1/") or tokenizer:
        out["404"] = {**error(404), "description": "Unknown model, or unknown / evicted / another key's response"}
    if method == "post":
        out["408"] = error(408)
        out["413"] = error(413)
    if generates:
        out["499"] = {"description": _ERROR_WORDS[499]}
        out["500"] = error(500)
    out["503"] = error(503, headers=True)
    return out


def _operation_id(method: str, path: str) -> str:
    words = [w for w in path.replace("{", "").replace("}", "").split("/") if w]
    return "_".join([method, *words]).replace("-", "_") or method


def _success(method: str, path: str, settings: ServerSettings) -> dict[str, Schema]:
    if path == "/health":
        return {"200": _json("Ready", _HEALTH), "503": _json("Loading, draining or failed", _HEALTH)}
    if path == "/metrics":
        return {"200": _text("Prometheus text format")}
    if path == "/ping":
        return {"200": _json("The model can answer", _PING),
                "503": {**_json("The model is loading (or failed)", _PING), "headers": _RETRY_AFTER}}
    if path == "/chat/blocking":
        stages = {k: {"type": "string"} for k in ("draft_answer", "suggestions1", "revision1", "comments1",
                                                  "suggestions2", "revision2", "comments2")}
        return {"200": _json("The reply (and the improvement stages with intermediate_steps)",
                             {"type": "object", "required": ["reply"],
                              "properties": {"reply": {"type": "string"}, **stages}})}
    if path == "/chat/stream":
        return {"200": _text("Text chunks, then `[[END]]` (or `[[ERROR]] <message>`)")}
    if path == "/v1/models":
        return {"200": _json("The served model", {"type": "object", "properties": {
            "object": {"const": "list"}, "data": {"type": "array", "items": _MODEL}}})}
    if path.startswith("/v1/models/"):
        return {"200": _json("The served model", _MODEL)}
    if path.startswith("/v1/responses/"):
        if method == "delete":
            return {"200": _json("Deleted", {"type": "object", "required": ["id", "deleted"]})}
        return {"200": _json("The stored response", _RESPONSE)}
    if path == "/v1/messages/count_tokens":
        return {"200": _json("The prompt's tokens", {"type": "object", "required": ["input_tokens"],
                                                      "properties": {"input_tokens": {"type": "integer"}}})}
    if path in ("/v1/responses", "/v1/messages"):
        answer = _json("The whole answer (`stream: false`)", _RESPONSE if path == "/v1/responses" else _MESSAGE)
        answer["content"]["text/event-stream"] = {"schema": {}, "description": "`stream: true`: named events"}
        return {"200": answer}
    if path in _TOKENIZER_PATHS:
        return {"200": _json("vLLM's shape", _TOKENIZER_PATHS[path])}
    answer = _json("The whole answer (`stream: false`)", _COMPLETION)
    answer["content"]["text/event-stream"] = {"schema": {},  # each event: a chunk object, an error, or [DONE]
                                              "description": "`stream: true`: `data: {chunk}` ... `data: [DONE]`"}
    return {"200": answer}


def _rewrite_operation(doc: Schema, method: str, path: str, op: Schema, settings: ServerSettings,
                       security: tuple[list[Schema], list[Schema]]) -> None:
    keyed = path != "/health" and (path != "/metrics" or settings.metrics_require_key) and bool(security[0])
    op["operationId"] = _operation_id(method, path)
    op["responses"] = {**_success(method, path, settings), **_errors(method, path, keyed)}
    op["security"] = (security[1] if method == "get" else security[0]) if keyed else []
    if path in ("/chat/blocking", "/chat/stream"):
        if method == "get":
            op["parameters"] = _chat_query(settings)
        else:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _chat_body(settings)}}}
    if path.startswith("/v1/models/"):
        for param in op.get("parameters", []):
            param["schema"] = {"type": "string", "examples": [settings.served_model_name]}
            param["example"] = settings.served_model_name
    if method == "head":
        for response in op["responses"].values():
            response.pop("content", None)


def build_openapi(app: FastAPI) -> Schema:
    """The document for ``app`` (its routes and its settings)."""
    settings: ServerSettings = app.state.settings
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                      description="Chat with the configured model: the spec's API (/chat/*, /ping), "
                                  "an OpenAI-compatible API (/v1/*: Chat Completions, Completions, Responses), "
                                  "Anthropic's Messages API (/v1/messages) and operations (/health, /metrics).")
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    _tighten_openai(schemas, settings)
    _tighten_protocols(schemas, settings)
    security = _security(doc, settings)
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            _rewrite_operation(doc, method, path, op, settings, security)
    _response_links(doc)
    return doc


def install_openapi(app: FastAPI) -> None:
    """Serve :func:`build_openapi`'s document (built on first request, then cached)."""

    def openapi() -> Schema:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return copy.deepcopy(app.openapi_schema)

    app.openapi = openapi  # type: ignore[method-assign]
