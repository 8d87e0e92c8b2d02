"""Request checks that need no model and no tokenizer: text that is not valid Unicode, tool and response schemas that
are not JSON schemas, and conversations whose tool turns answer no call. Each failure is a `ServeError` (400) that
names the field (`messages[2].tool_call_id`, `tools[0].function.parameters.properties.city.type`) and says what to
change; the API modules render it in their own error format.

Every check is a plain function over the parsed request, so any endpoint (chat, messages, count_tokens, responses)
calls the same ones. Costs: `check_text` is linear in the body (a C-speed scan per string, ASCII strings are skipped
in O(1)); the others are linear in the messages and schemas, not in the message text.

Deliberately not here: size limits (limits.py), the V4 chat format's own rules (chat/encoding.py), and whether a
valid schema is one the grammar compiler supports (chat/constraint.py; its error is passed through with the field).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from typing import Any

from dsv4.serve.core import ServeError

# Encoding in slices keeps the scan's extra memory at a few MB whatever the body holds.
_SCAN_CHARS = 1 << 20
_MAX_DETAIL = 300  # characters of a library message quoted in an error (a schema can be large)


def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _bad_char(s: str) -> int | None:
    """Index of the first lone surrogate in `s`, or None. ASCII strings (the usual case) cost O(1)."""
    if s.isascii():
        return None
    for start in range(0, len(s), _SCAN_CHARS):
        try:
            # strict UTF-16 refuses exactly the lone surrogates (a str holds pairs as one code point)
            s[start : start + _SCAN_CHARS].encode("utf-16-le")
        except UnicodeEncodeError as e:
            return start + e.start
    return None


def check_text(body: Any, root: str = "") -> None:
    """Refuse strings (values or keys) holding a lone UTF-16 surrogate such as `\\ud800`: JSON can spell one, but it
    is not a character, so it can be neither tokenized nor written back as UTF-8. Iterative, so a deeply nested body
    cannot exhaust the stack."""
    stack: list[tuple[str, Any]] = [(root, body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            at = _bad_char(value)
            if at is not None:
                where = path or "body"
                raise ServeError(
                    "invalid_request",
                    f"{where}: the text holds a lone UTF-16 surrogate (U+{ord(value[at]):04X} at character {at}), "
                    "which is not valid Unicode; send well-formed UTF-8 (write a pair such as \\ud83d\\ude00 or drop "
                    "the escape).",
                    param=where,
                )
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(k, str) and _bad_char(k) is not None:
                    raise ServeError("invalid_request", f"{path or 'body'}: a field name holds a lone UTF-16 "
                                     "surrogate, which is not valid Unicode; send well-formed UTF-8.",
                                     param=path or "body")
                stack.append((_join(path, k), v))
        elif isinstance(value, list):
            stack.extend((_join(path, i), v) for i, v in enumerate(value))


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_DETAIL else text[:_MAX_DETAIL] + "..."


def check_json_schema(schema: Any, where: str, *, object_root: bool) -> None:
    """`schema` must be a valid JSON Schema (checked against its draft's metaschema; 2020-12 when it names none).
    With `object_root` (tool parameters) the root must describe an object, as both APIs require."""
    if not isinstance(schema, dict):
        raise ServeError("invalid_request", f"{where}: a JSON Schema must be an object, got {type(schema).__name__}.",
                         param=where)
    if object_root and schema.get("type", "object") != "object":
        raise ServeError("invalid_request", f"{where}.type: tool parameters must be a JSON Schema of type \"object\", "
                         f"got {schema.get('type')!r}; wrap the value in an object property.", param=f"{where}.type")
    # Agents send the same tools on every turn: the metaschema check runs once per distinct schema.
    found = _first_error(json.dumps(schema, sort_keys=True, ensure_ascii=False))
    if found is not None:
        path, message = found
        at = where
        for key in path:
            at = _join(at, key)
        raise ServeError("invalid_request", f"{at}: invalid JSON Schema: {_clip(message)}. Fix this part of the "
                         "schema (see https://json-schema.org/draft/2020-12).", param=at)


@functools.lru_cache(maxsize=256)
def _first_error(schema_json: str) -> tuple[tuple[Any, ...], str] | None:
    """(path in the schema, message) of the most specific metaschema violation, or None for a valid schema."""
    import jsonschema

    schema = json.loads(schema_json)
    if not isinstance(schema.get("$schema", ""), str):
        return ("$schema",), f"{schema['$schema']!r} is not a metaschema URI (a string)"
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    # The deepest error names the part to fix (best_match prefers shallow ones, which say "not valid under anyOf").
    # NOTE: no format checker: it would test `pattern` with Python's `re`, not JSON Schema's ECMA-262 dialect, and
    # refuse valid patterns such as \p{L}; the grammar compiler reports the patterns it cannot use.
    errors = sorted(cls(cls.META_SCHEMA).iter_errors(schema), key=lambda e: -len(e.absolute_path))
    if errors:
        return tuple(errors[0].absolute_path), errors[0].message
    return _unresolved_ref(schema)


def _unresolved_ref(schema: dict[str, Any]) -> tuple[tuple[Any, ...], str] | None:
    """The first `$ref` that does not point inside the schema itself (the grammar compiler fetches nothing)."""
    stack: list[tuple[tuple[Any, ...], Any]] = [((), schema)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                if not ref.startswith("#"):
                    return path + ("$ref",), f"{ref!r} is not a local reference; only '#/...' references are " \
                        "supported: inline the referenced schema under $defs"
                target: Any = schema
                for part in filter(None, ref[1:].split("/")):
                    part = part.replace("~1", "/").replace("~0", "~")
                    if isinstance(target, dict) and part in target:
                        target = target[part]
                    elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                        target = target[int(part)]
                    else:
                        return path + ("$ref",), f"{ref!r} points to nothing in this schema"
            stack.extend((path + (k,), v) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((path + (i,), v) for i, v in enumerate(node))
    return None


def check_tool_order(messages: Iterable[tuple[str, str, Any]]) -> None:
    """Every tool result must answer a call of the assistant turn right before it. `messages` yields, per message,
    (field path, role, detail): for "assistant" detail = the ids of its tool calls (None for a call without an id),
    for "tool" the `tool_call_id` it answers; other roles end the run of results."""
    open_calls: list[Any] | None = None  # ids of the latest assistant turn's calls, while its results may follow
    for where, role, detail in messages:
        if role == "assistant":
            open_calls = list(detail) if detail else None
        elif role == "tool":
            if open_calls is None:
                raise ServeError(
                    "invalid_request",
                    f"{where}: a tool result must follow the assistant turn whose tool call it answers, and no "
                    "assistant turn with tool calls precedes it here; put the assistant message with `tool_calls` "
                    "(Anthropic: `tool_use` blocks) right before its results, or send the result as user text.",
                    param=where,
                )
            # a call sent without an id can be answered by any id (the server numbered it)
            if detail not in open_calls and None not in open_calls:
                ids = ", ".join(repr(i) for i in open_calls)
                raise ServeError("invalid_request", f"{where}: {detail!r} matches no tool call of the preceding "
                                 f"assistant turn (its calls: {ids}); answer one of those ids.", param=where)
        else:
            open_calls = None


def check_openai_chat(req: Any) -> None:
    """OpenAI chat: tool parameter schemas, a json_schema response format, and tool messages in call order."""
    for i, tool in enumerate(req.tools or []):
        if tool.function.parameters is not None:
            check_json_schema(tool.function.parameters, f"tools[{i}].function.parameters", object_root=True)
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None \
            and fmt.json_schema.schema_ is not None:
        check_json_schema(fmt.json_schema.schema_, "response_format.json_schema.schema", object_root=False)

    def turns() -> Iterable[tuple[str, str, Any]]:
        for i, m in enumerate(req.messages):
            if m.role == "assistant":
                yield f"messages[{i}]", "assistant", [tc.id for tc in m.tool_calls or []]
            elif m.role == "tool":
                yield f"messages[{i}].tool_call_id", "tool", m.tool_call_id
            else:
                yield f"messages[{i}]", m.role, None

    check_tool_order(turns())


def check_anthropic_messages(req: Any) -> None:
    """Anthropic messages / count_tokens: tool input schemas, and `tool_result` blocks answering the `tool_use`
    blocks of the assistant message right before them."""
    for i, tool in enumerate(req.tools or []):
        if tool.input_schema is not None:
            check_json_schema(tool.input_schema, f"tools[{i}].input_schema", object_root=True)

    def turns() -> Iterable[tuple[str, str, Any]]:
        for i, m in enumerate(req.messages):
            blocks = [] if isinstance(m.content, str) else m.content
            if m.role == "assistant":
                yield f"messages[{i}]", "assistant", [b.id for b in blocks if b.type == "tool_use"]
                continue
            results = [(j, b) for j, b in enumerate(blocks) if b.type == "tool_result"]
            for j, b in results:
                yield f"messages[{i}].content[{j}].tool_use_id", "tool", b.tool_use_id
            yield f"messages[{i}]", "user", None

    check_tool_order(turns())


def check_responses(req: Any, messages: list[dict[str, Any]]) -> None:
    """OpenAI Responses: function tool schemas, a json_schema text format, and function_call_output items answering
    the function_call items right before them (`messages`: the input translated into chat messages)."""
    for i, tool in enumerate(req.tools or []):
        if tool.type == "function" and tool.parameters is not None:
            check_json_schema(tool.parameters, f"tools[{i}].parameters", object_root=True)
        for j, member in enumerate(tool.tools or []):  # namespace members
            if member.parameters is not None:
                check_json_schema(member.parameters, f"tools[{i}].tools[{j}].parameters", object_root=True)
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type == "json_schema" and fmt.schema_ is not None:
        check_json_schema(fmt.schema_, "text.format.schema", object_root=False)

    def turns() -> Iterable[tuple[str, str, Any]]:
        for i, m in enumerate(messages):
            where = f"input (message {i} of the conversation)"
            if m["role"] == "assistant":
                yield where, "assistant", [tc["id"] for tc in m.get("tool_calls") or []]
            elif m["role"] == "tool":
                yield f"{where}: function_call_output call_id", "tool", m.get("tool_call_id")
            else:
                yield where, m["role"], None

    check_tool_order(turns())
