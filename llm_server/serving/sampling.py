"""The one request -> sampling rule of every API (spec ``/chat/*`` and OpenAI ``/v1/*``).

A request may override some of the server's default :class:`SamplingParams`. Both APIs map
their fields through :func:`request_sampling`, so the same numbers sample the same way:

- ``temperature`` given: below :data:`MIN_TEMPERATURE` (0, or a number such as ``1e-300``
  that would underflow the logits to inf/NaN) is greedy decoding; otherwise it samples at
  that temperature, whatever the configured ``do_sample`` says;
- ``top_p`` given: below :data:`MIN_TOP_P` only the most likely token survives, which is
  greedy decoding; otherwise nucleus sampling with it;
- ``max_new_tokens``, ``repetition_penalty``, ``seed`` and ``stop`` replace the defaults;
- ``presence_penalty`` / ``frequency_penalty`` (OpenAI's, in [-2, 2]), ``logit_bias`` (values
  in [-100, 100]), ``top_k`` (0 or -1: off) and ``min_p`` (in [0, 1]) are the request's own:
  the engine applies them in the order of ``engine/sampler.py``'s docstring.

The ranges the APIs accept (their pydantic bounds, refused with 400 naming the field) are
here too, so the engine only ever receives values it can use.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from llm_server.engine.types import SamplingParams
from llm_server.helper_functionality.config_models import ModelParameters
from llm_server.serving.request import ChatInputError, Sampling

#: Temperatures below this decode greedily (vLLM's sampling epsilon): dividing logits by less overflows.
MIN_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 2.0
#: top_p values below this keep only the most likely token: greedy decoding.
MIN_TOP_P = 1e-5
#: The repetition penalties accepted: far outside this range the logits overflow or vanish.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
#: Seeds are signed 64-bit integers (what the engine's random generator takes, and OpenAI's ``int64``).
MIN_SEED = -(2**63)
MAX_SEED = 2**63 - 1
#: OpenAI's bounds for presence_penalty / frequency_penalty and for a logit_bias value.
MAX_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0


def sampling_defaults(parameters: ModelParameters, max_new_tokens_limit: int) -> SamplingParams:
    """The generation defaults of ``model_config.yaml`` (``parameters``; unset keys: the package's,
    defined once in :class:`ModelParameters`) as the engine's settings, ``max_new_tokens`` capped
    by the server's limit."""
    return SamplingParams(
        max_new_tokens=max(1, min(parameters.max_new_tokens, max_new_tokens_limit)),
        temperature=parameters.temperature,
        top_p=parameters.top_p,
        do_sample=parameters.do_sample,
        repetition_penalty=parameters.repetition_penalty,
    )


def request_sampling(
    defaults: SamplingParams,
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: tuple[str, ...] = (),
) -> SamplingParams:
    """``defaults``, overridden where the request said otherwise (rules in the module docstring)."""
    changes: dict[str, Any] = {}
    if max_new_tokens is not None:
        changes["max_new_tokens"] = max_new_tokens
    if temperature is not None:
        greedy = temperature < MIN_TEMPERATURE
        changes["temperature"] = 0.0 if greedy else float(temperature)
        changes["do_sample"] = not greedy
    if top_p is not None:
        if top_p < MIN_TOP_P:
            changes["do_sample"] = False
        else:
            changes["top_p"] = float(top_p)
    if repetition_penalty is not None:
        changes["repetition_penalty"] = float(repetition_penalty)
    if seed is not None:
        changes["seed"] = seed
    if stop:
        changes["stop"] = stop
    return replace(defaults, **changes)


def request_filters(params: SamplingParams, asked: Sampling) -> SamplingParams:
    """``params`` with the request's penalties, ``logit_bias``, ``top_k`` and ``min_p`` (checked)."""
    changes: dict[str, Any] = {}
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(asked, name)
        if value is not None:
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise ChatInputError(f"{name} must be between -{MAX_PENALTY} and {MAX_PENALTY}; got {value}", name)
            changes[name] = float(value)
    for token_id, bias in asked.logit_bias:
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise ChatInputError(f"logit_bias value for token {token_id} must be between -{MAX_LOGIT_BIAS} and "
                                 f"{MAX_LOGIT_BIAS}; got {bias}", f"logit_bias.{token_id}")
    if asked.logit_bias:
        changes["logit_bias"] = tuple((int(t), float(b)) for t, b in asked.logit_bias)
    if asked.top_k is not None:
        if asked.top_k < -1:
            raise ChatInputError(f"top_k must be -1 or 0 (off) or a positive integer; got {asked.top_k}", "top_k")
        changes["top_k"] = max(asked.top_k, 0)
    if asked.min_p is not None:
        if not 0.0 <= asked.min_p <= 1.0:
            raise ChatInputError(f"min_p must be between 0 and 1; got {asked.min_p}", "min_p")
        changes["min_p"] = float(asked.min_p)
    return replace(params, **changes)
