"""A hand-made matrix of bad inputs against a started server: ``python -m tests.probe [--real] [--out FILE]``.

``make probe`` runs it on the embedded model (``--real``; answers capped at 16 tokens). Each case
is one request a hostile or careless client might send (lone surrogates, deep nesting, forged
log lines, impossible schemas, wrong types, bad methods...; issue 24). The server runs in this
process with the server's own log format on a capturing handler, so each case's log records
are known. A case passes when the status is not a 5xx and its log stayed clean: one line per
record, every line in the server's format, no raw control character. Prints a markdown table
(case, status, log clean) and a summary; exits 1 when a target is missed (any 5xx, any forged
line). :data:`CASES` is also the fixed corpus ``make fuzz`` sends after schemathesis.
"""

from __future__ import annotations

import argparse
import io
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.probe_cases import CASES, MODEL, Case

API_KEY = "probe-key-123"
_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ \[[^\]]*\] ")
_RAW_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u2028\u2029]")


@dataclass
class Outcome:
    case: Case
    status: int | str
    records: int
    clean: bool


class CountingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The server's log format into a buffer, counting records (a forged line is an extra line)."""

    def __init__(self) -> None:
        from llm_server.api.plumbing.request_context import LOG_FORMAT, EscapingFormatter, RequestIdFilter

        super().__init__(io.StringIO())
        self.setFormatter(EscapingFormatter(LOG_FORMAT))
        self.addFilter(RequestIdFilter())
        self.records = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(("httpx", "httpcore")):  # the probe's own client
            return
        self.records += 1
        super().emit(record)

    def text(self) -> str:
        return self.stream.getvalue()  # type: ignore[no-any-return]


def log_is_clean(text: str, records: int) -> bool:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return len(lines) == records and all(_LINE.match(line) and not _RAW_CONTROL.search(line) for line in lines)


def send(client: httpx.Client, url: str, case: Case) -> int | str:
    headers = {"X-API-Key": API_KEY, **case.headers}
    if case.body is not None and "content-type" not in {k.lower() for k in case.headers}:
        headers["Content-Type"] = "application/json"
    try:
        response = client.request(case.method, f"{url}{case.path}", content=case.body, headers=headers)
    except httpx.HTTPError as exc:  # the server closed the connection without an answer
        return type(exc).__name__
    return response.status_code


def run_case(client: httpx.Client, url: str, case: Case, handler: CountingHandler) -> Outcome:
    start_text, start_records = len(handler.text()), handler.records
    status = send(client, url, case)
    deadline = time.monotonic() + 2.0  # the access line is written after the answer went out
    while handler.records == start_records and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.01)
    records = handler.records - start_records
    return Outcome(case, status, records, log_is_clean(handler.text()[start_text:], records))


def run_cases(url: str, cases: list[Case], handler: CountingHandler) -> list[Outcome]:
    with httpx.Client(timeout=120) as client:
        return [run_case(client, url, case, handler) for case in cases]


def failed(outcome: Outcome) -> bool:
    return not outcome.clean or not isinstance(outcome.status, int) or outcome.status >= 500


def table(outcomes: list[Outcome]) -> str:
    rows = ["| # | input | status | log clean |", "|---|---|---|---|"]
    for i, o in enumerate(outcomes, 1):
        mark = "yes" if o.clean else "**NO**"
        rows.append(f"| {i} | {o.case.name} | {o.status} | {mark} |")
    fivexx = sum(1 for o in outcomes if not isinstance(o.status, int) or o.status >= 500)
    forged = sum(1 for o in outcomes if not o.clean)
    by_status: dict[str, int] = {}
    for o in outcomes:
        by_status[str(o.status)] = by_status.get(str(o.status), 0) + 1
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(by_status.items()))
    rows += ["", f"**{len(outcomes)} bad inputs: {fivexx} x 5xx (or no answer), {forged} case(s) with a forged or "
             f"unescaped log line.** Statuses: {counts}."]
    return "\n".join(rows)


def _settings(real: bool) -> Any:
    from llm_server.api.settings import ServerSettings, load_settings

    if real:
        return load_settings().with_overrides(api_keys=(API_KEY,), open_access=False, max_new_tokens_limit=16)
    return ServerSettings(api_keys=(API_KEY,), max_new_tokens_limit=16)


def _engine_factory(real: bool) -> Any:
    if real:
        return None

    def scripted() -> Any:
        from llm_server.helper_functionality.model_loading import load_tokenizer
        from tests.conftest import embedded_gguf
        from tests.fakes import ScriptedEngine

        return ScriptedEngine(load_tokenizer(str(embedded_gguf())), reply="a scripted answer", max_context=100_000,
                              model_id=MODEL)

    return scripted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--real", action="store_true", help="the embedded model (default: the scripted engine)")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    from llm_server.api.plumbing.request_context import install_log_record_factory
    from llm_server.api.server import create_app
    from tests.spec_harness import serving

    install_log_record_factory()
    handler = CountingHandler()
    root = logging.getLogger()
    previous = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        app = create_app(_engine_factory(args.real), settings=_settings(args.real))
        with serving(app, timeout_s=600) as url:
            outcomes = run_cases(url, CASES, handler)
    finally:
        root.handlers[:], _ = previous
        root.setLevel(previous[1])
    text = table(outcomes)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 1 if any(failed(o) for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
