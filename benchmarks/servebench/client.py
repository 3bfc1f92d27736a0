"""Load generator and client-side metrics: the same streamed chat requests for every server.

A closed loop of ``concurrency`` workers sends requests through the official ``openai`` AsyncOpenAI
client (``stream=True``, greedy) and times each chunk. Definitions (all client side):

- tokens/s: completion tokens of a level / wall time from its first request to its last response byte;
- TTFT: request sent -> first chunk carrying content (a role-only first chunk does not count);
- ITL: per request, (last content chunk - first content chunk) / (completion tokens - 1); p50 over requests;
- completion tokens come from the stream's ``usage``; the number of content chunks is the fallback.

The server under test is only a base URL and a key (:class:`ServerSpec`), so any OpenAI-compatible
server is driven the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from servebench.servers import ServerSpec, machine_ticks, process_group_cpu_ticks

log = logging.getLogger("bench_serving")

# Same system message for both servers so the chat template renders the same prompt (SmolLM2's template
# would otherwise insert its own default system prompt on one side and maybe not on the other).
SYSTEM_MESSAGE = "You are a helpful assistant."
# Open-ended requests: greedy decoding of the embedded model answers each with far more than 64 tokens,
# so both servers generate the full budget (checked and reported, not assumed).
PROMPTS: tuple[str, ...] = (
    "Write a detailed essay about the history of the Roman Empire.",
    "Explain in detail how a car engine works, step by step.",
    "Write a long story about a dragon who learns to cook.",
    "Describe the water cycle in detail for a school textbook.",
    "Give a thorough explanation of how photosynthesis works.",
    "Write a detailed guide to planting a vegetable garden.",
    "Explain the causes and consequences of the French Revolution.",
    "Write a long letter to a friend describing a trip to the mountains.",
    "Describe in detail how computers store and process information.",
    "Write a detailed travel guide for a week in Japan.",
    "Explain how the human heart works, in detail.",
    "Write a long fairy tale about a brave little mouse.",
    "Describe the life cycle of a star in detail.",
    "Explain the basics of economics: supply, demand and prices.",
    "Write a detailed recipe and story for baking bread at home.",
    "Describe the main events of the Second World War in detail.",
)



@dataclass
class RequestResult:
    """Client-side timings of one streamed request."""

    sent: float
    first_token: float | None = None
    last_token: float | None = None
    done: float = 0.0
    completion_tokens: int = 0
    content_chunks: int = 0
    prompt_tokens: int | None = None
    tokens_from_usage: bool = False
    finish_reason: str | None = None
    error: str | None = None
    text: str = ""

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.sent

    @property
    def itl(self) -> float | None:
        if self.first_token is None or self.last_token is None or self.completion_tokens < 2:
            return None
        return (self.last_token - self.first_token) / (self.completion_tokens - 1)


@dataclass
class LevelResult:
    """Aggregates of one concurrency level on one server."""

    concurrency: int
    requests: int
    errors: int
    full_length: int
    completion_tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    itl_p50_s: float | None
    prompt_tokens_mean: float | None
    tokens_from_usage: bool
    error_samples: list[str] = field(default_factory=list)
    texts: dict[int, str] = field(default_factory=dict)  # request index -> generated text
    other_cpu_cores: float | None = None  # average CPU other processes used during the level
    attempts: int = 1
    rss_mb: float | None = None  # the server's resident memory right after the level


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def messages_for(index: int, fresh: bool = False) -> list[dict[str, str]]:
    """The chat of request ``index`` (same sequence for both servers). ``fresh``: the question opens
    with its request number, so no two requests of a run share more than the system message and the
    template's tokens around it (no server can reuse a repeated prompt)."""
    question = PROMPTS[index % len(PROMPTS)]
    return [
        {"role": "system", "content": SYSTEM_MESSAGE},
        {"role": "user", "content": f"Request {index}: {question}" if fresh else question},
    ]


async def one_request(client: Any, model: str, index: int, max_tokens: int, fresh: bool = False) -> RequestResult:
    """Send one streaming chat completion and time its chunks."""
    result = RequestResult(sent=time.perf_counter())
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=messages_for(index, fresh),
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            now = time.perf_counter()
            for choice in chunk.choices or []:
                if choice.delta is not None and choice.delta.content:
                    result.text += choice.delta.content
                    result.content_chunks += 1
                    result.last_token = now
                    if result.first_token is None:
                        result.first_token = now
                if choice.finish_reason:
                    result.finish_reason = choice.finish_reason
            if chunk.usage is not None:
                result.completion_tokens = chunk.usage.completion_tokens
                result.prompt_tokens = chunk.usage.prompt_tokens
                result.tokens_from_usage = True
    except Exception as exc:  # noqa: BLE001 - recorded per request, reported in the table
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    result.done = time.perf_counter()
    if not result.tokens_from_usage:
        result.completion_tokens = result.content_chunks
    return result


