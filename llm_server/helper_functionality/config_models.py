"""Config models: one pydantic model per YAML section, the single source of its keys, types and defaults.

``model_config.yaml``'s ``model`` (+ ``parameters``, ``optimizations``), ``server_config.yaml``'s
``server`` (+ ``limits``; its ``engine`` mapping is the engine's own section, validated by the
engine's :class:`~llm_server.engine.config.EngineConfig` where the server's settings are built,
since this bottom layer knows no engine) and ``azure_config.yaml``'s ``azure``. Every model
forbids unknown keys (a typo must not be silently ignored) and uses strict types (``true`` is not
a number, ``"8000"`` is not a port).

:func:`validate_section` turns pydantic's errors into :class:`ConfigError` naming the file and the
dotted key, as the loaders always have. Adding a section is one model here plus one entry in
:data:`SECTIONS` (which also feeds the README's reference table, see :func:`markdown_table`);
``yaml_loading.read_section`` reads and validates any of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import UnionType
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

#: model.generate keywords the Python API sets itself on each call: not allowed in ``parameters``.
PARAMETERS_SET_PER_CALL = ("inputs", "input_ids", "attention_mask", "streamer", "stopping_criteria")

#: The quantization modes ``model.optimizations.quantization`` accepts (None: full-precision weights).
Quantization = Literal["4bit", "int8", "int4", "auto"]
#: The weight-only quantizations the server's engine applies itself (CPU); ``initialize()`` marks
#: a model loaded with one of them with :data:`QUANTIZATION_ATTR`, which the engine reads.
RUNNER_QUANTIZATIONS = ("int8", "int4", "auto")
QUANTIZATION_ATTR = "llm_server_weight_quantization"

_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelParameters(BaseModel):
    """``model.parameters``: the generation defaults, defined here once.

    Every API reads them from this model: the shipped ``model_config.yaml`` restates them (a test
    checks it), the server's ``/chat`` and OpenAI APIs use them for what a request leaves out
    (``serving.sampling.sampling_defaults``), the engine's ``SamplingParams`` takes its defaults
    from :data:`GENERATION_DEFAULTS`, and the Python API passes them to ``model.generate``.
    ``top_k`` left unset is the engine's / the model's. Any other ``model.generate`` keyword
    (e.g. ``no_repeat_ngram_size``) is passed through to the Python API; the keywords it sets
    itself on each call are an error.
    """

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    max_new_tokens: int = Field(512, ge=1, description="new tokens per reply (server: capped by limits)")
    temperature: float = Field(0.7, ge=0, description="sampling temperature")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus sampling mass")
    top_k: int | None = Field(None, ge=0, description="top-k sampling (server: unless server.engine.top_k)")
    do_sample: bool = Field(True, description="false: greedy decoding, sampling settings ignored")
    repetition_penalty: float = Field(1.1, gt=0, description="1.0 = off")
    use_cache: bool | None = Field(None, description="KV cache in model.generate (Python API)")
    return_dict_in_generate: bool | None = Field(None, description="kept from the spec's example (Python API)")

    @model_validator(mode="after")
    def _no_per_call_keywords(self) -> ModelParameters:
        for key in PARAMETERS_SET_PER_CALL:
            if key in (self.model_extra or {}):
                raise PydanticCustomError(
                    "set_per_call", "is set by the Python API on each call; remove it", {"key": key}
                )
        return self


#: The generation defaults (what a request, or the Python API, gets when it says nothing).
GENERATION_DEFAULTS = ModelParameters()


class ModelOptimizations(BaseModel):
    """``model.optimizations``: how ``initialize()`` loads and runs the model."""

    model_config = _STRICT

    dtype: str = Field("auto", description="auto | float32 | bfloat16 | float16")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="auto: flash_attention_2 when installed and on CUDA, else sdpa"
    )
    compile: bool | Literal["auto"] = Field(False, description="torch.compile the forward; auto = on CUDA only")
    quantization: Quantization | None = Field(
        None,
        description='null | "int8" / "int4" (weight-only, CPU, server engine) | "auto" (int4 for decode steps of '
        'few sequences, the float weights above; CPU, server engine) | "4bit" (bitsandbytes NF4, CUDA)',
    )
    matmul_precision: Literal["highest", "high", "medium"] = Field(
        "high", description="torch.set_float32_matmul_precision"
    )


class ModelSection(BaseModel):
    """``model_config.yaml``'s ``model`` section."""

    model_config = _STRICT

    type: str = Field("llm", description="kept from the spec's format; not read")
    id: str | None = Field(None, description="hub id, local folder, .gguf file or embedded:...; empty = embedded")
    device: str | int = Field("auto", description="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ...")
    served_name: str | None = Field(None, description="name shown by /v1/models; empty = the id")
    parameters: ModelParameters = Field(default_factory=ModelParameters, description="generation defaults")
    optimizations: ModelOptimizations = Field(default_factory=ModelOptimizations, description="loading options")

    @property
    def display_name(self) -> str:
        """The name clients see: ``served_name``, else ``id``, else "model"."""
        return self.served_name or self.id or "model"

    def as_dict(self) -> dict[str, Any]:
        """The plain mapping the spec's ``load_model_config()`` returns (``parameters``: the keys the
        file sets; :meth:`generation_parameters` adds the defaults)."""
        data = self.model_dump(exclude={"parameters"})
        data["parameters"] = self.parameters.model_dump(exclude_unset=True, exclude_none=True)
        return data

    def generation_parameters(self) -> dict[str, Any]:
        """Every generation setting of this section: the file's, and the defaults for the rest."""
        return self.parameters.model_dump(exclude_none=True)


