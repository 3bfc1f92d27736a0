"""A server process keeps a step's MB-sized tensors on glibc's heap, and never overrides the user's settings.

Each case runs in a fresh interpreter (glibc's settings are per process). Whether a block was
mmapped is read from glibc's chunk header (the IS_MMAPPED bit of the size word before the block).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator only"
)

_BUILD_APP = """
import ctypes, json, logging
from llm_server.api.server import create_app
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def mmapped(size):
    block = libc.malloc(size)
    flag = bool(ctypes.c_size_t.from_address(block - ctypes.sizeof(ctypes.c_size_t)).value & 2)
    libc.free(block)
    return flag

before = mmapped(4 << 20)
create_app(engine_factory=lambda: None)
from llm_server.engine import threads
records = []
handler = logging.Handler(); handler.emit = records.append
threads.logger.addHandler(handler); threads.logger.setLevel(logging.INFO)
threads.configure_threads(1)
print(json.dumps({"before": before, "after": mmapped(4 << 20), "huge": mmapped(256 << 20),
                  "messages": [r.getMessage() for r in records]}))
"""


def run_server_start(**env: str) -> dict[str, object]:
    """Build the app in a fresh interpreter with ``env`` on top of an environment without MALLOC_* settings."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", _BUILD_APP], env={**base, **env}, capture_output=True, text=True,
                          timeout=300, check=True)
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_a_server_process_keeps_mb_sized_blocks_on_the_heap_and_says_so() -> None:
    result = run_server_start()
    assert result["before"] is True  # glibc's default: 4 MB is above its 128 kB mmap threshold
    assert result["after"] is False
    assert result["huge"] is True  # beyond the server's 64 MB threshold: still mmapped, handed back on free
    messages = result["messages"]
    assert isinstance(messages, list)
    assert any("heap: mmap threshold 64 MB, trim threshold 128 MB (the server's)" in m for m in messages), messages


def test_a_heap_setting_the_user_exported_is_kept() -> None:
    result = run_server_start(MALLOC_MMAP_THRESHOLD_="1048576")
    assert result["before"] is True and result["after"] is True  # the user's 1 MB threshold still holds
    messages = result["messages"]
    assert isinstance(messages, list)
    assert any("heap: MALLOC_MMAP_THRESHOLD_=1048576" in m for m in messages), messages


def test_an_arena_limit_combines_with_the_policy() -> None:
    result = run_server_start(MALLOC_ARENA_MAX="2")
    assert result["before"] is True and result["after"] is False
