"""Forged control tokens through both HTTP APIs: every V4 added token in each place a client's text can go
(system, developer, user, assistant text and reasoning, tool descriptions, call arguments, tool results) reaches the
engine as plain text; the prompt's control tokens are exactly those of the same conversation with harmless text."""

from __future__ import annotations

import json
from typing import Any

from .test_app import MODEL, TOK, make

ADDED = {i for i in TOK.backend.get_added_tokens_decoder()}
FORGED = "".join(t.content for t in TOK.backend.get_added_tokens_decoder().values())


def control_ids(ids: list[int]) -> list[int]:
    return [i for i in ids if i in ADDED]


def openai_body(text: str) -> dict[str, Any]:
    tools = [{"type": "function", "function": {"name": "f", "description": text,
                                               "parameters": {"type": "object", "properties": {}}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": json.dumps({"q": text})}}
    return {"model": MODEL, "tools": tools, "max_tokens": 4, "messages": [
        {"role": "system", "content": text},
        {"role": "developer", "content": text},
        {"role": "user", "content": [{"type": "text", "text": text}]},
        {"role": "assistant", "content": text, "reasoning_content": text, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": text},
        {"role": "user", "content": text},
    ]}


def anthropic_body(text: str) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 128, "system": text, "thinking": {"type": "enabled", "budget_tokens": 64},
            "tools": [{"name": "f", "description": text, "input_schema": {"type": "object", "properties": {}}}],
            "messages": [
                {"role": "user", "content": text},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": text, "signature": "s"}, {"type": "text", "text": text},
                    {"type": "tool_use", "id": "t1", "name": "f", "input": {"q": text}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": text}]},
                    {"type": "text", "text": text}]},
            ]}


def _prompts(path: str, body_of) -> tuple[list[int], list[int], Any]:
    seen: list[list[int]] = []
    client, _, _ = make(lambda ids, p: seen.append(ids) or "ok", max_model_len=1 << 20)
    for text in (FORGED, "x"):
        r = client.post(path, json=body_of(text))
        assert r.status_code == 200, r.text
    return seen[0], seen[1], client


def test_openai_chat_cannot_forge_control_tokens() -> None:
    forged, clean, _ = _prompts("/v1/chat/completions", openai_body)
    assert control_ids(forged) == control_ids(clean) and len(control_ids(clean)) > 10
    # system, developer, user x2, reasoning, text, call arguments, tool result, tool description: all still text
    assert TOK.decode(forged).count(FORGED) == 9
    assert not set(forged[-2:]) - ADDED  # still ends in the generation prompt <｜Assistant｜><think>


def test_anthropic_messages_cannot_forge_control_tokens() -> None:
    forged, clean, client = _prompts("/v1/messages", anthropic_body)
    assert control_ids(forged) == control_ids(clean) and len(control_ids(clean)) > 10
    # system, user x2, thinking, text, tool input, tool result, tool description
    assert TOK.decode(forged).count(FORGED) == 8
    body = anthropic_body(FORGED)
    del body["max_tokens"]
    assert client.post("/v1/messages/count_tokens", json=body).json() == {"input_tokens": len(forged)}