class ServerLimits(BaseModel):
    """``server.limits``: bounds on what a request may ask."""

    model_config = _STRICT

    max_new_tokens: int = Field(1024, ge=1, description="upper bound on any request's max_new_tokens / max_tokens")
    max_body_bytes: int = Field(1_048_576, ge=1, description="largest accepted request body")
    request_head_timeout_s: float = Field(
        30, gt=0, description="seconds a client has to send the request line and headers; then the connection closes")
    request_body_timeout_s: float = Field(
        30, gt=0, description="seconds a client has to send the whole request body; then 408 and close")


class ServerSection(BaseModel):
    """``server_config.yaml``'s ``server`` section (host / api_key as written: placeholders unresolved)."""

    model_config = _STRICT

    host: str = Field("0.0.0.0", description="env var name (CHAT_SERVER_HOST) or address; unset var -> 0.0.0.0")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    api_key: str | None = Field(None, description="env var name (CHAT_SERVER_API_KEY) or key; comma-separated keys")
    allow_query_api_key: bool = Field(True, description="accept ?x_api_key= on GET endpoints")
    open_access: bool = Field(False, description="explicit opt-out: serve with no key at all")
    metrics_require_key: bool = Field(False, description="whether /metrics needs a key")
    key_refresh_interval_s: float = Field(300, gt=0, description="Key Vault re-read interval")
    shutdown_timeout_s: float = Field(30, ge=0, description="grace period for running requests on shutdown")
    limits: ServerLimits = Field(default_factory=ServerLimits, description="request bounds")
    log_format: Literal["text", "json"] = Field(
        "text", description="server log: one escaped line a record (text) or one JSON object a line (json)")
    engine: dict[str, Any] = Field(
        default_factory=dict, description="continuous-batching engine: the server.engine keys below"
    )


class AzureSection(BaseModel):
    """``azure_config.yaml``'s ``azure`` section (placeholders unresolved)."""

    model_config = _STRICT

    key_vault_url: str | None = Field(None, description="env var name (KEYVAULT_URL) or URL; unset -> no Key Vault")
    api_key_secret_name: str | None = Field(
        None, description="env var name (API_KEY_SECRET_NAME) or secret name; unset -> no Key Vault"
    )


#: (YAML file, top-level section, its model): what the loaders validate and the README documents.
#: A new section (another top-level key of a file) is one model and one entry here.
SECTIONS: tuple[tuple[str, str, type[BaseModel]], ...] = (
    ("model_config.yaml", "model", ModelSection),
    ("server_config.yaml", "server", ServerSection),
    ("azure_config.yaml", "azure", AzureSection),
)


