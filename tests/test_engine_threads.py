"""One thread runs every torch op of the engine's model: load, runner build, warm-up and steps.

Each thread that runs torch ops gets its own OpenMP team; a second team (the model loaded on one
thread, stepped on another) halved the step's speed on a 2-core machine (issue 9). The check
records, for every thread, whether it called into torch (a ``torch*`` builtin or a tensor
method) while the engine was loaded and served requests. The second test shows the check does
fail on the old arrangement (model loaded on the caller's thread, stepped on the engine's).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

import llm_server.engine.threads as threads_module
from llm_server.engine.batch_engine import BatchEngine, EngineConfig
from llm_server.engine.threads import (
    IO_MIN_CONTEXT,
    IO_SECONDS_PER_TOKEN,
    available_cores,
    configure_threads,
    io_cores,
    reserve_io_core,
)
from llm_server.engine.types import GenerationRequest, SamplingParams
from tests.conftest import build_tiny_llama


@contextmanager
def threads_calling_torch() -> Iterator[set[str]]:
    """The names of the threads that call into torch inside the block (threads started in it too)."""
    names: set[str] = set()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event != "c_call":
            return
        try:
            module = str(getattr(arg, "__module__", None) or "")
            owner = getattr(arg, "__self__", None)
        except Exception:  # noqa: BLE001 - a profiler must never break the code it watches
            return
        if module.startswith("torch") or isinstance(owner, torch.Tensor):
            names.add(threading.current_thread().name)

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        yield names
    finally:
        sys.setprofile(None)
        threading.setprofile(None)


def serve_two_requests(engine: BatchEngine, tokenizer: Any) -> None:
    engine.start()
    try:
        params = SamplingParams(max_new_tokens=6, temperature=0.8, seed=3, repetition_penalty=1.2)
        streams = [engine.submit(GenerationRequest(f"t{i}", list(tokenizer("Hello there")["input_ids"]), params))
                   for i in range(2)]
        assert all(s.result().completion_tokens > 0 for s in streams)
    finally:
        engine.shutdown(timeout_s=30)


def test_only_the_engine_thread_runs_torch_ops_of_the_model(tokenizer: Any) -> None:
    loaded_on: list[str] = []

    def load() -> tuple[Any, Any]:
        loaded_on.append(threading.current_thread().name)
        return tokenizer, build_tiny_llama(len(tokenizer))

    with threads_calling_torch() as names:
        engine = BatchEngine.from_loader(load, "tiny", EngineConfig(max_running=4))
        serve_two_requests(engine, tokenizer)
    assert loaded_on == ["batch-engine"]
    assert names == {"batch-engine"}


def test_the_check_catches_a_model_loaded_on_another_thread(tokenizer: Any) -> None:
    with threads_calling_torch() as names:
        model = build_tiny_llama(len(tokenizer))  # loaded here, stepped on the engine's thread
        serve_two_requests(BatchEngine(tokenizer, model, "tiny", EngineConfig(max_running=4)), tokenizer)
    assert names == {threading.current_thread().name, "batch-engine"}


def test_a_load_failure_is_raised_by_start() -> None:
    def load() -> tuple[Any, Any]:
        raise OSError("no such model")

    engine = BatchEngine.from_loader(load, "missing")
    try:
        engine.start()
    except OSError as exc:
        assert "no such model" in str(exc)
    else:
        raise AssertionError("start() returned although the model failed to load")
    assert not engine.stats().ready and not engine.stats().healthy
    engine.shutdown(0)


@pytest.fixture
def busy_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1-minute load average above the cores this process may use, no wait policy exported."""
    monkeypatch.setattr(os, "getloadavg", lambda: (available_cores() + 2.5, 1.0, 1.0))
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)


def start_messages(caplog: pytest.LogCaptureFixture, tokenizer: Any, threads: int) -> list[logging.LogRecord]:
    """The engine-thread log records of starting (and stopping) an engine with ``threads`` torch threads."""
    with caplog.at_level(logging.INFO, logger="llm_server.engine.threads"):
        engine = BatchEngine.from_loader(lambda: (tokenizer, build_tiny_llama(len(tokenizer))), "tiny",
                                         EngineConfig(max_running=2, threads=threads))
        engine.start()
        engine.shutdown(timeout_s=30)
    return [r for r in caplog.records if r.name == "llm_server.engine.threads"]


def test_the_engine_start_names_a_busy_machine_and_the_remedies(
    busy_machine: None, caplog: pytest.LogCaptureFixture, tokenizer: Any
) -> None:
    records = start_messages(caplog, tokenizer, threads=2)
    info = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert any("2 torch threads" in m and "wait policy: default spinning" in m for m in info), info
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    load = f"{available_cores() + 2.5:.1f}"
    assert load in warnings[0] and "GOMP_SPINCOUNT=100" in warnings[0] and "engine.threads: 1" in warnings[0]


