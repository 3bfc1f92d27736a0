"""The improvement benchmark's pass accounting (benchmarks/improvement_passes.py) reads the lines the
real engine logs: a plain turn and an improvement turn on the tiny Llama, through ChatService and
the BatchEngine, logged with the server's own format, then parsed into the per-pass table and floor."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llm_server.api.plumbing.request_context import LOG_FORMAT, EscapingFormatter, RequestIdFilter
from llm_server.engine.batch_engine import BatchEngine, EngineConfig
from llm_server.serving.request import Sampling, TurnRequest
from llm_server.serving.service import ChatService
from llm_server.serving.turn_stream import TurnStream

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import improvement_passes  # noqa: E402

PROMPTS = {"assistant": "You are the test assistant.", "reviser": "You revise drafts."}


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def engine_log() -> Iterator[_Lines]:
    handler = _Lines()
    handler.setFormatter(EscapingFormatter(LOG_FORMAT))
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("llm_server.engine.batch_engine")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def _finish(stream: TurnStream) -> None:
    async def run() -> None:
        async for _ in stream:
            pass

    asyncio.run(run())


def _turn(request_id: str, improvement: bool) -> TurnRequest:
    return TurnRequest(request_id=request_id, messages=({"role": "user", "content": "Name a colour."},),
                       sampling=Sampling(max_new_tokens=6, temperature=0.0), improvement=improvement)


def test_a_plain_turn_and_an_improvement_turn_read_back_pass_by_pass(tokenizer: Any, tiny_model: Any,
                                                                     engine_log: _Lines) -> None:
    engine = BatchEngine(tokenizer, tiny_model, "tiny", EngineConfig())
    engine.start()
    try:
        service = ChatService(engine, PROMPTS, max_new_tokens_limit=100)
        _finish(service.open(_turn("plainreq", improvement=False)))
        _finish(service.open(_turn("turnreq", improvement=True)))
    finally:
        engine.shutdown(timeout_s=30)

    requests = improvement_passes.parse(engine_log.lines)
    plain = [r for r in requests if r.kind == "plain"]
    assert [r.turn for r in plain] == ["plainreq"]
    passes = {r.name: r for r in requests if r.turn == "turnreq"}
    assert {"draft", "review1", "revision1"} <= set(passes)
    for request in (*plain, *passes.values()):
        assert request.queued is not None and request.finished is not None and request.wall_s >= 0
        assert request.prompt_tokens > 0 and request.reason
    assert 0 < passes["draft"].tokens <= 6

    (turn,) = improvement_passes.turns(requests)
    assert turn.plain is plain[0]
    assert turn.floor_s() == pytest.approx(passes["draft"].wall_s + max(
        r.wall_s for r in passes.values() if r.kind == "revision"))
    report = improvement_passes.report(requests)
    assert "| plain | 1 |" in report and "| draft | 1 |" in report
    assert "Floor over 1 turns" in report
