"""System messages that arrive in the middle of a conversation, placed where the V4 chat format can hold them.

The V4 encoder renders a `system` message as its text verbatim, with no role token (spec chat-encoding.md section 2),
and writes the generation prompt (`<｜Assistant｜><think>`) only after a user turn. So a system message written between
a user turn and the assistant's reply (Claude Code sends one as the last message; Codex sends developer messages
between user turns) would glue its text onto the user's and leave the prompt without a generation prompt. Here such a
message moves to the turn boundary in front of the user turn it accompanies, where a V4 system prompt sits anyway
(after BOS or after the previous `<｜end▁of▁sentence｜>`); one that already follows an assistant turn stays in place.
Consecutive system messages are joined with a blank line, so two texts never run together.

Deliberately not here: turning API-specific shapes into V4 messages (anthropic.py, responses.py).
"""

from __future__ import annotations

from typing import Any

_USER_TURN = ("user", "tool")


def place_system_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    turn_start: int | None = None  # where the current run of user/tool messages began in `out`
    for msg in messages:
        role = msg.get("role")
        if role == "system":
            at = turn_start if turn_start is not None else len(out)
            prev = out[at - 1] if at > 0 else None
            if prev is not None and prev.get("role") == "system" and not (prev.get("tools") or msg.get("tools")):
                out[at - 1] = {**prev, "content": _join(prev.get("content"), msg.get("content"))}
                continue
            out.insert(at, dict(msg))
            if turn_start is not None:
                turn_start += 1
            continue
        if role in _USER_TURN:
            if turn_start is None:
                turn_start = len(out)
        else:
            turn_start = None
        out.append(msg)
    return out


def _join(a: Any, b: Any) -> str:
    a, b = a or "", b or ""
    return f"{a}\n\n{b}" if a and b else a or b