@pytest.mark.parametrize("remedy", ["GOMP_SPINCOUNT", "one thread", "quiet machine"])
def test_no_warning_once_a_remedy_is_in_effect_or_the_machine_is_quiet(
    busy_machine: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, remedy: str
) -> None:
    if remedy == "GOMP_SPINCOUNT":
        monkeypatch.setenv("GOMP_SPINCOUNT", "100")
    if remedy == "quiet machine":
        monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="llm_server.engine.threads"):
            assert configure_threads(1 if remedy == "one thread" else 2) == (1 if remedy == "one thread" else 2)
    finally:
        torch.set_num_threads(before)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "llm_server.engine.threads"]
    assert [level for level, _ in messages] == [logging.INFO], messages
    expected = "wait policy: GOMP_SPINCOUNT=100" if remedy == "GOMP_SPINCOUNT" else "wait policy: default spinning"
    assert expected in messages[0][1]


# --- a core left to the server's I/O when decode steps are very short -----------------------------
@pytest.fixture
def two_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Two torch threads on this thread, chosen by nobody (no OMP_NUM_THREADS)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def timer(seconds_per_row: dict[int, float], asked: list[int]) -> Any:
    def time_step(rows: int) -> float:
        asked.append(rows)
        return seconds_per_row[rows]
    return time_step


@pytest.mark.parametrize("step_s, threads", [(0.0025, 1), (0.033, 2)], ids=["tiny model", "SmolLM2-sized"])
def test_a_core_is_left_to_the_io_only_when_steps_are_very_short(
        two_threads: None, caplog: pytest.LogCaptureFixture, step_s: float, threads: int) -> None:
    """16 rows every 2.5 ms stream 6,400 tokens/s: about a core of event-loop work, so one thread is
    left; every 33 ms (the embedded model) it is 0.07 of a core and both threads stay."""
    with caplog.at_level(logging.INFO, logger="llm_server.engine.threads"):
        assert reserve_io_core(timer({1: 0.002, 16: step_s}, []), 16, requested=0) == threads
    assert torch.get_num_threads() == threads
    assert io_cores(step_s, 16) == pytest.approx(16 / step_s * IO_SECONDS_PER_TOKEN)
    left = [r.getMessage() for r in caplog.records if "left to the server's I/O" in r.getMessage()]
    assert len(left) == (threads == 1)


@pytest.mark.parametrize("case", ["engine.threads", "OMP_NUM_THREADS", "one thread", "slow model"])
def test_a_chosen_thread_count_or_a_slow_model_is_left_alone(
        two_threads: None, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    if case == "OMP_NUM_THREADS":
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
    if case == "one thread":
        torch.set_num_threads(1)
    asked: list[int] = []
    steps = timer({1: 0.2 if case == "slow model" else 0.001, 16: 0.002}, asked)
    expected = torch.get_num_threads()
    assert reserve_io_core(steps, 16, requested=2 if case == "engine.threads" else 0) == expected
    assert torch.get_num_threads() == expected
    assert 16 not in asked  # the full batch is never timed


@pytest.mark.skipif(available_cores() < 2, reason="needs 2 cores")
@pytest.mark.parametrize("max_context, left", [(None, True), (IO_MIN_CONTEXT - 1, False)])
def test_the_engine_times_its_step_at_start_and_leaves_a_core(
        two_threads: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tokenizer: Any,
        max_context: int | None, left: bool) -> None:
    """The engine's start times a 16-row decode step of the tiny random Llama and leaves a core (the
    cost per token is raised tenfold so a slower CPU than this one still crosses the line); with too
    short a context for the throwaway rows it times nothing. Either way it serves."""
    monkeypatch.setattr(threads_module, "IO_SECONDS_PER_TOKEN", 1.5e-3)
    with caplog.at_level(logging.INFO, logger="llm_server.engine.threads"):
        engine = BatchEngine.from_loader(lambda: (tokenizer, build_tiny_llama(len(tokenizer))), "tiny",
                                         EngineConfig(max_running=16, max_context=max_context))
        engine.start()
        try:
            done = engine.submit(GenerationRequest("r", [1, 2, 3], SamplingParams(max_new_tokens=4))).result()
        finally:
            engine.shutdown(timeout_s=30)
    assert done.completion_tokens == 4
    messages = [r.getMessage() for r in caplog.records]
    assert any("1 torch threads, one core left to the server's I/O (a 16-row" in m for m in messages) == left
