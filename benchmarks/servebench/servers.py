"""Server processes: start one in its own process group, wait until ready, measure it, always stop it.

A :class:`ServerSpec` says how to start a server and talk to it (command, environment, readiness
URL, OpenAI base URL, key); :func:`running` runs it for the duration of a ``with`` block. The
concrete servers (ours, ``transformers serve``, ``llama-server``) are built in :mod:`servebench.peers`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("bench_serving")

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
READY_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 20.0


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


def process_group(pgid: int) -> Iterator[tuple[Path, list[str]]]:
    """Each live process of group ``pgid`` (a server started in its own session, and the children it
    runs): its ``/proc`` folder and the fields of its ``stat`` after the command name (Linux)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # field 5 of /proc/PID/stat: the process group
                yield entry, fields


def process_group_rss_mb(pgid: int) -> float | None:
    """Resident memory (MB) of every process in group ``pgid`` (a server and its children; Linux /proc)."""
    total_kb, found = 0, False
    for entry, _ in process_group(pgid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
                    found = True
    return total_kb / 1024 if found else None


def process_group_cpu_ticks(pgid: int) -> int:
    """CPU ticks (user + system, waited-for children included) of every process in group ``pgid``.
    ``transformers serve`` serves from a child: counting only the first process made the server's
    own work look like another program's."""
    return sum(sum(int(v) for v in fields[11:15]) for _, fields in process_group(pgid))


def machine_ticks() -> tuple[int, int] | None:
    """(busy, steal) CPU ticks of the whole machine so far (Linux ``/proc/stat``; None elsewhere).
    Busy excludes idle and iowait; steal is time the hypervisor ran something else on our vCPUs."""
    try:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(values) - values[3] - values[4], values[7] if len(values) > 7 else 0


def wait_until_settled(max_s: float, min_s: float = 0.0, quiet_windows: int = 5, window_s: float = 1.0,
                       read: Callable[[], tuple[int, int] | None] = machine_ticks,
                       sleep: Callable[[float], None] = time.sleep) -> float:
    """Wait at least ``min_s`` and at most ``max_s``, until ``quiet_windows`` windows in a row show the
    machine idle (under 0.15 cores busy) and no steal (under 0.02 cores): seconds waited. Between
    servers: after a server that held 14 GB exited, the host took our vCPUs back for 20-25 s (the guest
    reports freed pages to it: virtio-balloon free page reporting), starting 4-10 s after the exit and in
    every other second, hence ``min_s`` as well as the quiet windows (docs/benchmarks.md, 2026-12-08)."""
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    waited, quiet = 0.0, 0
    last = read()
    while last is not None and waited < max_s and (quiet < quiet_windows or waited < min_s):
        sleep(window_s)
        waited += window_s
        now = read()
        if now is None:
            break
        busy, steal = ((b - a) / hz / window_s for a, b in zip(last, now, strict=True))
        quiet = quiet + 1 if busy < 0.15 and steal < 0.02 else 0
        last = now
    return waited