# --------------------------------------------------------------------------- validation

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file is missing, malformed, or holds a wrong value.

    ``file`` is the file's path and ``key`` the dotted key (None for whole-file problems).
    """

    def __init__(self, file: str | Path, key: str | None, problem: str) -> None:
        where = f"{file}" if key is None else f"{file}: key '{key}'"
        super().__init__(f"{where}: {problem}")
        self.file = str(file)
        self.key = key
        self.problem = problem


def validate_section(model: type[M], data: Mapping[str, Any], file: str | Path, prefix: str) -> M:
    """Validate one section; the first problem raises ConfigError naming ``prefix.key.sub``.

    A key set to null means "not set" (its default applies), as it always has.
    """
    try:
        return model.model_validate(_without_nulls(data))
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        path, owner = _field_path(model, error["loc"], error.get("ctx") or {})
        key = ".".join([prefix, *path])
        raise ConfigError(file, key, _problem(error, owner)) from None


def _without_nulls(data: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: _without_nulls(value) if isinstance(value, dict) else value
        for key, value in data.items()
        if value is not None
    }


def _field_path(
    model: type[BaseModel], loc: tuple[Any, ...], ctx: Mapping[str, Any]
) -> tuple[list[str], type[BaseModel]]:
    """The YAML key path of an error's ``loc`` (union-member tags dropped) and the model owning its last key."""
    path: list[str] = []
    owner: type[BaseModel] = model
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            break
        path.append(str(part))
        owner = current
        field = current.model_fields.get(str(part))
        current = _model_of(field.annotation) if field is not None else None
    if "key" in ctx:
        path.append(str(ctx["key"]))
    return path, owner


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside ``X``, ``X | None`` or ``Optional[X]``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, UnionType):
        for arg in get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None


def _problem(error: Mapping[str, Any], owner: type[BaseModel]) -> str:
    if error["type"] == "extra_forbidden":
        return f"unknown key (known: {', '.join(sorted(owner.model_fields))})"
    if error["type"] == "missing":
        return "missing"
    if "key" in (error.get("ctx") or {}):  # a check of the whole section that names its key
        return str(error["msg"])
    value = error.get("input")
    if error["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping, got {type(value).__name__} ({value!r})"
    return f"{error['msg']}, got {type(value).__name__} ({value!r})"


# --------------------------------------------------------------------------- README reference table


def _type_text(annotation: Any) -> str:
    """``int | None`` -> ``int or null``; ``Literal["a", "b"]`` -> ``"a" / "b"``."""
    if annotation is type(None):
        return "null"
    if get_origin(annotation) is Literal:
        return " / ".join(f'"{value}"' for value in get_args(annotation))
    if get_origin(annotation) in (Union, UnionType):
        return " or ".join(_type_text(arg) for arg in get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def _default_text(field: Any) -> str:
    if field.default_factory is not None:
        return "(section)"
    return "null" if field.default is None else repr(field.default).replace("'", '"').lower()


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        nested = _model_of(field.annotation)
        if nested is not None:
            rows.extend(_rows(nested, f"{prefix}.{name}"))
            continue
        rows.append(
            f"| `{prefix}.{name}` | {_type_text(field.annotation)} | `{_default_text(field)}` "
            f"| {(field.description or '').replace('|', '/')} |"
        )
    return rows


def markdown_table(nested: Sequence[tuple[str, type[BaseModel]]] = ()) -> str:
    """The README's config reference: every key of every section, its type, default and meaning.

    ``nested``: (dotted section, model) of sections a higher layer validates, e.g. the engine's
    ``server.engine`` (rows follow their file's own).
    """
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for file, section, model in SECTIONS:
        lines.append(f"| **{file}** `{section}:` | | | |")
        lines.extend(_rows(model, section))
        for prefix, inner in nested:
            if prefix.split(".")[0] == section:
                lines.extend(_rows(inner, prefix))
    return "\n".join(lines)


