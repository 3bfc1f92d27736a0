"""The request context: each HTTP request's id and arrival time, and request ids in log lines.

The request-context middleware (:mod:`llm_server.api.plumbing.middleware`) gives every request an id
and an arrival time. Routes read them with :func:`request_id` and :func:`started_at`. While
a request is handled its id is also in :data:`request_id_var`, from which a log-record
factory (and :class:`RequestIdFilter`) copy it to every log record as ``%(request_id)s``
("-" outside a request); :func:`configure_logging` sets up the server's log format with it.

Log forging: values taken from a request (path, headers, model names, error messages) may
hold control characters (``%0D%0A`` in a path decodes to CR LF). :func:`escape_controls`
writes them as ``\\r``, ``\\n``, ``\\x1b``...; the access log applies it to what it logs, and
the server's :class:`EscapingFormatter` applies it to every formatted record, tracebacks
included (their line breaks become ``\n``), so no request can write a line of its own into
the log: one record, one line. :class:`JsonLinesFormatter` writes one JSON object a line
instead (``server.log_format: json``).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import uuid
from typing import Any

from fastapi import Request

#: The header a request id comes in and goes back out in (lower case, as ASGI spells it).
REQUEST_ID_HEADER = "x-request-id"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"

#: The id of the request being handled in this context ("-" outside a request).
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def escape_controls(text: str) -> str:
    """``text`` with control characters (CR, LF, ESC, ...) written as escapes: one log line, always."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class EscapingFormatter(logging.Formatter):
    """A Formatter whose messages never contain control characters (see :func:`escape_controls`)."""

    def format(self, record: logging.LogRecord) -> str:
        """The whole line escaped: message, traceback and stack (a traceback quotes client text)."""
        return escape_controls(super().format(record))


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record (ASCII-only, so control characters and surrogates are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "request_id": getattr(record, "request_id", "-"), "message": record.getMessage()}
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=True)


# --- readers for routes -----------------------------------------------------------------------
def request_id(request: Request) -> str:
    """The request's id (set by the request-context middleware), or a fresh one."""
    return str(getattr(request.state, "request_id", "") or uuid.uuid4().hex)


def started_at(request: Request) -> float | None:
    """When the request arrived (``time.perf_counter()`` clock), for the latency metrics."""
    return getattr(request.state, "started_at", None)


# --- request ids in log records ---------------------------------------------------------------
class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (for handlers whose records bypass the record factory)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


def install_log_record_factory() -> None:
    """Make every LogRecord carry ``request_id`` so formats may use ``%(request_id)s``."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_adds_request_id", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.request_id = request_id_var.get()
        return record

    factory._adds_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def configure_logging(level: int | str = logging.INFO, log_format: str = "text") -> None:
    """Root logging for the server process: one stderr handler with request ids in lines
    (``log_format``: "text", one escaped line a record, or "json", one JSON object a line)."""
    install_log_record_factory()
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLinesFormatter() if log_format == "json" else EscapingFormatter(LOG_FORMAT))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
