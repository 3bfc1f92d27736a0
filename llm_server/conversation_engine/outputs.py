"""Output generation: blocking and streaming text generation, plain and with answer improvement.

Streaming runs ``model.generate`` in a worker thread feeding transformers' TextIteratorStreamer.
An exception inside generation is re-raised to the consumer (nothing hangs), and a consumer that
stops iterating (``close()``, ``break`` + garbage collection) stops the generation at its next
step through a StoppingCriteria.

Generation parameters default to ``model_config.yaml``'s ``parameters``, the package's
generation defaults filling what the file leaves out (every key is passed to ``model.generate``;
the defaults are defined once, in ``helper_functionality.config_models.ModelParameters``);
keyword arguments override them per call. Each function also accepts
``config_parameters=``: the ``parameters`` mapping to start from, so a caller that read the file
once (ConversationEngine) does not re-read it on every pass; without it the file is read per call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, cast

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from llm_server.conversation_engine.improvement import GenerateFn, grammar_available, improvement_pipeline
from llm_server.conversation_engine.improvement_gate import DEFAULT_GATE, GateDecision
from llm_server.conversation_engine.inputs import DEFAULT_ROLE, SystemPrompt, encode_messages, prepare_inputs
from llm_server.conversation_engine.prompt_reuse import CACHE_FIELD, PromptReuse
from llm_server.helper_functionality.yaml_loading import read_model_section

logger = logging.getLogger(__name__)

_SAMPLING_ONLY = ("temperature", "top_p", "top_k")
#: Draft tokens per step of prompt-lookup decoding for a pass with a ``prediction`` (0: off).
PROMPT_LOOKUP_TOKENS = 10
#: Seconds to wait for an abandoned generation thread to notice its stop flag.
_STOP_JOIN_TIMEOUT_S = 30.0


def configured_parameters() -> dict[str, Any]:
    """model_config.yaml's ``parameters`` with the generation defaults: those of every generation."""
    return read_model_section().generation_parameters()


