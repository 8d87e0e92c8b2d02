"""DeepSeek-V4 chat encoding: messages -> prompt text, byte for byte as the official `encoding/encoding_dsv4.py`.

The release ships no Jinja template; the official Python encoder *is* the template (spec chat-encoding.md). This module
re-implements its rules (section numbers refer to that spec):

* roles system / user / developer / latest_reminder / assistant; OpenAI `tool` messages are merged into user turns
  as `<tool_result>` blocks, sorted into the order of the preceding assistant's calls (section 4);
* tools (on system or developer messages) render the TOOLS template, `response_format` renders its block (section 2);
* thinking rules: `</think>`-terminated reasoning on assistant turns, `drop_thinking` (reasoning before the last user
  turn removed, earlier developer turns dropped), switched off when any message carries tools (section 3);
* `reasoning_effort="max"` prepends the official effort prompt in thinking mode; `"high"` and None render nothing;
* quick-instruction tasks (`task` on a message) append their task token (section 6).

Extensions over the official encoder: `tools=` / `response_format=` keyword arguments attach to the first system
message (one is inserted when there is none); OpenAI content-part lists (`[{"type": "text", "text": ...}]`) are
accepted for text content; tool-call arguments given as a dict (rather than OpenAI's JSON string) render as the
parameters they hold, and a JSON string that is not an object as one "arguments" parameter (the official encoder
would crash on the non-object); malformed input raises `ValueError` saying what to fix instead of `AssertionError`.
All but one leave the text of an input the official encoder accepts unchanged; the exception is dict arguments,
which the official encoder accepts but wraps in one parameter: here they render as the call the model would write.

`encode_chat_prompt` renders the same text as a `ChatPrompt` (prompt.py) that tells the encoder's own text from the
messages' text, so that `Tokenizer.encode_prompt` makes control tokens only where the encoder wrote them.

Deliberately not here: tokenization (tokenizer.py) and parsing model output (parser.py, stream.py).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from .prompt import ChatPrompt
from .tokenizer import ASSISTANT, BOS, DSML, EOS, LATEST_REMINDER, THINK_END, THINK_START, USER

Message = dict[str, Any]

TASK_TOKENS: dict[str, str] = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}

TOOL_CALLS_BLOCK = "tool_calls"
# What the model writes between its content and the first invoke; the parser splits content there.
TOOL_CALLS_START = f"\n\n<{DSML}{TOOL_CALLS_BLOCK}"

REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, "
    "rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

RESPONSE_FORMAT_HEADER = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"

TOOLS_TEMPLATE = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<{dsml}tool_calls>" block like the following:

<{dsml}tool_calls>
<{dsml}invoke name="$TOOL_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$TOOL_NAME2">
...
</{dsml}invoke>
</{dsml}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {think_start}), you MUST output your complete reasoning inside {think_start}...{think_end} BEFORE any tool calls or final response.

Otherwise, output directly after {think_end} with tool calls or final response.

### Available Tool Schemas

{schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

THINKING_MODES = ("chat", "thinking")
REASONING_EFFORTS = (None, "high", "max")


def to_json(value: Any) -> str:
    # The official encoder dumps with ensure_ascii=False and falls back to ASCII escapes only when that fails
    # (lone surrogates cannot be written as UTF-8 later, but json.dumps itself accepts them).
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return json.dumps(value, ensure_ascii=True)


def _tools_prompt(tools: list[Message]) -> ChatPrompt:
    functions = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
            raise ValueError(
                f"tools[{i}] must be an OpenAI tool {{'type': 'function', 'function': {{name, description, "
                f"parameters}}}}, got {tool!r}"
            )
        functions.append(tool["function"])
    head, tail = TOOLS_TEMPLATE.split("{schemas}")
    marks = dict(dsml=DSML, think_start=THINK_START, think_end=THINK_END)
    schemas = [ChatPrompt().data(to_json(f)) for f in functions]  # names and descriptions are the client's
    return ChatPrompt().ctrl(head.format(**marks)).join(schemas, "\n").ctrl(tail.format(**marks))


def render_tools(tools: list[Message]) -> str:
    return _tools_prompt(tools).text


def _response_format_prompt(response_format: Any) -> ChatPrompt:
    return ChatPrompt().ctrl(RESPONSE_FORMAT_HEADER).data(to_json(response_format))


def render_response_format(response_format: Any) -> str:
    return _response_format_prompt(response_format).text


def _arguments_prompt(arguments: Any) -> ChatPrompt:
    """One tool call's arguments (a JSON object string) as DSML parameter lines.

    Strings go verbatim with `string="true"`, everything else as JSON with `string="false"`. Arguments that are not
    a JSON object are kept whole as one string parameter named "arguments", as the official encoder does.
    """
    if isinstance(arguments, dict):
        parsed = arguments
    else:
        try:
            parsed = json.loads(arguments)
        except (TypeError, ValueError):
            parsed = {"arguments": arguments}
        if not isinstance(parsed, dict):
            # NOTE: the official encoder would crash on e.g. "[1, 2]" (no .items()); keep the text instead.
            parsed = {"arguments": arguments}
    lines = []
    for key, value in parsed.items():
        is_str = isinstance(value, str)
        text = value if is_str else to_json(value)
        lines.append(
            ChatPrompt().ctrl(f'<{DSML}parameter name="').data(f"{key}")
            .ctrl(f'" string="{"true" if is_str else "false"}">').data(text).ctrl(f"</{DSML}parameter>")
        )
    return ChatPrompt().join(lines, "\n")


def encode_arguments(arguments: Any) -> str:
    return _arguments_prompt(arguments).text


def _tool_calls_prompt(tool_calls: list[Message]) -> ChatPrompt:
    invokes = []
    for i, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or "name" not in function:
            raise ValueError(
                f"tool_calls[{i}] must be an OpenAI tool call {{'type': 'function', 'function': {{'name', "
                f"'arguments'}}}}, got {call!r}"
            )
        args = _arguments_prompt(function.get("arguments", "{}"))
        invokes.append(ChatPrompt().ctrl(f'<{DSML}invoke name="').data(f"{function['name']}").ctrl('">\n')
                       .extend(args).ctrl(f"\n</{DSML}invoke>"))
    return (ChatPrompt().ctrl(f"\n\n<{DSML}{TOOL_CALLS_BLOCK}>\n").join(invokes, "\n")
            .ctrl(f"\n</{DSML}{TOOL_CALLS_BLOCK}>"))


def render_tool_calls(tool_calls: list[Message]) -> str:
    return _tool_calls_prompt(tool_calls).text


def _text(content: Any, where: str) -> str:
    """Message content as text: None -> "", str as is, OpenAI text parts joined by blank lines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(part.get("text") or "")
            else:
                raise ValueError(
                    f"{where}: only text content parts are supported by DeepSeek-V4 (got {part!r}); send images "
                    "or other media as text or drop them"
                )
        return "\n\n".join(parts)
    raise ValueError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")


