"""Structured output, checked at both ends: a schema must have a finite instance before any token
is generated, and a constrained answer that ends "stop" must be an instance of its schema.

Before generation, :func:`uninhabited_reason` finds schemas no finite JSON document satisfies:
a required property (or a non-empty array's items) that can only be satisfied through a ``$ref``
back to itself (``{"properties": {"a": {"$ref": "#"}}, "required": ["a"]}``, ``{"$ref": "#"}``),
a required property that ``additionalProperties: false`` forbids, ``false`` schemas. The grammar
engine would accept such a schema and then produce a prefix that can never be completed (``{"``
and ``stop``), so they are 400s naming the reason. The search is exact for the keywords it
knows (a finite instance has a derivation in which no ``$ref`` repeats on a path) and
permissive for the rest (``not``, ``if``, non-local refs: assumed satisfiable, left to the engine).

After generation, :func:`check_instance` is the last line: if the grammar matcher ever failed
mid-generation (and ended the sequence with a forced end-of-sequence), the text is not an
instance, and the stream ends with :class:`StructuredOutputFailed` (an in-band error in the
protocol's format, never ``finish_reason: "stop"``).
"""

from __future__ import annotations

import json
from typing import Any

from llm_server.engine.types import EngineError

#: Schema nodes the satisfiability search visits at most (beyond: assumed satisfiable).
MAX_VISITS = 20_000
_OBJECT_KEYS = ("properties", "required", "additionalProperties", "patternProperties", "minProperties")
_ARRAY_KEYS = ("items", "prefixItems", "minItems")


class StructuredOutputFailed(EngineError):
    """A constrained generation that stopped without a valid instance of its schema."""


class _Budget:
    def __init__(self) -> None:
        self.left = MAX_VISITS


def _resolve(root: Any, ref: str) -> Any:
    """The subschema a local ``$ref`` ("#", "#/properties/a", "#/$defs/x") points at; None if unknown."""
    if not ref.startswith("#"):
        return None
    node = root
    for raw in [p for p in ref[1:].split("/") if p]:
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _types(schema: dict[str, Any]) -> list[str]:
    declared = schema.get("type")
    if isinstance(declared, str):
        return [declared]
    if isinstance(declared, list):
        return [t for t in declared if isinstance(t, str)]
    if any(k in schema for k in _OBJECT_KEYS):
        return ["object"]
    if any(k in schema for k in _ARRAY_KEYS):
        return ["array"]
    return ["any"]


class _Search:
    """Depth-first search for a finite instance; ``refs`` are the ``$ref`` targets on the current path."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.budget = _Budget()

    def ok(self, schema: Any, refs: frozenset[str]) -> bool:
        self.budget.left -= 1
        if self.budget.left < 0 or schema is True or schema is None:
            return True
        if schema is False:
            return False
        if not isinstance(schema, dict):
            return True
        ref = schema.get("$ref")
        if isinstance(ref, str):
            if ref in refs:
                return False  # a derivation that repeats a ref is never the shortest one
            target = _resolve(self.root, ref)
            if target is not None and not self.ok(target, refs | {ref}):
                return False
        if "enum" in schema or "const" in schema:
            return True
        all_of = schema.get("allOf")
        if isinstance(all_of, list) and not all(self.ok(s, refs) for s in all_of):
            return False
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches and not any(self.ok(s, refs) for s in branches):
                return False
        kinds = _types(schema)
        return not kinds or any(self._type_ok(t, schema, refs) for t in kinds)

    def _type_ok(self, kind: str, schema: dict[str, Any], refs: frozenset[str]) -> bool:
        if kind == "object":
            properties: dict[str, Any] = _of(schema, "properties", dict)
            extra = schema.get("additionalProperties", True)
            required: list[Any] = _of(schema, "required", list)
            return all(self.ok(properties[name] if name in properties else extra, refs)
                       for name in required if isinstance(name, str))
        if kind == "array":
            min_items = schema.get("minItems", 0)
            min_items = min_items if isinstance(min_items, int) else 0
            prefix: list[Any] = _of(schema, "prefixItems", list)
            if not all(self.ok(s, refs) for s in prefix[:min_items]):
                return False
            if min_items > len(prefix):
                return self.ok(schema.get("items", True), refs)
        return True


def _of(schema: dict[str, Any], key: str, kind: type) -> Any:
    """``schema[key]`` when it is a ``kind`` (dict / list), else an empty one."""
    value = schema.get(key)
    return value if isinstance(value, kind) else kind()


def uninhabited_reason(schema: Any) -> str | None:
    """Why no finite JSON document satisfies ``schema`` (None: one may; see the module docstring)."""
    if schema is False:
        return "the schema is false: nothing is valid against it"
    if not _Search(schema).ok(schema, frozenset()):
        return ("no finite JSON document is valid against this schema: every valid instance must contain "
                "itself (a required property or array item that can only be satisfied through a $ref back "
                "to an enclosing schema), or a required property is forbidden")
    return None


def check_instance(text: str, schema: Any) -> None:
    """Raise :class:`StructuredOutputFailed` unless ``text`` is a JSON instance of ``schema``."""
    try:
        value = json.loads(text)
    except ValueError:
        raise StructuredOutputFailed("the structured output stopped before it was complete JSON "
                                     "(the grammar matcher failed during generation)") from None
    try:
        import jsonschema
    except ImportError:  # the JSON parse is the check then
        return
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        raise StructuredOutputFailed(f"the structured output is not valid against the schema: {exc.message}") from None
    except jsonschema.SchemaError:  # a schema the grammar engine took but the validator does not: trust the grammar
        return
