"""The one request -> sampling rule of every API (spec ``/chat/*`` and OpenAI ``/v1/*``).

A request may override some of the server's default :class:`SamplingParams`. Both APIs map
their fields through :func:`request_sampling`, so the same numbers sample the same way:

- ``temperature`` given: below :data:`MIN_TEMPERATURE` (0, or a number such as ``1e-300``
  that would underflow the logits to inf/NaN) is greedy decoding; otherwise it samples at
  that temperature, whatever the configured ``do_sample`` says;
- ``top_p`` given: below :data:`MIN_TOP_P` only the most likely token survives, which is
  greedy decoding; otherwise nucleus sampling with it;
- ``max_new_tokens``, ``repetition_penalty``, ``seed`` and ``stop`` replace the defaults.

The ranges the APIs accept (their pydantic bounds, refused with 400 naming the field) are
here too, so the engine only ever receives values it can use.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from llm_server.engine.types import SamplingParams
from llm_server.helper_functionality.config_models import ModelParameters

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
