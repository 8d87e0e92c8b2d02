"""The per-request log line (info) and body summary (debug), against the scripted engine."""

from __future__ import annotations

import logging
import re

import pytest

from .test_app import MODEL, make

LINE = re.compile(r"^(\w+) (\S+) (\d{3}) prompt=(\S+) cached=(\S+) completion=(\S+) ttft=(\S+) total=([\d.]+)s"
                  r"(?: error=(.*))?$")


def lines(caplog: pytest.LogCaptureFixture) -> list[re.Match]:
    return [LINE.match(r.getMessage()) for r in caplog.records
            if r.name == "dsv4.serve.requests" and r.levelno == logging.INFO]


def test_one_info_line_per_request_with_tokens_and_times(caplog: pytest.LogCaptureFixture) -> None:
    client, _, _ = make("Because.</think>Paris.", api_key="k")
    key = {"Authorization": "Bearer k"}
    user = [{"role": "user", "content": "Capital of France?"}]
    with caplog.at_level(logging.INFO, logger="dsv4.serve.requests"):
        r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": user}, headers=key)
        usage = r.json()["usage"]
        client.post("/v1/messages", json={"model": MODEL, "messages": user, "max_tokens": 50, "stream": True},
                    headers=key)
        client.post("/v1/chat/completions", json={"model": MODEL, "messages": user})  # no key
        client.get("/v1/nowhere", headers=key)
    got = lines(caplog)
    assert all(got) and len(got) == 4, [r.getMessage() for r in caplog.records]
    chat, stream, refused, missing = got
    assert chat.group(1, 2, 3) == ("POST", "/v1/chat/completions", "200")
    assert chat.group(4, 5, 6) == (str(usage["prompt_tokens"]), "3", str(usage["completion_tokens"]))
    assert chat.group(7).endswith("s") and float(chat.group(7)[:-1]) <= float(chat.group(8))
    assert stream.group(2, 3) == ("/v1/messages", "200") and stream.group(6) != "-"
    assert refused.group(3, 4, 7) == ("401", "-", "-") and "Missing API key" in refused.group(9)
    assert chat.group(9) is None
    assert missing.group(2, 3) == ("/v1/nowhere", "404")


def test_debug_summarises_the_body_without_its_text(caplog: pytest.LogCaptureFixture) -> None:
    client, _, _ = make()
    secret = "my private question"
    with caplog.at_level(logging.DEBUG, logger="dsv4.serve.requests"):
        client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": secret}],
                                                  "max_tokens": 5, "tools": []})
    (summary,) = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert "messages=1" in summary and "tools=0" in summary and 'max_tokens=5' in summary
    assert f'model="{MODEL}"' in summary and secret not in summary
