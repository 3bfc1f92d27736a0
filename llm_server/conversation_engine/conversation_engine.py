"""ConversationEngine: the spec's in-process chat API over a loaded (tokenizer, model) pair.

It keeps the conversation history, picks plain or improved generation, and exposes the last
turn's results. History gains the user turn and the final answer only when a reply completes;
a failed or abandoned turn leaves it unchanged. ``last_result`` is emptied when a turn starts
and filled as the turn progresses. One engine serves one conversation at a time (not
thread-safe); use one engine per conversation, or the HTTP server for concurrent users.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from llm_server.conversation_engine.inputs import DEFAULT_ROLE, SystemPrompt, validate_history
from llm_server.conversation_engine.outputs import (
    configured_parameters,
    stream_and_improve_reply,
    stream_and_improve_reply_with_steps,
    stream_reply,
)


def schema_processors(tok: Any, schema: dict[str, Any]) -> Any:
    """A fresh ``logits_processor`` list (one per turn) holding ``model.generate`` to ``schema``."""
    from transformers import LogitsProcessorList

    from llm_server.engine.constraints import GrammarLogitsProcessor, compiler_for

    return LogitsProcessorList([GrammarLogitsProcessor(compiler_for(tok).json_schema(schema))])

logger = logging.getLogger(__name__)


class ConversationEngine:
    """Multi-turn chat with optional two-pass answer improvement.

    ``system_prompt`` is the role -> text mapping of ``load_system_prompt()`` (``role`` picks the
    answering prompt, "reviser" drives improvement) or a single string. model_config.yaml's
    ``parameters`` are read once, here; ``generation_kwargs`` override them for every turn
    (e.g. ``max_new_tokens=64``). ``schema`` (optional, a JSON schema dict) holds every plain
    (non-improvement) reply to that schema during decoding; it needs the grammar extra.
    """

    def __init__(
        self,
        tok: Any,
        model: Any,
        system_prompt: SystemPrompt,
        improvement: bool = False,
        intermediate_steps: bool = False,
        role: str = DEFAULT_ROLE,
        schema: dict[str, Any] | None = None,
        **generation_kwargs: Any,
    ) -> None:
        self.tok = tok
        self.schema = schema
        self.model = model
        self.system_prompt = system_prompt
        self.improvement = improvement
        self.intermediate_steps = intermediate_steps
        self.role = role
        self.generation_kwargs = generation_kwargs
        self.config_parameters = configured_parameters()
        self.conversation_history: list[dict[str, str]] = []
        self.last_result: dict[str, str] = {}

    def set_improvement(self, improvement: bool = True) -> ConversationEngine:
        """Turn multi-pass improvement on or off; returns self for chaining."""
        self.improvement = bool(improvement)
        return self

    def set_intermediate_steps(self, intermediate_steps: bool = True) -> ConversationEngine:
        """Show (or hide) the improvement stages in the stream; returns self for chaining."""
        self.intermediate_steps = bool(intermediate_steps)
        return self

    def stream_reply(self, message: str, role: str | None = None, **generation_kwargs: Any) -> Iterator[str]:
        """Stream the answer to ``message`` (with improvement: the stages or the final answer).

        ``last_result`` is emptied now; ``last_result["reply"]`` is the final answer once the
        stream is exhausted, and only then is the turn added to ``conversation_history``.
        """
        self.last_result = {}
        history = validate_history(self.conversation_history)
        result = self.last_result
        overrides = {**self.generation_kwargs, **generation_kwargs}
        chunks = self._pipeline(message, role or self.role, history, result, overrides)
        return self._complete_turn(chunks, message, history, result)

    def reply(self, message: str, role: str | None = None, **generation_kwargs: Any) -> str:
        """Blocking counterpart of :meth:`stream_reply`: the final answer."""
        for _ in self.stream_reply(message, role, **generation_kwargs):
            pass
        return self.last_result["reply"]

    def reset(self) -> ConversationEngine:
        """Forget the conversation (history and last result); returns self."""
        self.conversation_history = []
        self.last_result = {}
        return self

    def _pipeline(
        self,
        message: str,
        role: str,
        history: list[dict[str, str]],
        result: dict[str, str],
        generation_kwargs: dict[str, Any],
    ) -> Iterator[str]:
        if self.schema is not None:
            if self.improvement:
                raise ValueError("a schema applies to plain replies; turn improvement off to use it")
            generation_kwargs = {**generation_kwargs, "logits_processor": schema_processors(self.tok, self.schema)}
        if not self.improvement:
            generate = stream_reply
        elif self.intermediate_steps:
            generate = stream_and_improve_reply_with_steps
        else:
            generate = stream_and_improve_reply
        return generate(
            self.tok, self.model, self.system_prompt, message, role, history, result,
            config_parameters=self.config_parameters, **generation_kwargs,
        )

    def _complete_turn(
        self, chunks: Iterator[str], message: str, history: list[dict[str, str]], result: dict[str, str]
    ) -> Iterator[str]:
        """Pass chunks through; record the turn in the history only after the last one."""
        yield from chunks
        reply = result.get("reply", "")
        self.conversation_history = [
            *history,
            {"role": "user", "content": message},
            {"role": "assistant", "content": reply},
        ]
        logger.debug("turn complete: %d history messages", len(self.conversation_history))
