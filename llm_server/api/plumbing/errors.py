"""Errors in OpenAI's shape, for every endpoint: ``{"error": {message, type, param, code}}``.

Validation errors are 400 (not FastAPI's default 422), so OpenAI clients and plain
``requests`` users see the same body everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """Raise from a route to answer with an OpenAI-shaped error."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type or _TYPES.get(status_code, "server_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status_code, headers=err.headers)


#: A union member's tag in a validation error's location (``input.str``): not a field name.
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|function-[a-z]+\[.*\]|constrained-.*)$")


def _is_json(request: Request) -> bool:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def validation_error(request: Request, exc: RequestValidationError) -> APIError:
    """FastAPI's validation error -> a 400 naming the field (never a character offset)."""
    first = exc.errors()[0] if exc.errors() else {}
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = str((first.get("ctx") or {}).get("error", "")).strip()
        return APIError(400, f"request body is not valid JSON{': ' + detail if detail else ''}", code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query") and not _UNION_TAG.match(str(p))]
    if not loc and request.method == "POST" and not _is_json(request):
        return APIError(400, "send the request body as JSON with the header Content-Type: application/json",
                        code="invalid_content_type")
    param = ".".join(loc) or None
    if kind == "missing":
        return APIError(400, f"{param} is required", param=param, code="missing_field")
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return APIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI, allow_header: Callable[[str], str]) -> None:
    """Map APIError, validation errors and HTTP errors to OpenAI-shaped JSON.

    ``allow_header(path)`` is the ``Allow`` header of a 405: every method some route serves at
    ``path`` (:func:`llm_server.api.plumbing.allowed_methods.allow_header`).

    (Crashes are answered by the request-context middleware, which adds the request id.)
    """

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(request, exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        message = str(exc.detail)
        if exc.status_code == 405:  # every route of the path, not only the first one's methods
            headers["Allow"] = allow_header(request.url.path)
            message = f"method {request.method} is not allowed here; allowed: {headers['Allow']}"
        return error_response(APIError(exc.status_code, message, headers=headers))
