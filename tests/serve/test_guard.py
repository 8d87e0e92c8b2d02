"""The Host-header allow-list (DNS rebinding) and path-free error messages (guard.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dsv4.serve.app import build_parser, create_app
from dsv4.serve.core import ServeError, ServingCore
from dsv4.serve.guard import allowed_hosts_for, host_allowed, scrub_paths

from .fakes import FakeChat, FakeEngine
from .test_app import MODEL, TOK, make

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def client_for(bind: str, extra: list[str] | None = None, real_chat: bool = False) -> TestClient:
    core = ServingCore(FakeEngine(TOK, lambda ids, p: "ok"), TOK, model_names=[MODEL], max_model_len=4096,
                       chat=None if real_chat else FakeChat())
    return TestClient(create_app(core, allowed_hosts=allowed_hosts_for(bind, extra)), raise_server_exceptions=False)


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "LOCALHOST.", "127.0.0.1:8000", "[::1]:8000",
                                  "app.localhost:1234", "127.0.0.1"])
def test_loopback_bind_accepts_loopback_names(host):
    c = client_for("127.0.0.1")
    assert c.post("/v1/chat/completions", json=CHAT, headers={"host": host}).status_code == 200
    assert c.get("/health", headers={"host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io",
                                  "192.168.1.5:8000", "[2001:db8::1]:80", "xlocalhost"])
def test_loopback_bind_refuses_other_hosts_in_each_api_format(host):
    c = client_for("127.0.0.1")
    r = c.post("/v1/chat/completions", json=CHAT, headers={"host": host})
    assert r.status_code == 400 and "DNS rebinding" in r.json()["error"]["message"]
    assert "--allowed-hosts" in r.json()["error"]["message"]
    r = c.post("/v1/messages", json={**CHAT, "max_tokens": 8}, headers={"host": host})
    assert r.status_code == 400 and r.json()["type"] == "error" and "Host header" in r.json()["error"]["message"]
    for path in ("/health", "/metrics", "/v1/models"):
        assert c.get(path, headers={"host": host}).status_code == 400


def test_allowed_hosts_extend_and_star_disables():
    c = client_for("127.0.0.1", ["my.box", "*.corp.example"])
    for host in ("my.box:8000", "a.corp.example", "localhost"):
        assert c.get("/health", headers={"host": host}).status_code == 200, host
    for host in ("corp.example", "other.box"):
        assert c.get("/health", headers={"host": host}).status_code == 400, host
    assert client_for("127.0.0.1", ["*"]).get("/health", headers={"host": "anything"}).status_code == 200
    # a server bound to every interface checks only when told to
    assert allowed_hosts_for("0.0.0.0") is None
    assert client_for("0.0.0.0").get("/health", headers={"host": "anything"}).status_code == 200
    assert client_for("0.0.0.0", ["my.box"]).get("/health", headers={"host": "anything"}).status_code == 400
    assert host_allowed("::1", allowed_hosts_for("::1")) and not host_allowed("evil", allowed_hosts_for("::1"))


def test_cli_checks_host_by_default(monkeypatch):
    """`dsv4 serve` (bound to loopback by default) hands create_app the loopback allow-list; --allowed-hosts adds."""
    import dsv4.serve.app as app_mod

    seen = {}

    def fake_create_app(core, **kw):
        seen.update(kw)
        raise SystemExit(0)  # stop before uvicorn

    monkeypatch.setattr(app_mod, "build_core", lambda args: None)
    monkeypatch.setattr(app_mod, "create_app", fake_create_app)
    with pytest.raises(SystemExit):
        app_mod.main([])
    assert set(seen["allowed_hosts"]) >= {"localhost", "127.0.0.1", "::1"}
    with pytest.raises(SystemExit):
        app_mod.main(["--allowed-hosts", "my.box"])
    assert "my.box" in seen["allowed_hosts"]
    assert build_parser().parse_args(["--allowed-hosts", "*"]).allowed_hosts == ["*"]


# ---- errors without paths -----------------------------------------------------------------------------------------
def test_scrub_paths():
    lib = str(Path(sys.prefix) / "lib" / "python3.11" / "site-packages" / "xgrammar" / "grammar.py")
    cases = {
        "[10:10:58] /project/cpp/json_schema_converter.cc:5082: Unsupported type \"nonsense\"\n":
            'Unsupported type "nonsense"',
        f"cannot open {lib}": "cannot open grammar.py",
        'Traceback:\n  File "/opt/x/site-packages/a/b.py", line 12, in f\nValueError: bad':
            "Traceback:\nValueError: bad",
        "C:\\py\\Lib\\site-packages\\torch\\nn\\functional.py:42: boom": "boom",
    }
    for raw, want in cases.items():
        assert scrub_paths(raw) == want
    # what is not a library path stays: JSON pointers, URLs, model names, plain words
    for keep in ("Cannot find field 'defs' in #/defs/x", "see https://example.com/a/b.py", "model `org/name`",
                 "a/b is not a number"):
        assert scrub_paths(keep) == keep
    assert ServeError("invalid_request", f"bad file {lib}").message == "bad file grammar.py"


# Valid JSON Schemas that the grammar compiler refuses (an invalid schema is caught before it: serve/validate.py).
@pytest.mark.parametrize("schema", [{"type": "string", "pattern": "(?<=a)b"}, {"type": "string", "pattern": "("}])
def test_grammar_build_errors_reach_the_client_without_paths(schema):
    pytest.importorskip("xgrammar")
    c = client_for("127.0.0.1", real_chat=True)
    body = {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    r = c.post("/v1/chat/completions", json=body, headers={"host": "localhost"})
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert "grammar" in msg and ".cc" not in msg and "/project" not in msg and "/cpp/" not in msg, msg
    assert ("Lookbehind" in msg) or ("parenthesis" in msg), msg  # the reason itself still arrives


def test_internal_errors_carry_no_paths():
    lib = str(Path(sys.prefix) / "lib" / "python3" / "site-packages" / "torch" / "functional.py")

    def boom(ids, params):
        raise RuntimeError(f'  File "{lib}", line 3, in f\n{lib}:3: tensor exploded')

    client, _, _ = make(boom)
    for stream in (False, True):
        r = client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        assert "tensor exploded" in r.text and "site-packages" not in r.text and sys.prefix not in r.text, r.text