def _tool_result_text(content: Any) -> str:
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(part.get("text", ""))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                parts.append(f"[Unsupported {kind}]")
        return "\n\n".join(parts)
    return "" if content is None else str(content)


def _last_user_index(messages: list[Message]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") in ("user", "developer"):
            return i
    return -1


def render_message(
    index: int, messages: list[Message], thinking_mode: str, drop_thinking: bool, reasoning_effort: str | None
) -> str:
    return _message_prompt(index, messages, thinking_mode, drop_thinking, reasoning_effort).text


def _message_prompt(
    index: int, messages: list[Message], thinking_mode: str, drop_thinking: bool, reasoning_effort: str | None
) -> ChatPrompt:
    msg = messages[index]
    role = msg.get("role")
    where = f"messages[{index}] (role {role!r})"
    last_user = _last_user_index(messages)
    out = ChatPrompt()
    if index == 0 and thinking_mode == "thinking" and reasoning_effort == "max":
        out.ctrl(REASONING_EFFORT_MAX)

    if role in ("system", "developer"):
        body = _text(msg.get("content"), where)
        if role == "developer":
            if not body:
                raise ValueError(f"{where}: a developer message needs non-empty content")
            out.ctrl(USER)
        out.data(body)
        if msg.get("tools"):
            out.ctrl("\n\n").extend(_tools_prompt(msg["tools"]))
        if msg.get("response_format"):
            out.ctrl("\n\n").extend(_response_format_prompt(msg["response_format"]))
    elif role == "user":
        out.ctrl(USER)
        blocks = msg.get("content_blocks")
        if blocks:
            parts = []
            for block in blocks:
                kind = block.get("type")
                if kind == "text":
                    parts.append(ChatPrompt().data(block.get("text", "")))
                elif kind == "tool_result":
                    parts.append(ChatPrompt().ctrl("<tool_result>").data(_tool_result_text(block.get("content", "")))
                                 .ctrl("</tool_result>"))
                else:
                    parts.append(ChatPrompt().data(f"[Unsupported {kind}]"))
            out.join(parts, "\n\n")
        else:
            out.data(_text(msg.get("content"), where))
    elif role == "latest_reminder":
        out.ctrl(LATEST_REMINDER).data(_text(msg.get("content"), where))
    elif role == "assistant":
        tool_calls = _tool_calls_prompt(msg["tool_calls"]) if msg.get("tool_calls") else ChatPrompt()
        # A task's output (the turn after a message with `task`) is never reasoned about.
        after_task = index > 0 and messages[index - 1].get("task") is not None
        if thinking_mode == "thinking" and not after_task and (not drop_thinking or index > last_user):
            out.data(msg.get("reasoning_content") or "").ctrl(THINK_END)
        out.data(_text(msg.get("content"), where)).extend(tool_calls)
        if not msg.get("wo_eos", False):
            out.ctrl(EOS)
    elif role == "tool":
        raise ValueError(f"{where}: tool messages must be merged into user turns first (merge_tool_messages)")
    else:
        raise ValueError(
            f"{where}: unknown role; DeepSeek-V4 knows system, user, assistant, tool, developer, latest_reminder"
        )

    # The generation prompt / task token goes only where the model speaks next: after the last message, or before
    # an assistant or latest_reminder turn.
    if index + 1 < len(messages) and messages[index + 1].get("role") not in ("assistant", "latest_reminder"):
        return out
    task = msg.get("task")
    if task is not None:
        if task not in TASK_TOKENS:
            raise ValueError(f"{where}: unknown task {task!r}; valid tasks are {sorted(TASK_TOKENS)}")
        if task == "action":
            out.ctrl(ASSISTANT + (THINK_START if thinking_mode == "thinking" else THINK_END) + TASK_TOKENS[task])
        else:
            out.ctrl(TASK_TOKENS[task])
    elif role in ("user", "developer"):
        opens_thinking = thinking_mode == "thinking" and (not drop_thinking or index >= last_user)
        out.ctrl(ASSISTANT + (THINK_START if opens_thinking else THINK_END))
    return out


def merge_tool_messages(messages: list[Message]) -> list[Message]:
    """OpenAI `tool` messages -> `tool_result` blocks of a user turn (there is no tool role in the V4 prompt).

    Consecutive tool results and the user text that follows them share one user turn; every user message gets
    `content_blocks`, so consecutive user messages merge too, exactly as the official encoder does.
    """
    merged: list[Message] = []
    for original in messages:
        msg = copy.deepcopy(original)
        role = msg.get("role")
        prev = merged[-1] if merged else None
        joinable = prev is not None and prev.get("role") == "user" and "content_blocks" in prev
        if role == "tool":
            block = {
                "type": "tool_result",
                "tool_use_id": msg.get("tool_call_id", ""),
                "content": msg.get("content", ""),
            }
            if joinable:
                prev["content_blocks"].append(block)
            else:
                merged.append({"role": "user", "content_blocks": [block]})
        elif role == "user":
            text = _text(msg.get("content", ""), "user message")
            block = {"type": "text", "text": text}
            if joinable and prev.get("task") is None:
                prev["content_blocks"].append(block)
            else:
                new = {"role": "user", "content": text, "content_blocks": [block]}
                for key in ("task", "wo_eos", "mask"):
                    if key in msg:
                        new[key] = msg[key]
                merged.append(new)
        else:
            merged.append(msg)
    return merged


def sort_tool_results_by_call_order(messages: list[Message]) -> list[Message]:
    """Reorder the tool results of each user turn into the order of the preceding assistant's tool calls (in place)."""
    order: dict[str, int] = {}
    for msg in messages:
        role = msg.get("role")
        if role == "assistant" and msg.get("tool_calls"):
            order = {}
            for i, call in enumerate(msg["tool_calls"]):
                call_id = call.get("id") or call.get("function", {}).get("id", "")
                if call_id:
                    order[call_id] = i
        elif role == "user" and msg.get("content_blocks"):
            results = [b for b in msg["content_blocks"] if b.get("type") == "tool_result"]
            if len(results) > 1 and order:
                # sorted() is stable: results whose id is unknown keep their relative order at position 0.
                ranked = iter(sorted(results, key=lambda b: order.get(b.get("tool_use_id", ""), 0)))
                msg["content_blocks"] = [
                    next(ranked) if b.get("type") == "tool_result" else b for b in msg["content_blocks"]
                ]
    return messages


def drop_thinking_messages(messages: list[Message]) -> list[Message]:
    """Drop what earlier turns reasoned: reasoning of assistant turns before the last user turn, and earlier
    developer turns (report 5.1.1: general chat drops the reasoning history at each new user message)."""
    last_user = _last_user_index(messages)
    kept: list[Message] = []
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role in ("user", "system", "tool", "latest_reminder", "direct_search_results") or i >= last_user:
            kept.append(msg)
        elif role == "assistant":
            msg = dict(msg)
            msg.pop("reasoning_content", None)
            kept.append(msg)
    return kept


def _attach_to_system(messages: list[Message], tools: list[Message] | None, response_format: Any) -> list[Message]:
    if not tools and not response_format:
        return messages
    messages = list(messages)
    for i, msg in enumerate(messages):
        if msg.get("role") == "system":
            msg = dict(msg)
            break
    else:
        i, msg = 0, {"role": "system", "content": ""}
        messages.insert(0, msg)
    if tools:
        if msg.get("tools"):
            raise ValueError("tools given both as an argument and on the system message; give them once")
        msg["tools"] = tools
    if response_format:
        if msg.get("response_format"):
            raise ValueError("response_format given both as an argument and on the system message; give it once")
        msg["response_format"] = response_format
    messages[i] = msg
    return messages


def encode_messages(
    messages: list[Message],
    thinking_mode: str = "chat",
    reasoning_effort: str | None = None,
    drop_thinking: bool = True,
    context: list[Message] | None = None,
    add_default_bos_token: bool = True,
    tools: list[Message] | None = None,
    response_format: Any = None,
) -> str:
    """The prompt text for `messages` (OpenAI-style dicts), ending with the generation prompt when the last message
    is a user/developer turn: `<｜Assistant｜><think>` in thinking mode, `<｜Assistant｜></think>` in chat mode.

    `context` is an already-encoded prefix (rendered elsewhere, e.g. cached): its messages shape the rendering of
    `messages` but are not rendered again, and no BOS is written. `tools` / `response_format` attach to the first
    system message (a dsv4 convenience; the official encoder expects them on the message).

    NOTE: tokenizing this string with `Tokenizer.encode` turns control-token strings inside message text into
    control tokens; use `encode_chat_prompt` + `Tokenizer.encode_prompt` for prompts that carry untrusted text.
    """
    return encode_chat_prompt(messages, thinking_mode, reasoning_effort, drop_thinking, context,
                              add_default_bos_token, tools, response_format).text


def encode_chat_prompt(
    messages: list[Message],
    thinking_mode: str = "chat",
    reasoning_effort: str | None = None,
    drop_thinking: bool = True,
    context: list[Message] | None = None,
    add_default_bos_token: bool = True,
    tools: list[Message] | None = None,
    response_format: Any = None,
) -> ChatPrompt:
    """`encode_messages` as a ChatPrompt (prompt.py): the same text, with the encoder's own pieces told apart from
    the messages' text, so that `Tokenizer.encode_prompt` never makes a control token out of message text."""
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {REASONING_EFFORTS}, got {reasoning_effort!r}")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("messages must be a list of dicts with a 'role' key")
    context = list(context or [])
    if context:
        # A system message to attach to would be in the already-rendered prefix.
        if tools or response_format:
            raise ValueError("tools/response_format cannot be attached when a context prefix is given")
    else:
        messages = _attach_to_system(messages, tools, response_format)

    messages = merge_tool_messages(messages)
    messages = sort_tool_results_by_call_order(context + messages)[len(context):]
    if context:
        context = sort_tool_results_by_call_order(merge_tool_messages(context))
    full = context + messages

    # Interleaved thinking (report 5.1.1): with tools, every earlier turn keeps its reasoning.
    drop = drop_thinking and not any(m.get("tools") for m in full)
    if thinking_mode == "thinking" and drop:
        full = drop_thinking_messages(full)
        start = len(drop_thinking_messages(context)) if context else 0
    else:
        start = len(context)

    prompt = ChatPrompt().ctrl(BOS if add_default_bos_token and not context else "")
    for i in range(start, len(full)):
        prompt.extend(_message_prompt(i, full, thinking_mode, drop, reasoning_effort))
    return prompt