def generation_parameters(*, config_parameters: Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """``model.generate`` keyword arguments: ``config_parameters`` (None: read model_config.yaml)
    updated with the non-None ``overrides``.

    Sampling-only settings are dropped when ``do_sample`` is false (greedy decoding).
    """
    configured = configured_parameters() if config_parameters is None else config_parameters
    params = {key: value for key, value in configured.items() if value is not None}
    params.update({key: value for key, value in overrides.items() if value is not None})
    if not params.get("do_sample", False):
        for key in _SAMPLING_ONLY:
            params.pop(key, None)
    return params


class _StopFlag(StoppingCriteria):
    """Stops ``generate`` once ``event`` is set (the consumer went away)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        flags = torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
        return cast(torch.BoolTensor, flags)  # a bool tensor: what StoppingCriteria's signature calls BoolTensor


class _StopText(StoppingCriteria):
    """Stops ``generate`` once the new text holds one of ``stops`` anywhere. (transformers'
    ``stop_strings`` look only at the end, which prompt-lookup decoding steps past: it appends
    several tokens at once.)"""

    def __init__(self, tok: Any, prompt_length: int, stops: tuple[str, ...]) -> None:
        self.tok, self.prompt_length, self.stops = tok, prompt_length, stops

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        texts = self.tok.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        flags = torch.tensor([any(stop in text for stop in self.stops) for text in texts], device=input_ids.device)
        return cast(torch.BoolTensor, flags)


def _decode_new_tokens(tok: Any, output: torch.Tensor, prompt_length: int) -> str:
    return tok.decode(output[0, prompt_length:], skip_special_tokens=True)


def generate_reply(inputs: Mapping[str, Any], tok: Any, model: Any, **generation_kwargs: Any) -> str:
    """Blocking generation: the decoded text of the new tokens."""
    params = generation_parameters(**generation_kwargs)
    with torch.inference_mode():
        output = model.generate(**inputs, **params)
    sequences = output.sequences if hasattr(output, "sequences") else output
    return _decode_new_tokens(tok, sequences, inputs["input_ids"].shape[-1])


def stream_generate(
    inputs: Mapping[str, Any], tok: Any, model: Any, max_new_tokens: int | None = None, *,
    on_output: Callable[[Any], None] | None = None, **generation_kwargs: Any
) -> Iterator[str]:
    """Stream the text of new tokens as it is generated (chunks are never empty).

    Errors inside ``model.generate`` are raised here. Abandoning the iterator stops generation.
    ``on_output`` (when given) receives what ``model.generate`` returned, as a dict-like output
    (``return_dict_in_generate``: its ``past_key_values`` too), once generation has ended.
    """
    params = generation_parameters(max_new_tokens=max_new_tokens, **generation_kwargs)
    if on_output is not None:
        params["return_dict_in_generate"] = True
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    stop = threading.Event()
    failure: list[BaseException] = []
    stopping = StoppingCriteriaList([*(params.pop("stopping_criteria", None) or []), _StopFlag(stop)])

    def run() -> None:
        try:
            with torch.inference_mode():
                output = model.generate(**inputs, **params, streamer=streamer, stopping_criteria=stopping)
            if on_output is not None:
                on_output(output)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer below, which re-raises it
            failure.append(exc)
            # Wake the consumer, which would otherwise wait forever. Not streamer.end(): it decodes
            # the token cache and could fail again (e.g. when decoding was what failed).
            streamer.on_finalized_text("", stream_end=True)

    worker = threading.Thread(target=run, name="llm-generate", daemon=True)
    worker.start()
    try:
        for chunk in streamer:
            if failure:
                break
            if chunk:
                yield chunk
    finally:
        stop.set()
        worker.join(timeout=_STOP_JOIN_TIMEOUT_S)
        if worker.is_alive():
            logger.warning("generation thread did not stop within %.0fs", _STOP_JOIN_TIMEOUT_S)
    if failure:
        raise failure[0]  # the original exception, with the worker's traceback


def make_generate_fn(tok: Any, model: Any, **generation_kwargs: Any) -> GenerateFn:
    """A ``GenerateFn`` for :func:`improvement_pipeline`: messages -> streamed chunks of one pass.

    A pass's options (``improvement.pass_options``) apply to that pass only: ``schema`` constrains
    it, ``max_new_tokens`` / ``do_sample`` override the turn's settings, and ``prediction`` (the
    text a revision will likely repeat, which its prompt holds) turns on transformers' prompt-lookup
    decoding (``prompt_lookup_num_tokens``), and ``stop`` ends it once its text holds one of those
    strings (the text keeps the stop string and what came with it; the pipeline's parsing drops them). A pass
    starts from the KV cache of the one before when their prompts share a start (:mod:`.prompt_reuse`).
    """
    reuse = PromptReuse()

    def generate(messages: list[dict[str, str]], schema: dict[str, Any] | None = None,
                 prediction: str | None = None, stop: tuple[str, ...] = (), **pass_kwargs: Any) -> Iterator[str]:
        inputs = encode_messages(tok, model, messages)
        kwargs = {**generation_kwargs, **pass_kwargs}  # a pass's own max_new_tokens / do_sample win
        if stop:
            ends = _StopText(tok, int(inputs["input_ids"].shape[-1]), stop)
            kwargs["stopping_criteria"] = StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []), ends])

        if schema is not None:
            kwargs = _with_schema(tok, inputs, schema, kwargs)
        if prediction and PROMPT_LOOKUP_TOKENS:  # the predicted text is in the prompt: prompt-lookup drafting
            kwargs.setdefault("prompt_lookup_num_tokens", PROMPT_LOOKUP_TOKENS)
        if {"past_key_values", "cache"} & kwargs.keys() or kwargs.get("use_cache") is False:  # the caller's own cache
            return stream_generate(inputs, tok, model, **kwargs)
        ids = [int(i) for i in inputs["input_ids"][0].tolist()]
        past = reuse.lend(ids)
        return stream_generate(inputs, tok, model, on_output=partial(reuse.keep, ids),
                               **kwargs, **({CACHE_FIELD: past} if past is not None else {}))

    return generate


def _with_schema(tok: Any, inputs: Mapping[str, Any], schema: dict[str, Any],
                 generation_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``generation_kwargs`` plus a LogitsProcessor holding the output to ``schema`` (llguidance)."""
    from transformers import LogitsProcessorList

    from llm_server.engine.constraints import GrammarLogitsProcessor, compiler_for

    grammar = compiler_for(tok).json_schema(schema)
    processors = LogitsProcessorList([*(generation_kwargs.get("logits_processor") or []),
                                      GrammarLogitsProcessor(grammar, int(inputs["input_ids"].shape[-1]))])
    return {**generation_kwargs, "logits_processor": processors}


def stream_reply(
    tok: Any,
    model: Any,
    system_prompt: SystemPrompt,
    message: str,
    role: str = DEFAULT_ROLE,
    conversation_history: Sequence[Mapping[str, Any]] | None = None,
    result: dict[str, str] | None = None,
    **generation_kwargs: Any,
) -> Iterator[str]:
    """One plain answer, streamed; ``result["reply"]`` holds the whole answer once done."""
    if result is not None:
        result.clear()
    inputs = prepare_inputs(tok, model, system_prompt, message, role, conversation_history)
    parts: list[str] = []
    for chunk in stream_generate(inputs, tok, model, **generation_kwargs):
        parts.append(chunk)
        yield chunk
    if result is not None:
        result["reply"] = "".join(parts).strip()


def stream_and_improve_reply(
    tok: Any,
    model: Any,
    system_prompt: SystemPrompt,
    message: str,
    role: str = DEFAULT_ROLE,
    conversation_history: Sequence[Mapping[str, Any]] | None = None,
    result: dict[str, str] | None = None,
    *,
    intermediate_steps: bool = False,
    gate: str = DEFAULT_GATE,
    decisions: list[GateDecision] | None = None,
    **generation_kwargs: Any,
) -> Iterator[str]:
    """Draft, two review/revision passes; streams only the final answer (or, with
    ``intermediate_steps``, every stage under its heading).

    ``result`` receives draft_answer, suggestions1..comments2 and reply (see improvement.py);
    ``gate`` picks the acceptance gate's policy and ``decisions`` (when given) receives each
    stage's gate decision (to measure the gate).
    """
    return improvement_pipeline(
        make_generate_fn(tok, model, **generation_kwargs),
        system_prompt,
        [dict(turn) for turn in conversation_history or []],
        message,
        role=role,
        intermediate_steps=intermediate_steps,
        result=result,
        structured=grammar_available(),
        decisions=decisions,
        gate=gate,
        greedy=decodes_greedily(model, **generation_kwargs),  # stage 2 then runs only if stage 1 changed the answer
    )


def decodes_greedily(model: Any, **generation_kwargs: Any) -> bool:
    """Whether ``model.generate`` with these settings (model_config.yaml's ``parameters`` or
    ``config_parameters``, overridden by the keyword arguments) decodes greedily; a ``do_sample`` set
    nowhere is the model's own ``generation_config``'s."""
    params = generation_parameters(**generation_kwargs)
    default = getattr(getattr(model, "generation_config", None), "do_sample", False)
    return not params.get("do_sample", default)


def stream_and_improve_reply_with_steps(
    tok: Any,
    model: Any,
    system_prompt: SystemPrompt,
    message: str,
    role: str = DEFAULT_ROLE,
    conversation_history: Sequence[Mapping[str, Any]] | None = None,
    result: dict[str, str] | None = None,
    **generation_kwargs: Any,
) -> Iterator[str]:
    """Like :func:`stream_and_improve_reply`, streaming every stage under its heading."""
    return stream_and_improve_reply(
        tok, model, system_prompt, message, role, conversation_history, result,
        intermediate_steps=True, **generation_kwargs,
    )
