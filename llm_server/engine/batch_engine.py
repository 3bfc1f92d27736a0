"""BatchEngine: continuous batching on one scheduler thread that owns the model.

Requests move waiting -> prefill -> decode -> finished. Each scheduler iteration
1. admits waiting requests while there are free sequence slots and KV-cache budget,
2. drops cancelled requests (their cache is freed at once),
3. runs one prefill forward for newly admitted prompts (several short prompts together, or
   one chunk of a long prompt, so decoding requests are never stalled for long),
4. runs one decode forward for every decoding request together,
then turns each request's new token into text (UTF-8 safe, stop strings held back) and pushes
it to the request's :class:`GenerationStream`. A request joins the batch at the next token
boundary after it arrives and leaves it as soon as it finishes.

Errors while handling one request fail that request only. An error that cannot be pinned on
one request (a decode forward raising) is fatal: every pending request fails with
``EngineError`` and ``stats().healthy`` turns False.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from llm_server.engine.config import EngineConfig
from llm_server.engine.interface import Engine
from llm_server.engine.hf_runner import HFRunner
from llm_server.engine.llama_runner import LlamaRunner, unsupported_reason
from llm_server.engine.runner import KVHandle, ModelRunner
from llm_server.engine.sampler import Sampler, SamplerState
from llm_server.engine.stream import GenerationStream
from llm_server.engine.text import IncrementalDetokenizer, StopMatcher
from llm_server.engine.types import (
    ContextLengthExceeded,
    EngineError,
    EngineOverloaded,
    EngineStats,
    EngineUnavailable,
    Finished,
    FinishReason,
    GenerationRequest,
    TextDelta,
)

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Sequence:
    """A request inside the engine."""

    request: GenerationRequest
    stream: GenerationStream
    sampler: SamplerState
    detok: IncrementalDetokenizer
    stops: StopMatcher
    kv: KVHandle
    reserved: int  # prompt + max_new_tokens: the KV budget this request may use
    prefilled: int = 0  # prompt tokens already in the KV cache
    generated: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)


def _eos_ids(tokenizer: Any, model: Any) -> frozenset[int]:
    """End-of-sequence ids of the tokenizer and of the model's generation config."""
    ids: set[int] = set()
    candidates: list[Any] = [getattr(tokenizer, "eos_token_id", None)]
    generation_config = getattr(model, "generation_config", None)
    candidates.append(getattr(generation_config, "eos_token_id", None))
    for value in candidates:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _default_top_k(model: Any, configured: int | None) -> int:
    """The top-k ``model.generate`` would use when sampling: the model's, else transformers' 50."""
    if configured is not None:
        return configured
    value = getattr(getattr(model, "generation_config", None), "top_k", None)
    return 50 if value is None else int(value)


def _default_max_context(model: Any, budget: int) -> int:
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None) or budget
    return min(int(positions), budget)


def make_runner(model: Any, max_slots: int, max_context: int, pack_weights: bool = True) -> ModelRunner:
    """The fastest runner that supports ``model``: the compact batched one for Llama-family models,
    else the model's own forward, one sequence at a time."""
    reason = unsupported_reason(model)
    if reason is None:
        return LlamaRunner(model, max_slots=max_slots, max_context=max_context, pack_weights=pack_weights)
    logger.warning("using the slow one-sequence-at-a-time path: %s", reason)
    return HFRunner(model)


