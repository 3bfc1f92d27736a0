"""The bad inputs of ``make probe`` (and of ``make fuzz``'s fixed corpus): one :class:`Case` per request.

Built as payloads x the fields that carry them, plus hand-written cases (methods, headers,
schemas, bodies that are not JSON). Every field that reaches the log or the tokenizer gets the
hostile text payloads; a case's name says what it sends. At least 200 cases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode

MODEL = "SmolLM2-135M-Instruct"  # the embedded model's served name; a wrong one is a 404 (also a case)


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


#: JSON-escaped text payloads (written into JSON string literals as they are).
TEXT_PAYLOADS = {
    "lone high surrogate": "\\ud800",
    "lone low surrogate": "\\udfff",
    "two high surrogates": "\\ud800\\ud800",
    "surrogate at the end": "abc\\udbff",
    "CRLF + forged CRITICAL line": "x\\r\\n2026-12-06 05:00:00,000 CRITICAL llm_server [-] forged",
    "LF + forged line": "x\\n2026-12-06 05:00:00,000 ERROR root [-] forged",
    "ANSI escapes": "\\u001b[31mred\\u001b[0m\\u001b[2J",
    "NUL and BEL": "a\\u0000b\\u0007c",
    "U+2028 line separator": "a\\u2028b\\u2029c",
    "backspaces": "abc\\b\\b\\bxyz",
}
#: Whole JSON values (wrong types, extremes) for typed fields.
VALUE_PAYLOADS = {
    "null": "null",
    "number": "12345",
    "huge number": "1e400",
    "negative": "-1",
    "boolean": "true",
    "empty array": "[]",
    "object": '{"a": 1}',
    "deep array": "[" * 100 + "]" * 100,
    "very deep array": "[" * 100_000 + "]" * 100_000,
    "deep object": '{"a":' * 200 + "1" + "}" * 200,
    "very deep object": '{"a":' * 5000 + "1" + "}" * 5000,
}


def _chat(content: str = "hi", role: str = "user", model: str = MODEL, extra: str = "") -> bytes:
    return (f'{{"model": "{model}", "messages": [{{"role": "{role}", "content": "{content}"}}]{extra}, '
            '"max_tokens": 4}').encode()


def _text_field_cases() -> list[Case]:
    cases = []
    for label, text in TEXT_PAYLOADS.items():
        cases += [
            Case(f"chat content: {label}", "POST", "/v1/chat/completions", _chat(content=text)),
            Case(f"chat model: {label}", "POST", "/v1/chat/completions", _chat(model=text)),
            Case(f"chat role: {label}", "POST", "/v1/chat/completions", _chat(role=text)),
            Case(f"chat stop: {label}", "POST", "/v1/chat/completions", _chat(extra=f', "stop": ["{text}"]')),
            Case(f"chat user: {label}", "POST", "/v1/chat/completions", _chat(extra=f', "user": "{text}"')),
            Case(f"completion prompt: {label}", "POST", "/v1/completions",
                 f'{{"model": "{MODEL}", "prompt": "{text}", "max_tokens": 4}}'.encode()),
            Case(f"spec prompt: {label}", "POST", "/chat/blocking",
                 f'{{"prompt": "{text}", "max_new_tokens": 4}}'.encode()),
            Case(f"spec history: {label}", "POST", "/chat/stream",
                 f'{{"prompt": "hi", "max_new_tokens": 4, "history": [{{"role": "user", "content": "{text}"}}]}}'
                 .encode()),
            Case(f"spec role: {label}", "POST", "/chat/blocking", f'{{"prompt": "hi", "role": "{text}"}}'.encode()),
            Case(f"GET history: {label}", "GET", "/chat/blocking?" + urlencode(
                {"prompt": "hi", "max_new_tokens": 4, "history": f'[{{"role": "user", "content": "{text}"}}]'})),
            Case(f"GET prompt (decoded): {label}", "GET", "/chat/stream?" + urlencode(
                {"prompt": json.loads(f'"{text}"').encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
                 "max_new_tokens": 4})),
            Case(f"path: {label}", "GET", "/" + quote(json.loads(f'"{text}"').encode("utf-8", "surrogatepass"))),
            Case(f"model path: {label}", "GET", "/v1/models/" + quote(
                json.loads(f'"{text}"').encode("utf-8", "surrogatepass"))),
        ]
    return cases


def _value_cases() -> list[Case]:
    cases = []
    for label, value in VALUE_PAYLOADS.items():
        cases += [
            Case(f"chat messages = {label}", "POST", "/v1/chat/completions",
                 f'{{"model": "{MODEL}", "messages": {value}}}'.encode()),
            Case(f"chat temperature = {label}", "POST", "/v1/chat/completions",
                 _chat(extra=f', "temperature": {value}')),
            Case(f"chat stop = {label}", "POST", "/v1/chat/completions", _chat(extra=f', "stop": {value}')),
            Case(f"chat response_format = {label}", "POST", "/v1/chat/completions",
                 _chat(extra=f', "response_format": {value}')),
            Case(f"completion prompt = {label}", "POST", "/v1/completions",
                 f'{{"model": "{MODEL}", "prompt": {value}}}'.encode()),
            Case(f"spec max_new_tokens = {label}", "POST", "/chat/blocking",
                 f'{{"prompt": "hi", "max_new_tokens": {value}}}'.encode()),
            Case(f"spec history = {label}", "POST", "/chat/blocking",
                 f'{{"prompt": "hi", "history": {value}}}'.encode()),
        ]
        if len(value) < 10_000:  # longer is over every client's URL limit (the query bound has its own case)
            cases += [
                Case(f"GET history = {label}", "GET",
                     "/chat/blocking?" + urlencode({"prompt": "hi", "history": value})),
                Case(f"GET response_format = {label}", "GET", "/chat/stream?" + urlencode(
                    {"prompt": "hi", "response_format": value})),
            ]
    return cases


IMPOSSIBLE_SCHEMAS = {
    "self-required ($ref #)": {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    "self-required ($ref to itself)": {"type": "object", "properties": {"a": {"$ref": "#/properties/a"}},
                                       "required": ["a"]},
    "bare $ref #": {"$ref": "#"},
    "mutual $defs": {"$defs": {"x": {"$ref": "#/$defs/y"}, "y": {"$ref": "#/$defs/x"}}, "$ref": "#/$defs/x"},
    "required but forbidden": {"type": "object", "required": ["b"], "additionalProperties": False},
    "false property required": {"type": "object", "properties": {"a": False}, "required": ["a"]},
    "non-empty array of itself": {"type": "array", "minItems": 1, "items": {"$ref": "#"}},
    "minLength > maxLength": {"type": "string", "minLength": 5, "maxLength": 2},
    "unknown type": {"type": "foo"},
    "bad regex": {"type": "string", "pattern": "(("},
    "ref to nowhere": {"$ref": "#/nowhere"},
    "schema is a list": [1, 2],
}


def _schema_cases() -> list[Case]:
    cases = []
    for label, schema in IMPOSSIBLE_SCHEMAS.items():
        fmt = json.dumps({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        cases += [
            Case(f"schema: {label}", "POST", "/v1/chat/completions", _chat(extra=f', "response_format": {fmt}')),
            Case(f"schema (completions): {label}", "POST", "/v1/completions",
                 f'{{"model": "{MODEL}", "prompt": "hi", "max_tokens": 4, "response_format": {fmt}}}'.encode()),
            Case(f"schema (spec): {label}", "POST", "/chat/blocking",
                 f'{{"prompt": "hi", "max_new_tokens": 4, "response_format": {fmt}}}'.encode()),
        ]
    return cases


def _other_cases() -> list[Case]:
    stops = json.dumps([f"s{i}" for i in range(17)])
    history_assistant = '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]'
    cases = [
        Case("17 stop strings", "POST", "/v1/chat/completions", _chat(extra=f', "stop": {stops}')),
        Case("17 stop strings (completions)", "POST", "/v1/completions",
             f'{{"model": "{MODEL}", "prompt": "hi", "stop": {stops}}}'.encode()),
        Case("improvement, last message the assistant's", "POST", "/v1/chat/completions",
             f'{{"model": "{MODEL}", "improvement": true, "messages": {history_assistant}}}'.encode()),
        Case("repeated key (spec)", "POST", "/chat/blocking", b'{"prompt": "a", "prompt": "b", "max_new_tokens": 4}'),
        Case("repeated key (chat)", "POST", "/v1/chat/completions", _chat(extra=', "max_tokens": 2')),
        Case("not JSON", "POST", "/v1/chat/completions", b"hello"),
        Case("truncated JSON", "POST", "/chat/blocking", b'{"prompt": "hi'),
        Case("trailing comma", "POST", "/chat/blocking", b'{"prompt": "hi",}'),
        Case("NaN", "POST", "/v1/chat/completions", _chat(extra=', "temperature": NaN')),
        Case("Infinity", "POST", "/chat/blocking", b'{"prompt": "hi", "temperature": Infinity}'),
        Case("invalid UTF-8 bytes", "POST", "/v1/chat/completions",
             _chat(content="\xff").replace(b"\xc3\xbf", b"\xff")),
        Case("UTF-8 BOM", "POST", "/chat/blocking", b'\xef\xbb\xbf{"prompt": "hi"}'),
        Case("UTF-16 body", "POST", "/chat/blocking", '{"prompt": "hi"}'.encode("utf-16")),
        Case("empty body", "POST", "/chat/blocking", b""),
        Case("JSON array body", "POST", "/v1/completions", b"[]"),
        Case("JSON string body", "POST", "/chat/blocking", b'"hi"'),
        Case("form content type", "POST", "/v1/chat/completions", b"a=1",
             {"Content-Type": "application/x-www-form-urlencoded"}),
        Case("text content type", "POST", "/chat/blocking", b'{"prompt": "hi"}', {"Content-Type": "text/plain"}),
        Case("body over the size limit", "POST", "/chat/blocking", b'{"prompt": "' + b"x" * 1_100_000 + b'"}'),
        Case("GET improvement=yes", "GET", "/chat/blocking?prompt=hi&improvement=yes"),
        Case("GET improvement=2", "GET", "/chat/blocking?prompt=hi&improvement=2"),
        Case("GET intermediate_steps=on", "GET", "/chat/stream?prompt=hi&intermediate_steps=on"),
        Case("GET max_new_tokens=many", "GET", "/chat/blocking?prompt=hi&max_new_tokens=many"),
        Case("GET temperature=nan", "GET", "/chat/blocking?prompt=hi&temperature=nan"),
        Case("GET query over 32 KiB", "GET", "/chat/blocking?prompt=" + "x" * 40_000),
        Case("GET 200 parameters", "GET", "/chat/blocking?prompt=hi&" + "&".join(f"p{i}=1" for i in range(200))),
        Case("GET history not JSON", "GET", "/chat/blocking?prompt=hi&history=%5B%7Boops"),
        Case("GET percent-encoded NUL", "GET", "/chat/blocking?prompt=a%00b&max_new_tokens=4"),
        Case("HEAD /v1/models", "HEAD", "/v1/models"),
        Case("HEAD /ping", "HEAD", "/ping"),
        Case("DELETE /chat/blocking", "DELETE", "/chat/blocking"),
        Case("PUT /v1/chat/completions", "PUT", "/v1/chat/completions", b"{}"),
        Case("OPTIONS /nowhere", "OPTIONS", "/nowhere"),
        Case("unknown model", "POST", "/v1/chat/completions", _chat(model="no-such-model")),
        Case("n = 2", "POST", "/v1/chat/completions", _chat(extra=', "n": 2')),
        Case("max_tokens = 10^9", "POST", "/v1/chat/completions", _chat(extra=', "max_tokens": 1000000000')),
        Case("seed = 2^70", "POST", "/v1/chat/completions", _chat(extra=', "seed": 1180591620717411303424')),
        Case("logprobs 99", "POST", "/v1/chat/completions", _chat(extra=', "logprobs": true, "top_logprobs": 99')),
        Case("tool with bad schema", "POST", "/v1/chat/completions", _chat(
            extra=', "tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#"}}}]')),
        Case("empty messages", "POST", "/v1/chat/completions", f'{{"model": "{MODEL}", "messages": []}}'.encode()),
        Case("blank prompt", "POST", "/chat/blocking", b'{"prompt": "   "}'),
        Case("bad history role", "POST", "/chat/blocking",
             b'{"prompt": "hi", "history": [{"role": "bot", "content": "x"}]}'),
        Case("request id with a tab", "GET", "/ping", None, {"X-Request-Id": "a\tb"}),
        Case("request id 300 chars", "GET", "/ping", None, {"X-Request-Id": "a" * 300}),
        Case("wrong API key", "GET", "/v1/models", None, {"X-API-Key": "wrong-key"}),
        Case("encoded CRLF in path", "GET", "/x%0D%0A2026-12-06%2005:00:00,000%20CRITICAL%20forged"),
        Case("dot-dot path", "GET", "/static/../../etc/passwd"),
    ]
    return cases


def _response(extra: str) -> bytes:
    return f'{{"model": "{MODEL}"{extra}}}'.encode()


def _message(extra: str, max_tokens: str = ', "max_tokens": 8') -> bytes:
    return f'{{"model": "{MODEL}"{max_tokens}, "messages": [{{"role": "user", "content": "hi"}}]{extra}}}'.encode()


def _protocol_cases() -> list[Case]:
    """The Responses and Messages APIs (issue 23): wrong types, unknown items, refused parameters."""
    r, m = "/v1/responses", "/v1/messages"
    return [
        Case("responses: input a number", "POST", r, _response(', "input": 42')),
        Case("responses: unknown item type", "POST", r, _response(', "input": [{"type": "computer_call", "id": "x"}]')),
        Case("responses: image part", "POST", r, _response(
            ', "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]')),
        Case("responses: web_search tool", "POST", r, _response(', "input": "hi", "tools": [{"type": "web_search"}]')),
        Case("responses: reasoning effort", "POST", r, _response(', "input": "hi", "reasoning": {"effort": "high"}')),
        Case("responses: background", "POST", r, _response(', "input": "hi", "background": true')),
        Case("responses: oversized input", "POST", r, _response(', "input": "' + "word " * 20_000 + '"')),
        Case("responses: unknown previous_response_id", "POST", r,
             _response(', "input": "hi", "previous_response_id": "resp_nope"')),
        Case("responses: GET unknown id", "GET", f"{r}/resp_nope"),
        Case("responses: DELETE unknown id", "DELETE", f"{r}/resp_nope"),
        Case("responses: text.format xml", "POST", r,
             _response(', "input": "hi", "text": {"format": {"type": "xml"}}')),
        Case("messages: max_tokens missing", "POST", m, _message("", max_tokens="")),
        Case("messages: max_tokens a string", "POST", m, _message("", max_tokens=', "max_tokens": "8"')),
        Case("messages: image block", "POST", m, f'{{"model": "{MODEL}", "max_tokens": 8, "messages": [{{"role": '
             '"user", "content": [{"type": "image", "source": {}}]}]}'.encode()),
        Case("messages: system role in messages", "POST", m, f'{{"model": "{MODEL}", "max_tokens": 8, '
             '"messages": [{"role": "system", "content": "x"}]}'.encode()),
        Case("messages: thinking", "POST", m, _message(', "thinking": {"type": "enabled", "budget_tokens": 1024}')),
        Case("messages: top_k", "POST", m, _message(', "top_k": 5')),
        Case("messages: not JSON", "POST", m, b"{nope"),
        Case("messages: count_tokens without messages", "POST", f"{m}/count_tokens", _response("")),
    ]


CASES: list[Case] = [*_text_field_cases(), *_value_cases(), *_schema_cases(), *_other_cases(), *_protocol_cases()]
