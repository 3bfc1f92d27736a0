"""The built-in chat page: GET / (no key needed) and GET /ui/config (roles and limits, keyed).

The page is one self-contained HTML file shipped in the package (``api/page/static/index.html``,
inline CSS and JS, nothing fetched from elsewhere). It is served with a strict
Content-Security-Policy that allows only its own inline script and style (by hash) and
requests to this server, as a second line of defence behind the page's own rule of never
turning model output into HTML.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from functools import lru_cache
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from llm_server.api.plumbing.auth import require_api_key
from llm_server.api.settings import ServerSettings

logger = logging.getLogger(__name__)

router = APIRouter()

_PAGE_FOLDER, _PAGE_FILE = "static", "index.html"  # in the llm_server.api.page package
_INLINE_BLOCK = {tag: re.compile(rf"<{tag}>(.*?)</{tag}>", re.DOTALL) for tag in ("script", "style")}


def _source_hashes(html: str, tag: str) -> list[str]:
    """CSP source expressions ('sha256-...') for each inline ``<tag>`` block of ``html``."""
    hashes = []
    for block in _INLINE_BLOCK[tag].findall(html):
        digest = base64.b64encode(hashlib.sha256(block.encode("utf-8")).digest()).decode("ascii")
        hashes.append(f"'sha256-{digest}'")
    return hashes


def content_security_policy(html: str) -> str:
    """The page's CSP: its own inline script/style only; fetches to this origin only."""
    directives = [
        "default-src 'none'",
        "script-src " + " ".join(_source_hashes(html, "script")),
        "style-src " + " ".join(_source_hashes(html, "style")),
        "connect-src 'self'",
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
    return "; ".join(directives)


@lru_cache(maxsize=1)
def _page() -> tuple[bytes, dict[str, str]]:
    """The page's bytes and response headers (read once from the installed package)."""
    # one part per joinpath: Python 3.10
    page = resources.files("llm_server.api.page").joinpath(_PAGE_FOLDER).joinpath(_PAGE_FILE)
    html = page.read_text(encoding="utf-8")
    headers = {
        "Content-Security-Policy": content_security_policy(html),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }
    return html.encode("utf-8"), headers


@router.get("/", include_in_schema=False)
async def chat_page() -> Response:
    """The chat page. It needs no key: the page asks for one and sends it with each call."""
    body, headers = _page()
    return Response(body, media_type="text/html; charset=utf-8", headers=headers)


def _role_names(settings: ServerSettings) -> list[str]:
    """System-prompt role names, ``assistant`` first, then alphabetical."""
    names = sorted(str(name) for name in settings.system_prompts)
    return sorted(names, key=lambda name: name != "assistant")


def _model_name(request: Request) -> str:
    """The served model's name (the engine's ``model_id``, as /v1/models shows it)."""
    engine = getattr(request.app.state, "engine", None)
    model_id = getattr(engine, "model_id", None)
    if model_id:
        return str(model_id)
    return request.app.state.settings.served_model_name


@router.get("/ui/config", dependencies=[Depends(require_api_key)], include_in_schema=False)
async def ui_config(request: Request) -> dict[str, Any]:
    """What the page needs to draw its controls: roles, the model's name, the token limit."""
    settings: ServerSettings = request.app.state.settings
    return {
        "roles": _role_names(settings),
        "model": _model_name(request),
        "max_new_tokens_limit": settings.max_new_tokens_limit,
    }
