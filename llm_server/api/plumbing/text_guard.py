"""Client text checked once, at the edge: no lone UTF-16 surrogates, bounded nesting and query size.

JSON lets a string hold an escaped half of a UTF-16 surrogate pair (``"\\ud800"``) with no
other half. Python decodes it to a ``str`` that cannot be encoded as UTF-8, so it would crash
the tokenizer (or the log handler) deep inside the server. Deep nesting (``[[[[...]]]]``)
makes Python's JSON decoder raise ``RecursionError``. Both are client errors: they are
answered 400, in the OpenAI error shape every endpoint uses, naming the field, before any
route sees the request.

* :func:`body_problem` checks a buffered JSON request body (called by the body-size middleware,
  :mod:`llm_server.api.plumbing.limits`, which already holds the whole body): fast paths make it cost
  two byte scans for an ordinary body.
* :func:`query_problem` bounds a query string (its size and number of parameters).
* :func:`loads_query_json` decodes a JSON-valued query parameter (the spec's GET ``history`` and
  ``response_format``) with the same checks.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qsl

from llm_server.api.plumbing.errors import APIError

#: Deepest nesting of arrays/objects accepted in a JSON body or JSON query parameter.
MAX_JSON_DEPTH = 64
#: Longest query string accepted (bytes, as sent), and most query parameters.
MAX_QUERY_BYTES = 32_768
MAX_QUERY_PARAMS = 64

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _field(path: list[str | int]) -> str:
    return ".".join(str(p) for p in path) or "body"


def _too_deep(field: str) -> APIError:
    return APIError(400, f"{field}: JSON nested deeper than {MAX_JSON_DEPTH} levels", param=field,
                    code="too_deeply_nested")


def _lone_surrogate(field: str) -> APIError:
    return APIError(400, f"{field}: text holds a lone UTF-16 surrogate (an unpaired \\uD800-\\uDFFF escape), "
                    "which is not valid Unicode", param=field, code="invalid_unicode")


def value_problem(value: Any, root: list[str | int] | None = None) -> APIError | None:
    """The first lone surrogate or too-deep nesting in a decoded JSON value, as a 400 naming its field."""
    todo: list[tuple[Any, list[str | int]]] = [(value, list(root or []))]
    base = len(root or [])
    while todo:
        item, path = todo.pop()
        if len(path) - base > MAX_JSON_DEPTH:
            return _too_deep(_field(path[: base + MAX_JSON_DEPTH]))
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return _lone_surrogate(_field(path))
        elif isinstance(item, dict):
            for key, child in item.items():
                if _SURROGATE.search(key):
                    return _lone_surrogate(_field([*path, _SURROGATE.sub("\ufffd", key)]))
                todo.append((child, [*path, key]))
        elif isinstance(item, list):
            todo.extend((child, [*path, i]) for i, child in enumerate(item))
    return None


def body_problem(raw: bytes) -> APIError | None:
    """A 400 for a JSON body with a lone surrogate or nesting over :data:`MAX_JSON_DEPTH`; else None
    (a body that is not JSON at all is left to the route, which says so in its own words)."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH and not _SURROGATE_ESCAPE.search(raw):
        return None  # cannot nest too deep, cannot hold a surrogate: the common case
    try:
        value = json.loads(raw)
    except RecursionError:
        return _too_deep("body")
    except ValueError:  # not JSON (or not UTF-8): the route's parser answers it
        return None
    return value_problem(value)


def loads_query_json(text: str, field: str) -> Any:
    """``json.loads`` for a JSON-valued query parameter, with :func:`value_problem`'s checks
    (raises :class:`APIError`; a syntax error is left to the caller as ``json.JSONDecodeError``)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise _too_deep(field) from None
    problem = value_problem(value, [field])
    if problem is not None:
        raise problem
    return value


def query_problem(query_string: bytes) -> APIError | None:
    """A 400 (414-like, but in the one error shape) for a query string over the size bounds."""
    if len(query_string) > MAX_QUERY_BYTES:
        return APIError(400, f"query string is longer than {MAX_QUERY_BYTES} bytes; send a POST body",
                        code="query_too_large")
    if query_string.count(b"&") + 1 > MAX_QUERY_PARAMS and len(parse_qsl(query_string)) > MAX_QUERY_PARAMS:
        return APIError(400, f"query string has more than {MAX_QUERY_PARAMS} parameters", code="query_too_large")
    return None
