"""What Claude Code and LangChain's ChatAnthropic send to /v1/messages, against the scripted engine: system messages
inside `messages`, context-length errors in Anthropic's wording (which Claude Code parses to retry), adaptive thinking
and output_config.effort, output_config.format, and both of Claude Code's real request bodies."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import anthropic
import pytest

from dsv4.chat.encoding import REASONING_EFFORT_MAX, encode_messages

from .test_app import MODEL, TOK, make
from .test_responses import recording

CLIENTS = Path(__file__).parent / "clients"
# the pattern Claude Code matches to shrink max_tokens and retry
CONTEXT_LIMIT = re.compile(r"input length and `max_tokens` exceed context limit: (\d+) \+ (\d+) > (\d+)")


def sdk(client: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url="http://testserver", api_key="k", http_client=client, max_retries=0)


def test_system_messages_inside_messages_sit_at_turn_boundaries() -> None:
    fn, prompts = recording("Because.</think>Paris.")
    client, _, _ = make(fn)
    r = client.post("/v1/messages", json={"model": MODEL, "max_tokens": 50, "system": "S0", "messages": [
        {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
        {"role": "system", "content": "S-between"}, {"role": "user", "content": "U2"},
        {"role": "system", "content": [{"type": "text", "text": "S-last"}]}]})
    assert r.status_code == 200, r.text
    # a system message after the assistant turn stays; one that closes a user turn goes in front of it, so the
    # generation prompt still follows the user turn
    assert prompts[-1] == encode_messages([
        {"role": "system", "content": "S0"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
        {"role": "system", "content": "S-between\n\nS-last"}, {"role": "user", "content": "U2"}],
        thinking_mode="thinking")
    assert prompts[-1].endswith("<｜User｜>U2<｜Assistant｜><think>")
    n = client.post("/v1/messages/count_tokens", json={"model": MODEL, "messages": [
        {"role": "user", "content": "U"}, {"role": "system", "content": "S"}]}).json()["input_tokens"]
    assert n == len(TOK.encode(encode_messages([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                                               thinking_mode="thinking")))


def test_length_errors_in_anthropics_wording() -> None:
    client, _, _ = make(max_model_len=64)
    claude = sdk(client)
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=MODEL, max_tokens=3000, messages=[{"role": "user", "content": "Hi"}])
    m = CONTEXT_LIMIT.search(e.value.message)
    assert m is not None and e.value.body["error"]["type"] == "invalid_request_error", e.value.message
    assert e.value.body["error"]["message"].endswith(", decrease input length or `max_tokens` and try again")
    prompt, max_tokens, limit = map(int, m.groups())
    assert (max_tokens, limit) == (3000, 64)
    # Claude Code's retry: max_tokens = limit - prompt
    ok = claude.messages.create(model=MODEL, max_tokens=limit - prompt, messages=[{"role": "user", "content": "Hi"}])
    assert ok.usage.output_tokens > 0
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "Hi " * 200}])
    assert re.fullmatch(r"prompt is too long: \d+ tokens > 63 maximum", e.value.body["error"]["message"])
    # the OpenAI API keeps OpenAI's wording
    r = client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 32000,
                                                  "messages": [{"role": "user", "content": "Hi"}]})
    assert "maximum context length is 64 tokens" in r.json()["error"]["message"]


def test_adaptive_thinking_and_effort_map_onto_v4_modes() -> None:
    fn, prompts = recording("Because.</think>Paris.")
    client, _, _ = make(fn)
    user = [{"role": "user", "content": "Q"}]
    for thinking, effort, mode, max_prompt in [({"type": "adaptive"}, "high", "thinking", False),
                                               ({"type": "adaptive"}, "max", "thinking", True),
                                               ({"type": "adaptive"}, "low", "thinking", False),
                                               ({"type": "disabled"}, "max", "chat", False)]:
        r = client.post("/v1/messages", json={"model": MODEL, "max_tokens": 20, "messages": user,
                                              "thinking": thinking, "output_config": {"effort": effort}})
        assert r.status_code == 200, r.text
        assert prompts[-1] == encode_messages(user, thinking_mode=mode,
                                              reasoning_effort="max" if max_prompt else None)
        assert prompts[-1].startswith("<｜begin▁of▁sentence｜>" + REASONING_EFFORT_MAX) == max_prompt


def test_output_config_format_uses_the_response_format_grammar() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris"]}}, "required": ["city"]}
    client, _, core = make('{"city": "Paris"}', real_chat=True)
    seen: list[dict[str, Any]] = []
    real = core.build_constraint

    def spy(*args: Any, **kw: Any) -> Any:
        seen.append(kw)
        return real(*args, **kw)

    core.build_constraint = spy
    user = [{"role": "user", "content": "City?"}]
    r = client.post("/v1/messages", json={"model": MODEL, "max_tokens": 30, "messages": user,
                                          "thinking": {"type": "disabled"},
                                          "output_config": {"format": {"type": "json_schema", "schema": schema}}})
    assert r.status_code == 200, r.text
    r2 = client.post("/v1/chat/completions", json={"model": MODEL, "messages": user, "thinking": {"type": "disabled"},
                                                   "response_format": {"type": "json_schema",
                                                                       "json_schema": {"schema": schema}}})
    assert r2.status_code == 200, r2.text
    assert len(seen) == 2 and seen[0] == seen[1]
    assert seen[0]["response_format"]["json_schema"]["schema"] == schema


@pytest.mark.parametrize("name", ["claude-code-2.1.197-messages-default.json",
                                  "claude-code-2.1.197-messages-sonnet.json"])
def test_claude_code_request_bodies_replay(name: str) -> None:
    """Claude Code's first request (system blocks with cache_control, a trailing system message, 24 tools, adaptive
    thinking, effort high, context_management, max_tokens 32000 or 8192, streaming): first too long for a small
    context (the error Claude Code parses), then with its retry the events it reads, in order."""
    body = json.loads((CLIENTS / name).read_text())
    fn, prompts = recording("Let me look.</think>Done.")
    client, _, _ = make(fn, max_model_len=40000)
    r = client.post("/v1/messages", json={**body, "model": MODEL, "max_tokens": 32000})
    assert r.status_code == 400, r.text
    m = CONTEXT_LIMIT.search(r.json()["error"]["message"])
    assert m is not None
    prompt, _, limit = map(int, m.groups())
    r = client.post("/v1/messages", json={**body, "model": MODEL, "max_tokens": limit - prompt})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    kinds = [line[7:] for line in r.text.splitlines() if line.startswith("event: ")]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert [k for k in kinds if k == "content_block_start"] == ["content_block_start"] * 2
    datas = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert [d["content_block"]["type"] for d in datas if d["type"] == "content_block_start"] == ["thinking", "text"]
    assert datas[-2]["delta"]["stop_reason"] == "end_turn" and datas[-2]["usage"]["output_tokens"] > 0
    text = prompts[-1]
    assert text.endswith("<｜Assistant｜><think>") and "## Tools" in text and '"name": "Bash"' in text
    if body["messages"][-1]["role"] == "system":  # the default-model body ends with a system reminder
        reminder = body["messages"][-1]["content"]
        assert text.index(reminder) < text.rindex("<｜User｜>")
