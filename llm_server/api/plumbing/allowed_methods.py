"""HTTP methods: ``OPTIONS`` answered with the path's methods, and 405s with a correct ``Allow``.

Starlette answers a method a path does not route with 405, but its ``Allow`` header lists only
the methods of the *first* route of that path (``/chat/blocking`` has a GET and a POST route,
so it said ``Allow: POST``), and it answers ``OPTIONS`` the same way. Here both use every
route of the path: ``OPTIONS`` gets 204 with ``Allow`` (no key needed: it reveals nothing the
OpenAPI document does not), a path no route matches gets 404.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from llm_server.api.plumbing.errors import APIError, error_response

_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods some route of ``app`` answers at ``path`` (plus OPTIONS), in a stable order;
    empty when no route matches the path. Asks each route itself (Starlette's own matching), so
    included routers and mounts count too."""
    methods = [m for m in _ORDER[:-1] if any(_full_match(route, path, m) for route in app.router.routes)]
    if "GET" in methods and "HEAD" not in methods:  # answered by llm_server.api.plumbing.head
        methods.insert(methods.index("GET") + 1, "HEAD")
    return [*methods, "OPTIONS"] if methods else []


def _full_match(route: Any, path: str, method: str) -> bool:
    scope = {"type": "http", "path": path, "root_path": "", "method": method, "headers": []}
    match, _ = route.matches(scope)
    return bool(match == Match.FULL)


def allow_header(app: FastAPI, path: str) -> str:
    return ", ".join(allowed_methods(app, path))


class OptionsMiddleware:
    """Answers ``OPTIONS`` requests: 204 with ``Allow``, or 404 for a path nothing serves."""

    def __init__(self, app: ASGIApp, fastapi_app: FastAPI) -> None:
        self.app = app
        self.fastapi_app = fastapi_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "OPTIONS":
            await self.app(scope, receive, send)
            return
        methods = allowed_methods(self.fastapi_app, scope["path"])
        if not methods:
            await error_response(APIError(404, "Not Found", code="not_found"))(scope, receive, send)
            return
        await Response(status_code=204, headers={"Allow": ", ".join(methods)})(scope, receive, send)
