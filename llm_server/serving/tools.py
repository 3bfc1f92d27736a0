"""Tool (function) calling for the serving layer: validate the tools, render them into the
prompt, constrain the reply when a call is required, and read calls back out of the text.

The model writes calls in the Hermes/Qwen convention, one per block::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Chat templates that render ``tools=`` themselves get them that way; templates that ignore
them (SmolLM2's) get the tools and this convention in a system message instead. With
``tool_choice`` ``required`` or a named function the reply is grammar-constrained to such
blocks (arguments valid against the function's schema), so it always parses; with ``auto`` the
model writes freely and text that is not a call stays text. No torch here: the grammar
library is imported when a constrained call is compiled.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from llm_server.serving.request import ChatInputError, Message

#: The most calls one constrained reply may hold with ``parallel_tool_calls``.
MAX_PARALLEL_CALLS = 4
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def as_openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


@dataclass(frozen=True)
class ToolSet:
    """The request's tools and how they may be used (``choice``: auto, required or a tool name)."""

    tools: tuple[Tool, ...]
    choice: str
    parallel: bool

    @property
    def constrained(self) -> bool:
        return self.choice != "auto"

    @property
    def max_calls(self) -> int:
        """A named function is called exactly once; ``parallel_tool_calls: false`` allows one."""
        return MAX_PARALLEL_CALLS if self.parallel and self.choice in ("auto", "required") else 1

    def callable_tools(self) -> tuple[Tool, ...]:
        if self.choice in ("auto", "required"):
            return self.tools
        return tuple(t for t in self.tools if t.name == self.choice)


def parse_tools(tools: Any, tool_choice: Any, parallel: Any) -> ToolSet | None:
    """Validate ``tools`` / ``tool_choice`` / ``parallel_tool_calls``; None when no tool may be called."""
    if tools is None or tool_choice == "none":
        if tool_choice not in (None, "none", "auto"):
            raise ChatInputError("tool_choice needs tools", param="tool_choice", code="invalid_value")
        return None
    if not isinstance(tools, list) or not tools:
        raise ChatInputError("tools must be a non-empty list", param="tools", code="invalid_value")
    parsed = tuple(_tool(i, t) for i, t in enumerate(tools))
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise ChatInputError("tool names must be unique", param="tools", code="invalid_value")
    choice = _choice(tool_choice, names)
    return ToolSet(parsed, choice, parallel is not False)


def _tool(index: int, tool: Any) -> Tool:
    where = f"tools.{index}"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(
            tool.get("function"), dict):
        raise ChatInputError(f"{where} must be {{'type': 'function', 'function': {{...}}}}", param=where,
                             code="invalid_value")
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ChatInputError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-'",
                             param=f"{where}.function.name", code="invalid_value")
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise ChatInputError(f"{where}.function.parameters must be a JSON schema object",
                             param=f"{where}.function.parameters", code="invalid_value")
    return Tool(name, str(function.get("description") or ""), parameters)


def _choice(tool_choice: Any, names: list[str]) -> str:
    if tool_choice in (None, "auto", "required"):
        return tool_choice or "auto"
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name in names:
            return str(name)
        raise ChatInputError(f"tool_choice names the function {name!r}, which is not in tools "
                             f"({', '.join(names)})", param="tool_choice", code="unknown_tool")
    raise ChatInputError("tool_choice must be none, auto, required or {'type': 'function', 'function': "
                         "{'name': ...}}", param="tool_choice", code="invalid_value")


# --- prompt ----------------------------------------------------------------------------------
def tools_system_text(toolset: ToolSet) -> str:
    """The system-message rendering of the tools, for templates that ignore ``tools=``."""
    lines = [json.dumps(t.as_openai()["function"], ensure_ascii=False) for t in toolset.tools]
    return (
        "You can call these functions:\n<tools>\n" + "\n".join(lines) + "\n</tools>\n"
        "To call a function, reply with only a JSON object inside tags, like this:\n"
        '<tool_call>\n{"name": "<function name>", "arguments": {<its arguments>}}\n</tool_call>\n'
        "Otherwise, answer normally."
    )


def with_tools_prompt(messages: list[Message], toolset: ToolSet) -> list[Message]:
    """``messages`` with the tools described in the system message (added when there is none)."""
    text = tools_system_text(toolset)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def call_text(name: str, arguments: Any) -> str:
    """One call as the model writes it (assistant tool calls in the history are rendered so)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


# --- grammar ---------------------------------------------------------------------------------
def call_grammar_text(toolset: ToolSet) -> str:
    """Lark grammar (llguidance dialect) for one call, or up to MAX_PARALLEL_CALLS calls."""
    options = [
        {"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
         "required": ["name", "arguments"], "additionalProperties": False}
        for t in toolset.callable_tools()
    ]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    schema = {**schema, "x-guidance": _JSON_STYLE}
    repeat = f' ("\\n" call){{0,{toolset.max_calls - 1}}}' if toolset.max_calls > 1 else ""
    return f'start: call{repeat}\ncall: "<tool_call>\\n" %json {json.dumps(schema)} "\\n</tool_call>"\n'


def call_grammar(tokenizer: Any, toolset: ToolSet) -> Any:
    """The compiled grammar of a required/named call; ChatInputError for unusable parameter schemas."""
    try:
        from llm_server.engine.constraints import GrammarError, compiler_for
    except ImportError as exc:
        raise ChatInputError("tool_choice required/named needs the grammar extra (pip install "
                             "'llm_server[grammar]')", param="tool_choice", code="unsupported_value") from exc
    try:
        return compiler_for(tokenizer).lark(call_grammar_text(toolset), "tool call")
    except GrammarError as exc:
        raise ChatInputError(f"tools: a function's parameters cannot be compiled: {exc}", param="tools",
                             code="invalid_schema") from exc


# --- reading calls back ----------------------------------------------------------------------
def parse_calls(text: str, toolset: ToolSet) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a reply: calls in ``<tool_call>`` blocks (or a bare call object) whose
    name is a known tool, at most ``toolset.max_calls`` of them (the first); with no valid call,
    the whole text is the content."""
    names = {t.name for t in toolset.callable_tools()}
    blocks = _CALL_BLOCK.findall(text) if "<tool_call>" in text else [text.strip()]
    calls = [call for call in (_call(block, names) for block in blocks) if call is not None][: toolset.max_calls]
    if not calls:
        return text, []
    content = _CALL_BLOCK.sub("", text).strip() if "<tool_call>" in text else ""
    return content or None, calls


def _call(block: str, names: set[str]) -> ToolCall | None:
    try:
        value = json.loads(block)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", value["name"], json.dumps(arguments, ensure_ascii=False))
