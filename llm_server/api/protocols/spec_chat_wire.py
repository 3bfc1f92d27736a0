"""Wire format of the spec's endpoints: request parsing/validation and error mapping.

POST bodies are parsed with pydantic in *strict* JSON mode (``"yes"`` is not a boolean,
``"5"`` is not a number); GET query strings are parsed leniently (``improvement=true``),
since every query value is text (booleans: only true/false/1/0). Every problem becomes an :class:`APIError` whose JSON
says which field is wrong. Engine and serving errors map to HTTP in
:mod:`llm_server.api.protocols.turns` (shared with the OpenAI routes); a failure after a stream
started is written as :func:`stream_error_line`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    ValidationError,
    field_validator,
)

from llm_server.api.plumbing.errors import APIError
from llm_server.api.plumbing.text_guard import loads_query_json
from llm_server.conversation_engine.improvement import RESULT_KEYS
from llm_server.conversation_engine.inputs import HISTORY_ROLES
from llm_server.engine.types import EngineError
from llm_server.serving import sampling
from llm_server.serving.request import ChatInputError, Sampling, TurnRequest

END_MARKER = "[[END]]"
ERROR_MARKER = "[[ERROR]]"
#: Keys of the improvement stages returned by /chat/blocking with intermediate_steps.
STAGE_KEYS = tuple(key for key in RESULT_KEYS if key != "reply")


def integral(value: Any) -> Any:
    """``5.0`` -> ``5``: JSON does not tell 5 from 5.0 (JSON Schema's "integer" allows both);
    other values pass unchanged to the strict check (``"5"`` and ``5.5`` stay errors)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: An integer field that also takes an integral float (``5.0``) and nothing else.
Integer = Annotated[int, BeforeValidator(integral)]


class HistoryMessage(BaseModel):
    """One earlier turn of the conversation.

    ``role`` is checked by the serving layer (``conversation_engine.inputs.validate_history``,
    the one definition of the allowed roles): a wrong one is a 400 naming ``history.N.role``.
    """

    model_config = ConfigDict(extra="ignore")

    role: StrictStr = Field(json_schema_extra={"enum": list(HISTORY_ROLES)})
    content: StrictStr


class ChatRequest(BaseModel):
    """Body of POST /chat/blocking and /chat/stream (and the GET query parameters)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    prompt: StrictStr
    history: list[HistoryMessage] = Field(default_factory=list)
    improvement: StrictBool = False
    intermediate_steps: StrictBool = False
    role: StrictStr = "assistant"
    max_new_tokens: Annotated[int, BeforeValidator(integral), Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=sampling.MAX_TEMPERATURE)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    #: As on the OpenAI API: {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}.
    response_format: dict[str, Any] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    def turn(self, request_id: str) -> TurnRequest:
        """This request in the serving layer's terms: the history then the prompt, under the
        role's system prompt (the spec's rule); sampling the client left out is the server's."""
        history = tuple({"role": m.role, "content": m.content} for m in self.history)
        return TurnRequest(
            request_id=request_id,
            messages=(*history, {"role": "user", "content": self.prompt}),
            role=self.role,
            system_prompt_rule="spec",
            sampling=Sampling(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p),
            response_format=self.response_format,
            improvement=self.improvement,
            intermediate_steps=self.intermediate_steps,
        )


def _validation_error(exc: ValidationError) -> APIError:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
    if kind in ("model_type", "dict_type", "model_attributes_type") and not loc:
        return APIError(400, "request body must be a JSON object", code="invalid_body")
    if kind == "missing":
        return APIError(400, f"{loc} is required", param=loc, code="missing_field")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(400, f"{loc}: {message}" if loc else message, param=loc or None, code="invalid_value")


def parse_body(raw: bytes) -> ChatRequest:
    """Strictly parse a POST body; any problem -> 400 APIError naming the field."""
    if not raw.strip():
        raise APIError(400, "request body is empty: send a JSON object with at least a prompt", code="invalid_body")
    try:
        return ChatRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def query_bool(text: str, field: str) -> bool:
    """A boolean query value: only true/false/1/0 (any case); ``yes``, ``on``... are 400s."""
    value = {"true": True, "1": True, "false": False, "0": False}.get(text.strip().lower())
    if value is None:
        raise APIError(400, f"{field} must be a boolean: true or false (or 1 or 0)", param=field, code="invalid_value")
    return value


def parse_query(params: Mapping[str, str]) -> ChatRequest:
    """Parse GET query parameters (text): booleans/numbers converted, history as JSON text."""
    data: dict[str, Any] = {k: v for k, v in params.items() if k in ChatRequest.model_fields}
    for name in ("improvement", "intermediate_steps"):
        if name in data:
            data[name] = query_bool(data[name], name)
    if "history" in data:
        try:
            data["history"] = loads_query_json(data["history"], "history") if data["history"].strip() else []
        except json.JSONDecodeError:
            raise APIError(400, "history must be a JSON list of {role, content}", param="history") from None
    if "response_format" in data:
        try:
            data["response_format"] = loads_query_json(data["response_format"], "response_format")
        except json.JSONDecodeError:
            raise APIError(400, "response_format must be a JSON object", param="response_format") from None
    try:
        return ChatRequest.model_validate(data, strict=False)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def stream_error_line(exc: BaseException) -> str:
    """The final chunk of a stream that failed after it started: ``[[ERROR]] <message>``."""
    if isinstance(exc, (EngineError, ChatInputError)):
        text = str(exc) or type(exc).__name__
    else:
        text = "internal server error"
    return f"{ERROR_MARKER} {' '.join(text.split())}"


def blocking_body(result: Mapping[str, str], improvement: bool, intermediate_steps: bool) -> dict[str, str]:
    """``{"reply": ...}``, plus the improvement stages when intermediate steps were asked for."""
    body = {"reply": result.get("reply", "")}
    if improvement and intermediate_steps:
        for key in STAGE_KEYS:
            body[key] = result.get(key, "")
    return body