class BatchEngine(Engine):
    """Continuous-batching engine: every request of the server shares each forward pass."""

    def __init__(self, tokenizer: Any, model: Any, model_id: str, config: EngineConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.config = config or EngineConfig()
        self.max_context = self.config.max_context or _default_max_context(model, self.config.max_total_tokens)
        self.max_context = min(self.max_context, self.config.max_total_tokens)
        self.eos_ids = _eos_ids(tokenizer, model)
        self._runner: ModelRunner = make_runner(
            model, self.config.max_running, self.max_context, pack_weights=self.config.pack_weights
        )
        self._sampler = Sampler(self._runner.device, self.config.seed, _default_top_k(model, self.config.top_k))
        self._lock = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._prefilling: list[_Sequence] = []
        self._decoding: list[_Sequence] = []
        self._thread: threading.Thread | None = None
        self._ready = False
        self._healthy = True
        self._draining = False
        self._abort = False

    # --- Engine API ---------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._warm_up()
        self._thread = threading.Thread(target=self._loop, name="batch-engine", daemon=True)
        self._thread.start()
        self._ready = True
        logger.info("engine started: model=%s runner=%s max_context=%d", self.model_id,
                    type(self._runner).__name__, self.max_context)

    def submit(self, request: GenerationRequest) -> GenerationStream:
        self._check_accepting()
        params = request.params
        if len(request.prompt_ids) + params.max_new_tokens > self.max_context:
            raise ContextLengthExceeded(len(request.prompt_ids), params.max_new_tokens, self.max_context)
        stream = GenerationStream(request.request_id)
        seq = _Sequence(
            request=request,
            stream=stream,
            sampler=SamplerState.create(params, request.prompt_ids, self._runner.vocab_size, self._runner.device),
            detok=IncrementalDetokenizer(self.tokenizer),
            stops=StopMatcher(tuple(params.stop)),
            kv=self._runner.open(),
            reserved=len(request.prompt_ids) + max(params.max_new_tokens, 0),
        )
        with self._lock:
            self._check_accepting()
            if len(self._waiting) >= self.config.max_waiting:
                raise EngineOverloaded(retry_after_s=self.config.retry_after_s)
            self._waiting.append(seq)
            self._lock.notify()
        logger.debug("request %s queued (%d prompt tokens)", request.request_id, len(request.prompt_ids))
        return stream

    def _check_accepting(self) -> None:
        if not self._healthy:
            raise EngineUnavailable("the engine stopped after a fatal error")
        if not self._ready or self._draining:
            raise EngineUnavailable("the engine is not accepting requests")

    def stats(self) -> EngineStats:
        return EngineStats(
            waiting=len(self._waiting),
            running=len(self._prefilling) + len(self._decoding),
            healthy=self._healthy,
            ready=self._ready and self._healthy and not self._draining,
        )

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

    # --- scheduler thread ---------------------------------------------------------------
    def _warm_up(self) -> None:
        """One tiny forward so the first request does not pay for kernel initialisation."""
        with torch.inference_mode():
            handle = self._runner.open()
            try:
                self._runner.forward([handle], [[0, 0]])
                self._runner.forward([handle], [[0]])
            finally:
                self._runner.release(handle)
                self._runner.idle()

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while self._iterate():
                    pass
        except BaseException as exc:  # noqa: BLE001 - anything here is fatal for every request
            self._die(exc)

    def _iterate(self) -> bool:
        """One scheduler iteration; False when the thread should exit."""
        with self._lock:
            while not (self._waiting or self._prefilling or self._decoding or self._draining or self._abort):
                self._runner.idle()
                self._lock.wait()
            if self._abort:
                self._fail_all(EngineUnavailable("the server is shutting down"))
                return False
            if self._draining and not (self._waiting or self._prefilling or self._decoding):
                return False
            self._admit()
        self._drop_cancelled()
        if self._prefilling:
            self._prefill_step()
        if self._decoding:
            self._decode_step()
        return True

    def _admit(self) -> None:
        """Move waiting requests into the batch while slots and KV budget allow (FIFO)."""
        while self._waiting:
            seq = self._waiting[0]
            if seq.stream.cancelled:
                self._waiting.popleft()
                self._finish(seq, "cancelled", flush=False)
                continue
            running = self._prefilling + self._decoding
            if len(running) >= self.config.max_running:
                return
            longest = max([s.reserved for s in running] + [seq.reserved])
            if (len(running) + 1) * longest > self.config.max_total_tokens and running:
                return
            self._waiting.popleft()
            if self._validate_admitted(seq):
                self._prefilling.append(seq)

    def _validate_admitted(self, seq: _Sequence) -> bool:
        """Validate an admitted request; False when it already finished (or failed)."""
        ids = seq.request.prompt_ids
        if seq.request.params.max_new_tokens <= 0:
            self._finish(seq, "length", flush=False)
            return False
        if not ids or min(ids) < 0 or max(ids) >= self._runner.vocab_size:
            self._fail(seq, EngineError("the prompt is empty or has token ids outside the vocabulary"))
            return False
        logger.debug("request %s admitted", seq.request_id)
        return True

    def _drop_cancelled(self) -> None:
        for group in (self._prefilling, self._decoding):
            for seq in [s for s in group if s.stream.cancelled]:
                group.remove(seq)
                self._finish(seq, "cancelled", flush=False)
        with self._lock:
            for seq in [s for s in self._waiting if s.stream.cancelled]:
                self._waiting.remove(seq)
                self._finish(seq, "cancelled", flush=False)

    def _prefill_group(self) -> list[tuple[_Sequence, list[int]]]:
        """The prompts (or chunk of one long prompt) for the next prefill forward."""
        budget = self.config.prefill_chunk_tokens
        first = self._prefilling[0]
        remaining = list(first.request.prompt_ids[first.prefilled :])
        if len(remaining) >= budget:
            return [(first, remaining[:budget])]
        group = [(first, remaining)]
        longest = len(remaining)
        for seq in self._prefilling[1:]:
            ids = list(seq.request.prompt_ids[seq.prefilled :])
            if (len(group) + 1) * max(longest, len(ids)) > budget:
                break
            group.append((seq, ids))
            longest = max(longest, len(ids))
        return group

    def _prefill_step(self) -> None:
        group = self._prefill_group()
        try:
            logits = self._runner.forward([s.kv for s, _ in group], [ids for _, ids in group])
        except Exception as exc:  # noqa: BLE001 - retried one by one to find the culprit
            if len(group) == 1:
                self._prefilling.remove(group[0][0])
                self._fail(group[0][0], exc)
                return
            logger.warning("batched prefill failed (%s); retrying its requests one by one", exc)
            for seq, ids in group:
                self._runner.release(seq.kv)
                seq.prefilled = 0
            for seq, _ in group:
                self._prefill_alone(seq)
            return
        self._after_prefill([(seq, ids, row) for row, (seq, ids) in enumerate(group)], logits)

    def _prefill_alone(self, seq: _Sequence) -> None:
        ids = list(seq.request.prompt_ids[: self.config.prefill_chunk_tokens])
        try:
            logits = self._runner.forward([seq.kv], [ids])
        except Exception as exc:  # noqa: BLE001
            self._prefilling.remove(seq)
            self._fail(seq, exc)
            return
        self._after_prefill([(seq, ids, 0)], logits)

    def _after_prefill(self, rows: list[tuple[_Sequence, list[int], int]], logits: torch.Tensor) -> None:
        done: list[tuple[_Sequence, int]] = []
        for seq, ids, row in rows:
            seq.prefilled += len(ids)
            if seq.prefilled >= seq.prompt_len:
                done.append((seq, row))
        if not done:
            return
        for seq, _ in done:
            self._prefilling.remove(seq)
            self._decoding.append(seq)
        picked = logits if len(done) == len(rows) else logits[[row for _, row in done]]
        self._sample_and_emit([seq for seq, _ in done], picked)

    def _decode_step(self) -> None:
        batch = list(self._decoding)
        logits = self._runner.forward([s.kv for s in batch], [[s.generated[-1]] for s in batch])
        self._sample_and_emit(batch, logits)

    def _sample_and_emit(self, batch: list[_Sequence], logits: torch.Tensor) -> None:
        try:
            tokens = self._sampler.select(logits, [s.sampler for s in batch])
        except Exception:  # noqa: BLE001 - find the request whose settings broke sampling
            tokens = [self._select_alone(seq, logits[i : i + 1]) for i, seq in enumerate(batch)]
        for seq, token in zip(batch, tokens):
            if token < 0:
                continue
            try:
                self._accept_token(seq, token)
            except Exception as exc:  # noqa: BLE001 - one request's failure is its own
                self._leave(seq)
                self._fail(seq, exc)

    def _select_alone(self, seq: _Sequence, logits: torch.Tensor) -> int:
        try:
            return self._sampler.select(logits, [seq.sampler])[0]
        except Exception as exc:  # noqa: BLE001
            self._leave(seq)
            self._fail(seq, exc)
            return -1

    def _accept_token(self, seq: _Sequence, token: int) -> None:
        """Record one generated id, stream its text, and finish the request when it is done."""
        seq.generated.append(token)
        seq.sampler.observe(token)
        if token in self.eos_ids:
            self._leave(seq)
            self._finish(seq, "stop", flush=True)
            return
        text, stopped = seq.stops.feed(seq.detok.push(token))
        self._emit(seq, text)
        if stopped:  # the text after the stop string is dropped
            self._leave(seq)
            self._finish(seq, "stop", flush=False)
        elif len(seq.generated) >= seq.request.params.max_new_tokens:
            self._leave(seq)
            self._finish(seq, "length", flush=True)

    def _leave(self, seq: _Sequence) -> None:
        if seq in self._decoding:
            self._decoding.remove(seq)
        elif seq in self._prefilling:
            self._prefilling.remove(seq)

    def _emit(self, seq: _Sequence, text: str) -> None:
        if text:
            seq.text.append(text)
            seq.stream.push(TextDelta(text))

    def _finish(self, seq: _Sequence, reason: FinishReason, flush: bool) -> None:
        """Release the request's cache and close its stream with ``Finished``.

        ``flush`` emits text still held back (an unfinished character at the very end, or a
        possible stop-string start that never completed)."""
        self._runner.release(seq.kv)
        if flush:
            tail, stopped = seq.stops.feed(seq.detok.flush())
            self._emit(seq, tail if stopped else tail + seq.stops.flush())
        seq.stream.push(Finished(reason, seq.prompt_len, len(seq.generated), "".join(seq.text)))
        logger.debug("request %s finished: %s after %d tokens", seq.request_id, reason, len(seq.generated))

    def _fail(self, seq: _Sequence, exc: BaseException) -> None:
        self._runner.release(seq.kv)
        logger.error("request %s failed: %s", seq.request_id, exc, exc_info=exc)
        error = exc if isinstance(exc, EngineError) else EngineError(f"generation failed: {exc}")
        seq.stream.push(error)

    def _fail_all(self, error: EngineError) -> None:
        """Fail every waiting and running request; the caller holds ``self._lock``."""
        pending = [*self._prefilling, *self._decoding, *self._waiting]
        self._waiting.clear()
        self._prefilling.clear()
        self._decoding.clear()
        for seq in pending:
            self._runner.release(seq.kv)
            seq.stream.push(error)

    def _die(self, exc: BaseException) -> None:
        logger.critical("engine failed; failing every pending request", exc_info=exc)
        with self._lock:  # submit() checks health under this lock: nothing can slip in after
            self._healthy = False
            self._fail_all(EngineError(f"the engine failed: {exc}"))


__all__ = ["BatchEngine", "EngineConfig"]
