"""BatchEngine: continuous batching on one scheduler thread that owns the model, from load to step.

Only the scheduler thread ever runs torch ops of the served model: it loads the model (the
``loader`` given to :meth:`BatchEngine.from_loader`), builds the runner (weight packing), warms
up and runs every step. Each thread that runs torch ops gets its own OpenMP team, and on a small
machine a second, idle team steals the cores the working one needs (issue 9: a 2x slower step).
:meth:`BatchEngine.start` returns once the thread is ready, or re-raises its load error.

Each scheduler iteration (:meth:`BatchEngine._iterate`) finishes cancelled requests and admits
waiting ones (:class:`~.scheduler.Scheduler`: FIFO, within the KV budget and ``max_running``; an
idle engine first lets announced requests arrive: :mod:`.arrivals`), runs one prefill forward for
new prompts (together, or a chunk of a long one sized by ``step_token_budget``: decoding requests are
never stalled), then one decode forward for all decoding requests (speculative for rows with drafts:
:mod:`.speculative`), and applies it: samples each row, turns the token into text (UTF-8 safe, stop
strings held back), pushes it to the request's :class:`GenerationStream`, finishes the done.

A request's state is its Sequence's ``status`` (waiting, prefilling, decoding, finished); finishing is idempotent.
Errors of one request fail it alone; one not pinned on a request (a decode forward raising) fails all: unhealthy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from llm_server.engine.admission import Admission, validate_request
from llm_server.engine.arrivals import Arrivals
from llm_server.engine.config import EngineConfig
from llm_server.engine.detokenize import IncrementalDetokenizer, StopMatcher
from llm_server.engine.interface import Engine
from llm_server.engine.model_setup import default_max_context, default_top_k, eos_ids, make_runner, warm_up
from llm_server.engine.prefix_cache import PrefixCache
from llm_server.engine.prompt_logprobs import record_prompt_logprobs
from llm_server.engine.runner import ModelRunner
from llm_server.engine.sampler import Sampler, SamplerState
from llm_server.engine.scheduler import Scheduler
from llm_server.engine.sequence import Sequence
from llm_server.engine.speculative import Speculator, draft_counts
from llm_server.engine.stream import GenerationStream, WakeupBatch
from llm_server.engine.threads import IO_MIN_CONTEXT, IO_ROWS, configure_threads
from llm_server.engine.types import (
    EngineError,
    EngineStats,
    EngineUnavailable,
    Finished,
    FinishReason,
    GenerationRequest,
    TextDelta,
)

logger = logging.getLogger(__name__)

#: Returns ``(tokenizer, model)``; called on the scheduler thread by :meth:`BatchEngine.start`.
Loader = Callable[[], tuple[Any, Any]]


class BatchEngine(Engine):
    """Continuous-batching engine: every request of the server shares each forward pass.

    ``BatchEngine(tokenizer, model, ...)`` serves an already-loaded model (tests);
    :meth:`from_loader` loads it on the scheduler thread (the server). Until :meth:`start`
    returns, ``tokenizer`` (from a loader) and ``max_context`` are not known.
    """

    def __init__(self, tokenizer: Any, model: Any, model_id: str, config: EngineConfig | None = None,
                 *, loader: Loader | None = None) -> None:
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.config = config or EngineConfig()
        self.max_context = 0
        self.eos_ids: frozenset[int] = frozenset()
        self.runner_name = ""  # the runner class serving the model, known once started
        self.runner_reason = ""  # why that runner (batched or not), known once started
        self._load: Loader = loader if loader is not None else (lambda: (tokenizer, model))
        self._runner: ModelRunner | None = None
        self._sampler: Sampler | None = None
        self._spec: Speculator | None = None  # speculative decoding, when the runner can (engine/speculative.py)
        self._vocab_size = 0
        self._sched = Scheduler(self.config)
        self._admission = Admission(self.config)  # expected-wait admission (engine/admission.py)
        self._wakeups = WakeupBatch()
        self._lock = threading.Condition()
        self._arrivals: Arrivals = Arrivals(self._lock)  # a burst onto an idle engine is admitted together
        self._thread: threading.Thread | None = None
        self._booted = threading.Event()
        self._boot_error: BaseException | None = None
        self._ready = False
        self._healthy = True
        self._draining = False
        self._abort = False

    @classmethod
    def from_loader(cls, loader: Loader, model_id: str, config: EngineConfig | None = None) -> BatchEngine:
        """An engine whose model ``loader()`` loads on the scheduler thread, in :meth:`start`."""
        return cls(None, None, model_id, config, loader=loader)

    # --- Engine API ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the scheduler thread and wait until it has loaded and warmed up the model;
        a load error is re-raised here."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._main, name="batch-engine", daemon=True)
        self._thread.start()
        self._booted.wait()
        if self._boot_error is not None:
            raise self._boot_error
        cached = f"{p.max_blocks * p.block_size} tokens" if (p := self._sched.prefix) else "off"
        logger.info("engine started: model=%s runner=%s (%s) max_context=%d kv_budget=%d tokens prefix_cache=%s",
                    self.model_id, self.runner_name, self.runner_reason, self.max_context,
                    self.config.max_total_tokens, cached)

    def submit(self, request: GenerationRequest) -> GenerationStream:
        self._check_accepting()
        validate_request(request, self._vocab_size, self.max_context)
        params = request.params
        if params.max_new_tokens <= 0:  # nothing to generate: finished at once
            stream = GenerationStream(request.request_id)
            stream.push(Finished("length", len(request.prompt_ids), 0, ""))
            return stream
        matcher = params.constraint.matcher() if params.constraint is not None else None  # on the caller's thread
        stream = GenerationStream(request.request_id, self._wakeups)
        seq = Sequence(request=request, stream=stream, detok=IncrementalDetokenizer(self.tokenizer),
                       stops=StopMatcher(tuple(params.stop)), reserved=len(request.prompt_ids) + params.max_new_tokens,
                       matcher=matcher, drafter=self._spec.drafter(request) if self._spec is not None else None)
        with self._lock:
            self._check_accepting()
            self._admission.check(self._running(), list(self._sched.waiting), seq.reserved)
            self._sched.add(seq)
            self._lock.notify()
        logger.debug("request %s queued (%d prompt tokens)", request.request_id, len(request.prompt_ids))
        return stream

    def _check_accepting(self) -> None:
        if not (self._healthy and self._ready) or self._draining:
            raise EngineUnavailable("the engine stopped after a fatal error" if not self._healthy else
                                    "the engine is not accepting requests")

    def stats(self) -> EngineStats:
        with self._lock:
            wait_s = self._admission.expected_wait_s(self._running(), list(self._sched.waiting), 1)
        prefix, spec = self._sched.prefix, self._spec or Speculator(0, False)  # (no speculation: counts of 0)
        return EngineStats(waiting=len(self._sched.waiting), running=self._sched.running, healthy=self._healthy,
                           ready=self._ready and self._healthy and not self._draining, expected_wait_s=wait_s,
                           prefix_cache_queries=prefix.queries if prefix else 0,
                           prefix_cache_hits=prefix.hits if prefix else 0,
                           prefix_cache_tokens=prefix.tokens if prefix else 0, spec_draft_tokens=spec.drafted,
                           spec_accepted_tokens=spec.accepted, spec_forced_tokens=spec.forced)

    def _running(self) -> list[Sequence]:
        return [*self._sched.prefilling, *self._sched.decoding]

    def shutdown(self, timeout_s: float = 30.0) -> None:
        with self._lock:
            self._draining = True
            self._lock.notify()
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                with self._lock:
                    self._abort = True
                    self._lock.notify()
                thread.join(10.0)
        self._ready = False
        logger.info("engine stopped")

    # --- scheduler thread: start-up -----------------------------------------------------
    def _main(self) -> None:
        try:
            self._boot()
        except BaseException as exc:  # noqa: BLE001 - re-raised by start() on the caller's thread
            self._boot_error = exc
            self._healthy = False
            return
        finally:
            self._booted.set()
        self._loop()

    def _boot(self) -> None:
        """Load the model, build the runner and warm up, all on this (the scheduler) thread."""
        configure_threads(self.config.threads)
        tokenizer, model = self._load()
        self.tokenizer = tokenizer
        budget = self.config.max_total_tokens
        self.max_context = min(self.config.max_context or default_max_context(model, budget), budget)
        self.eos_ids = eos_ids(tokenizer, model)
        runner = make_runner(model, self.config.max_running, self.max_context, pack_weights=self.config.pack_weights)
        self._sampler = Sampler(runner.device, self.config.seed, default_top_k(model, self.config.top_k))
        self._runner, self._vocab_size, self.runner_name = runner, runner.vocab_size, type(runner).__name__
        self.runner_reason = runner.reason
        warm_up(runner, min(self.config.max_running, IO_ROWS) if self.max_context >= IO_MIN_CONTEXT else 0,
                self.config.threads)  # (may leave a core to the server's I/O)
        if runner.speculates and self.config.speculative_tokens > 0:
            self._spec = Speculator(self.config.speculative_tokens, self.config.speculative_lookup, runner.fast_tokens)
        if self.config.prefix_caching and runner.slot_cache is not None:
            size = self.config.prefix_cache_tokens
            self._sched.prefix = PrefixCache(min(budget // 2 if size is None else size, budget))
        self._ready = True

    # --- scheduler thread: the loop -----------------------------------------------------
    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while self._iterate():
                    pass
        except BaseException as exc:  # noqa: BLE001 - anything here is fatal for every request
            self._die(exc)
        finally:
            self._wakeups.flush()

    def _iterate(self) -> bool:
        """One scheduler iteration; False when the thread should exit."""
        assert self._runner is not None
        with self._lock:
            while not (self._sched.has_work() or self._draining or self._abort):
                self._runner.idle()
                self._lock.wait()
            self._arrivals.settle(idle=not (self._running() or self._draining))  # a burst: one admission
            if self._abort:
                self._fail_all(EngineUnavailable("the server is shutting down"))
                return False
            if self._draining and not self._sched.has_work():
                return False
            for seq in self._sched.cancelled():
                self._finish(seq, "cancelled", flush=False)
            admitted = self._sched.admit()
        started = time.monotonic()
        for seq in admitted:
            self._open(seq)
        group = self._sched.schedule_prefill()
        if group:
            self._prefill(group)
            self._wakeups.flush()  # first tokens go out now, not after the decode step
        batch = self._sched.schedule_decode()
        if batch:
            self._decode(batch)
        self._wakeups.flush()
        if group or batch:
            self._admission.record_step(time.monotonic() - started, max(len(group), len(batch)))
        return True

    def _open(self, seq: Sequence) -> None:
        """An admitted request's cache handle and sampling state (tensors: made on this thread)."""
        assert self._runner is not None
        try:
            record_prompt_logprobs(self._runner, seq.request)  # echo + logprobs: a pass of its own, at admission
            seq.kv = self._runner.open()
            self._restore_prefix(seq)
            params = seq.request.params  # its grammar matcher was built by submit()
            seq.sampler = SamplerState.create(replace(params, constraint=None), seq.request.prompt_ids,
                                              self._vocab_size, self._runner.device)
            seq.sampler.params, seq.sampler.matcher = params, seq.matcher
        except Exception as exc:  # noqa: BLE001 - this request's settings are at fault
            self._fail(seq, exc)
            return
        logger.debug("request %s admitted (%d prompt tokens cached)", seq.request_id, seq.cached_tokens)

    def _restore_prefix(self, seq: Sequence) -> None:
        """Copy the prefix blocks admission matched into ``seq``'s slot: its prefill starts after them."""
        if self._sched.prefix is not None and self._runner is not None:
            seq.cached_tokens = seq.prefilled = self._sched.prefix.restore_into(self._runner.slot_cache, seq)

    def _save_prefix(self, seq: Sequence, keep: bool = True) -> None:
        """Keep the KV of ``seq``'s full blocks in the prefix cache, in the room running requests leave
        (``keep=False``, a failed request: only drop what it holds)."""
        if self._sched.prefix is not None and self._runner is not None:
            room = self.config.max_total_tokens - self._sched.reserved_tokens() if keep else 0
            self._sched.prefix.save_from(self._runner.slot_cache, seq, room)

    # --- running a step and applying its output -----------------------------------------
    def _prefill(self, group: list[tuple[Sequence, list[int]]]) -> None:
        assert self._runner is not None
        try:
            logits = self._runner.forward([s.kv for s, _ in group], [ids for _, ids in group])  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - retried one by one to find the culprit
            if len(group) == 1:
                self._fail(group[0][0], exc)
                return
            logger.warning("batched prefill failed (%s); retrying its requests one by one", exc)
            for seq, _ in group:
                self._runner.release(seq.kv)  # type: ignore[arg-type]
                seq.prefilled = seq.cached_tokens = 0
            for seq, _ in group:
                ids = list(seq.request.prompt_ids[: self.config.prefill_chunk_tokens])
                self._prefill([(seq, ids)])
            return
        done = [(seq, row) for row, (seq, ids) in enumerate(group) if self._sched.prefilled(seq, len(ids))]
        for seq, _ in done:
            self._save_prefix(seq)  # a running request's prompt serves later ones at once
        if done:
            picked = logits if len(done) == len(group) else logits[[row for _, row in done]]
            self._apply([seq for seq, _ in done], picked)

    def _decode(self, batch: list[Sequence]) -> None:
        """One decode step for ``batch``: speculative when a row has a draft (engine/speculative.py)."""
        assert self._runner is not None
        drafts = self._spec.drafts(batch) if self._spec is not None else None
        if drafts is not None and self._spec is not None:
            self._spec.step(self._runner, batch, drafts, self._select, self._apply_token)
            return
        self._apply(batch, self._runner.forward([s.kv for s in batch], [[s.generated[-1]] for s in batch]))  # type: ignore[misc]

    def _apply(self, batch: list[Sequence], logits: torch.Tensor) -> None:
        """Apply one step's output: a new token for each row of ``batch``."""
        for seq, token in zip(batch, self._select(batch, logits), strict=True):
            if token >= 0:
                self._apply_token(seq, token)

    def _select(self, batch: list[Sequence], logits: torch.Tensor) -> list[int]:
        """Each row's token (-1 for a row whose request failed in sampling)."""
        assert self._sampler is not None
        try:
            return self._sampler.select(logits, [s.sampler for s in batch])  # type: ignore[misc]
        except Exception:  # noqa: BLE001 - find the request whose settings broke sampling
            return [self._select_alone(seq, logits[i : i + 1]) for i, seq in enumerate(batch)]

    def _select_alone(self, seq: Sequence, logits: torch.Tensor) -> int:
        assert self._sampler is not None and seq.sampler is not None
        try:
            return self._sampler.select(logits, [seq.sampler])[0]
        except Exception as exc:  # noqa: BLE001
            self._fail(seq, exc)
            return -1

    def _apply_token(self, seq: Sequence, token: int) -> None:
        """Record one generated id, stream its text, and finish the request when it is done (a
        failure here fails this request only)."""
        try:
            seq.generated.append(token)
            seq.sampler.observe(token)  # type: ignore[union-attr]
            if token in self.eos_ids:
                return self._finish(seq, "stop", flush=True)
            text, stopped = seq.stops.feed(seq.detok.push(token))
            self._emit(seq, text)
            if stopped:  # the text after the stop string is dropped
                self._finish(seq, "stop", flush=False)
            elif len(seq.generated) >= seq.request.params.max_new_tokens:
                self._finish(seq, "length", flush=True)
        except Exception as exc:  # noqa: BLE001 - one request's failure is its own
            self._fail(seq, exc)

    def _emit(self, seq: Sequence, text: str) -> None:
        if text:
            seq.text.append(text)
            seq.stream.push(TextDelta(text))

    # --- leaving ------------------------------------------------------------------------
    def _close(self, seq: Sequence, keep: bool = True) -> bool:
        """Take ``seq`` out of the batch, keep its prefix (``keep``), free its cache; False if already finished."""
        self._sched.remove(seq)
        if not seq.close():
            return False
        self._save_prefix(seq, keep)
        if seq.kv is not None and self._runner is not None:
            self._runner.release(seq.kv)
        return True

    def _finish(self, seq: Sequence, reason: FinishReason, flush: bool) -> None:
        """Close the request's stream with ``Finished`` (a no-op when it already finished); ``flush``
        emits text still held back (a character cut at the very end, an unfinished stop string)."""
        if not self._close(seq):
            return
        if flush:
            tail, stopped = seq.stops.feed(seq.detok.flush())
            self._emit(seq, tail if stopped else tail + seq.stops.flush())
        timeline = {status.value: at for status, at in seq.times.items()}
        seq.stream.push(Finished(reason, seq.prompt_len, len(seq.generated), "".join(seq.text), timeline,
                                 seq.cached_tokens, *draft_counts(seq)))
        logger.debug("request %s finished: %s after %d tokens", seq.request_id, reason, len(seq.generated))

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        if not self._close(seq, keep=False):
            return
        logger.error("request %s failed: %s", seq.request_id, exc, exc_info=exc)
        seq.stream.push(exc if isinstance(exc, EngineError) else EngineError(f"generation failed: {exc}"))

    def _fail_all(self, error: EngineError) -> None:
        """Fail every waiting and running request; the caller holds ``self._lock``."""
        for seq in self._sched.take_all():
            if seq.close():
                if seq.kv is not None and self._runner is not None:
                    self._runner.release(seq.kv)
                seq.stream.push(error)

    def _die(self, exc: BaseException) -> None:
        logger.critical("engine failed; failing every pending request", exc_info=exc)
        with self._lock:  # submit() checks health under this lock: nothing can slip in after
            self._healthy = False
            self._fail_all(EngineError(f"the engine failed: {exc}"))


__all__ = ["BatchEngine", "EngineConfig", "Loader"]
