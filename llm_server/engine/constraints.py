"""Grammar-constrained decoding: JSON schemas and Lark grammars as per-request token masks.

Built on llguidance (a maintained Rust matcher; see docs/structured_output.md for why it was
chosen over xgrammar). A :class:`GrammarCompiler` (one per tokenizer) turns a JSON schema, "any
JSON object" or a Lark grammar into a validated :class:`Grammar`; an uncompilable one raises
:class:`GrammarError` naming the problem, in the caller's (request) thread. Each request then
gets its own :class:`GrammarMatcher` (created in ``submit``, still the request thread), which
the sampler asks for the allowed ids before every step and feeds every accepted id. The
end-of-sequence id is allowed only where the grammar accepts, and once the grammar is complete
it is the only id allowed.

:class:`GrammarLogitsProcessor` drives the same matcher from ``model.generate`` (the spec's
in-process Python API).
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from dataclasses import dataclass, replace
from typing import Any, cast

import llguidance
import llguidance.hf
import torch

logger = logging.getLogger(__name__)

_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


class GrammarError(ValueError):
    """A schema or grammar the library cannot compile (the client's mistake: HTTP 400)."""


@dataclass(frozen=True, eq=False)
class Grammar:
    """A validated grammar for one tokenizer; cheap to turn into per-request matchers."""

    tokenizer: Any  # llguidance.LLTokenizer
    text: str
    description: str
    schema: Any = None  # the JSON schema it was compiled from (json_schema / json_object), for the final check

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self)


class GrammarMatcher:
    """One request's parse state: the ids allowed next, advanced by every accepted id."""

    def __init__(self, grammar: Grammar) -> None:
        self._matcher = llguidance.LLMatcher(grammar.tokenizer, grammar.text, log_level=0)
        if self._matcher.is_error():
            raise GrammarError(self._matcher.get_error())
        self._eos = int(grammar.tokenizer.eos_token)
        self._vocab = int(grammar.tokenizer.vocab_size)

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """[vocab_size] bool on the CPU: the ids the grammar allows next (EOS only when it accepts)."""
        if self._matcher.is_error():  # cannot happen with masked sampling; end the sequence cleanly
            logger.warning("grammar matcher in error state: %s", self._matcher.get_error())
            return self._only_eos(vocab_size)
        packed = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.uint8)
        bits = ((packed.unsqueeze(1) >> _BIT_SHIFTS) & 1).flatten().bool()[: self._vocab]
        if bits.numel() < vocab_size:
            bits = torch.cat([bits, torch.zeros(vocab_size - bits.numel(), dtype=torch.bool)])
        bits = bits[:vocab_size]
        if not bool(bits.any()):
            return self._only_eos(vocab_size)
        return bits

    def _only_eos(self, vocab_size: int) -> torch.Tensor:
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[min(self._eos, vocab_size - 1)] = True
        return mask

    def advance(self, token_id: int) -> None:
        """Feed an accepted id (a masked sampler never picks one the grammar refuses)."""
        if not self._matcher.consume_token(token_id):
            logger.warning("grammar refused token %d: %s", token_id, self._matcher.get_error())

    def is_accepting(self) -> bool:
        return bool(self._matcher.is_accepting())

    def forced(self) -> list[int]:
        """The ids the grammar forces next, whatever the model would choose (maybe none): the fixed
        keys and punctuation of a JSON schema. The engine verifies them as a speculative draft."""
        if self._matcher.is_error() or self._matcher.is_stopped():
            return []
        return [int(token) for token in self._matcher.compute_ff_tokens()]


