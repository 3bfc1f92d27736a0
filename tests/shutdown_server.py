"""A server process for the graceful-shutdown tests: ``python -m tests.shutdown_server PORT TIMEOUT [resignal]``.

With ``resignal``, the first stop signal sends the process a second one from inside its own
handler, so the second signal is always handled while the first one is (the race of issue 24).

It runs the real app through :func:`llm_server.api.ops.shutdown.run_server` (what
``start_llm_server`` calls) around a slow ScriptedEngine, with a character-level stand-in
tokenizer so the process starts in a second instead of loading the real one.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import Any

from llm_server.api.ops.shutdown import GracefulServer, run_server
from llm_server.api.plumbing.middleware import configure_logging
from tests.fakes import ScriptedEngine
from tests.openai_harness import build_app

WORDS = 40
DELAY_S = 0.1


class CharTokenizer:
    """One token per character; a trivial chat template. Enough for the serving layer."""

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = True, **_: Any) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: list[int], **_: Any) -> str:
        return "".join(chr(i) for i in ids)

    def __len__(self) -> int:
        return 0x110000


def resignal_inside_the_handler() -> None:
    """Make the first stop signal raise a second one while its handler runs."""
    handle_exit = GracefulServer.handle_exit
    sent: list[int] = []

    def handle_twice(self: GracefulServer, sig: int, frame: FrameType | None) -> None:
        if not sent:
            sent.append(sig)
            os.kill(os.getpid(), signal.SIGTERM)  # pending now; Python runs it inside this call
        handle_exit(self, sig, frame)

    GracefulServer.handle_exit = handle_twice  # type: ignore[method-assign]


def main() -> None:
    port, timeout_s = int(sys.argv[1]), float(sys.argv[2])
    if sys.argv[3:] == ["resignal"]:
        resignal_inside_the_handler()
    configure_logging("INFO")
    reply = " ".join(f"word{i}" for i in range(WORDS))
    engine = ScriptedEngine(CharTokenizer(), reply=reply, delay_s=DELAY_S)
    run_server(build_app(engine), host="127.0.0.1", port=port, shutdown_timeout_s=timeout_s, log_level="info")


if __name__ == "__main__":
    main()