async def run_level(client: Any, model: str, concurrency: int, requests: int, max_tokens: int,
                    first_index: int = 0, fresh: bool = False) -> LevelResult:
    """Closed loop: ``concurrency`` workers share ``requests`` requests; aggregates their timings."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(first_index + i)
    results: list[RequestResult] = []
    texts: dict[int, str] = {}

    async def worker() -> None:
        while True:
            try:
                index = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            result = await one_request(client, model, index, max_tokens, fresh)
            results.append(result)
            if result.error is None:
                texts[index] = result.text

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = max(r.done for r in results) - start
    ok = [r for r in results if r.error is None]
    tokens = sum(r.completion_tokens for r in ok)
    prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    return LevelResult(
        concurrency=concurrency,
        requests=len(results),
        errors=len(results) - len(ok),
        full_length=sum(1 for r in ok if r.completion_tokens == max_tokens),
        completion_tokens=tokens,
        wall_s=wall,
        tokens_per_s=tokens / wall if wall > 0 else 0.0,
        ttft_p50_s=percentile([r.ttft for r in ok if r.ttft is not None], 50),
        ttft_p95_s=percentile([r.ttft for r in ok if r.ttft is not None], 95),
        itl_p50_s=percentile([r.itl for r in ok if r.itl is not None], 50),
        prompt_tokens_mean=statistics.fmean(prompts) if prompts else None,
        tokens_from_usage=all(r.tokens_from_usage for r in ok) if ok else False,
        error_samples=sorted({r.error for r in results if r.error})[:3],
        texts=texts,
    )


class CpuMeter:
    """CPU used by processes other than the server (its whole process group) and this client (Linux
    /proc; None elsewhere).

    ``other_cores()`` after ``start()`` is the average number of cores other work took meanwhile: a level
    measured while that was high shared the CPU with something else, so its numbers are not comparable.
    """

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self._start: tuple[float, int, int] | None = None

    @staticmethod
    def _process_ticks(pid: int | str) -> int:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return sum(int(v) for v in fields[11:15])  # utime stime cutime cstime

    def _sample(self) -> tuple[float, int, int] | None:
        try:
            own = process_group_cpu_ticks(self.server_pid) + self._process_ticks("self")
            machine = machine_ticks()
        except (OSError, ValueError, IndexError):
            return None
        return None if machine is None else (time.monotonic(), machine[0], own)

    def start(self) -> None:
        self._start = self._sample()

    def other_cores(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        other = (end[1] - self._start[1]) - (end[2] - self._start[2])
        return max(0.0, other / hz / (end[0] - self._start[0]))


class PromptNumbers:
    """The request numbers of never-sent prompts (``fresh``): :meth:`take` reserves the next ``count``."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, count: int) -> int:
        first, self.next = self.next, self.next + count
        return first


async def measured_level(client: Any, model: str, concurrency: int, requests: int, max_tokens: int,
                         meter: CpuMeter, max_other_cpu: float, retries: int,
                         fresh: PromptNumbers | None = None) -> LevelResult:
    """Run a level; while other processes took more than ``max_other_cpu`` cores during it, run it again
    (at most ``retries`` more times) and keep the attempt with the least interference. ``fresh``: the
    numbers of never-sent prompts (:func:`messages_for`), each attempt taking the next ``requests``."""
    best: LevelResult | None = None
    attempt = 0
    while True:
        attempt += 1
        meter.start()
        first = 0 if fresh is None else fresh.take(requests)
        level = await run_level(client, model, concurrency, requests, max_tokens, first, fresh is not None)
        level.other_cpu_cores = meter.other_cores()
        if best is None or (level.other_cpu_cores or 0.0) < (best.other_cpu_cores or 0.0):
            best = level
        if level.other_cpu_cores is None or level.other_cpu_cores <= max_other_cpu or attempt > retries:
            break
        log.warning("c=%d: other processes used %.2f cores during the level; running it again",
                    concurrency, level.other_cpu_cores)
    best.attempts = attempt
    return best


async def drive(spec: ServerSpec, server_pid: int, levels: Sequence[int], requests_per_level: Sequence[int],
                max_tokens: int, max_other_cpu: float = 0.25, retries: int = 2,
                rss_mb: Callable[[], float | None] = lambda: None, fresh: bool = False) -> list[LevelResult]:
    """Warm the server up, then run every level in turn; ``rss_mb`` is read after each level.
    ``fresh``: every request a prompt not sent before in the run (:func:`messages_for`)."""
    import httpx
    from openai import AsyncOpenAI

    limits = httpx.Limits(max_connections=max(levels) + 8, max_keepalive_connections=max(levels) + 8)
    http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0, connect=10.0))
    client = AsyncOpenAI(base_url=spec.base_url, api_key=spec.api_key, max_retries=0, http_client=http)
    try:
        models = await client.models.list()
        model = models.data[0].id
        log.info("%s serves model %r; warming up", spec.name, model)
        numbers = PromptNumbers() if fresh else None
        warm = await run_level(client, model, 1, 1, max_tokens, numbers.take(1) if numbers else 0, fresh)
        burst = await run_level(client, model, max(levels), max(levels), 16,
                                numbers.take(max(levels)) if numbers else 0, fresh)
        if warm.errors or burst.errors:
            raise RuntimeError(f"{spec.name} warm-up failed: {warm.error_samples or burst.error_samples}")
        results = []
        meter = CpuMeter(server_pid)
        for concurrency, requests in zip(levels, requests_per_level, strict=True):
            level = await measured_level(client, model, concurrency, requests, max_tokens, meter,
                                         max_other_cpu, retries, numbers)
            level.rss_mb = rss_mb()
            other = "?" if level.other_cpu_cores is None else f"{level.other_cpu_cores:.2f}"
            log.info(
                "%s c=%d: %.1f tok/s, TTFT p50 %s p95 %s, ITL p50 %s, full %d/%d, errors %d, other CPU %s cores, "
                "RSS %s MB", spec.name, concurrency, level.tokens_per_s, fmt_ms(level.ttft_p50_s),
                fmt_ms(level.ttft_p95_s), fmt_ms(level.itl_p50_s), level.full_length, level.requests, level.errors,
                other, "?" if level.rss_mb is None else f"{level.rss_mb:.0f}",
            )  # fmt: skip
            results.append(level)
        return results
    finally:
        await client.close()
        await http.aclose()


def fmt_ms(seconds: float | None) -> str:
    """Seconds as whole milliseconds; a dash for no value."""
    return "—" if seconds is None else f"{seconds * 1000:.0f} ms"