class GrammarCompiler:
    """Compiles and validates grammars for one Hugging Face tokenizer (thread-safe)."""

    def __init__(self, tokenizer: Any) -> None:
        self._hf_tokenizer = tokenizer
        self._ll_tokenizer: Any = None
        self._lock = threading.Lock()

    @property
    def ll_tokenizer(self) -> Any:
        """llguidance's view of the vocabulary (built once, ~0.4 s for a 49k vocabulary)."""
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer)
            return self._ll_tokenizer

    def json_schema(self, schema: Any) -> Grammar:
        """A grammar for JSON documents valid against ``schema`` (a dict)."""
        if not isinstance(schema, dict):
            raise GrammarError("the JSON schema must be an object")
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=cast(Any, _JSON_OPTIONS))
        except (ValueError, TypeError, RuntimeError) as exc:
            raise GrammarError(f"invalid JSON schema: {exc}") from exc
        return replace(self._checked(text, "json_schema"), schema=schema)

    def json_object(self) -> Grammar:
        """A grammar for a JSON object of bounded size (see :data:`BOUNDED_OBJECT_SCHEMA`)."""
        return self.json_schema(BOUNDED_OBJECT_SCHEMA)

    def lark(self, grammar: str, description: str = "lark") -> Grammar:
        """A grammar written in llguidance's Lark dialect (``%json {...}`` embeds a schema)."""
        text = llguidance.LLMatcher.grammar_from_lark(grammar)
        return self._checked(text, description)

    def _checked(self, text: str, description: str) -> Grammar:
        tokenizer = self.ll_tokenizer
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, tokenizer)
        if is_error:
            raise GrammarError("; ".join(messages) or "the grammar cannot be compiled")
        return Grammar(tokenizer, text, description)


#: Compact separators and no free whitespace: a small model cannot loop on blank space.
_JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "coerce_one_of": True,
}


def _bounded_object_schema(max_entries: int = 8, max_string: int = 100) -> dict[str, Any]:
    scalar: list[dict[str, Any]] = [
        {"type": "string", "maxLength": max_string},
        {"type": "number", "minimum": -1e15, "maximum": 1e15},
        {"type": "boolean"},
        {"type": "null"},
    ]

    def container(items: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"type": "array", "maxItems": max_entries, "items": items},
                {"type": "object", "maxProperties": max_entries, "additionalProperties": items}]

    inner = {"anyOf": scalar + container({"anyOf": scalar})}
    value = {"anyOf": scalar + container(inner)}
    return {"type": "object", "maxProperties": max_entries, "additionalProperties": value}


#: ``json_object`` mode: any JSON object up to three levels deep, at most 8 entries per object or
#: array and 100 characters per string. Unbounded, a 135M model often repeats one key until
#: max_tokens cuts the document; bounded, it always closes it.
BOUNDED_OBJECT_SCHEMA = _bounded_object_schema()

_compilers: weakref.WeakKeyDictionary[Any, GrammarCompiler] = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compiler_for(tokenizer: Any) -> GrammarCompiler:
    """The (cached) compiler of ``tokenizer``."""
    with _compilers_lock:
        try:
            compiler = _compilers.get(tokenizer)
        except TypeError:  # not weak-referenceable: no cache
            return GrammarCompiler(tokenizer)
        if compiler is None:
            compiler = GrammarCompiler(tokenizer)
            _compilers[tokenizer] = compiler
        return compiler


def schema_text(schema: Any) -> str:
    """``schema`` as compact JSON text (for prompts and logs)."""
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


class GrammarLogitsProcessor:
    """A transformers ``LogitsProcessor`` for one ``model.generate`` call (batch size 1)."""

    def __init__(self, grammar: Grammar, prompt_len: int | None = None) -> None:
        """``prompt_len`` None: the first call's ``input_ids`` (the prompt alone) give it."""
        self._matcher = grammar.matcher()
        self._fed = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        row = input_ids[0].tolist()
        if self._fed is None:
            self._fed = len(row)
        for token in row[self._fed :]:
            self._matcher.advance(int(token))
        self._fed = len(row)
        allowed = self._matcher.allowed(scores.shape[-1]).to(scores.device).unsqueeze(0)
        masked = scores.masked_fill(~allowed, float("-inf"))
        if not bool(torch.isfinite(masked).any()):  # earlier warpers (top-k/top-p) removed every allowed id
            masked = torch.zeros_like(scores).masked_fill(~allowed, float("-inf"))
        return masked
