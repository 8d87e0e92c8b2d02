"""Two protections of the HTTP server that no single route owns: the Host-header allow-list and path-free errors.

Host allow-list (DNS rebinding): a web page from `evil.example` can make its browser resolve that name to 127.0.0.1
and then talk to a loopback server as if it were same-origin; the only trace is the `Host: evil.example` header. So
a server bound to a loopback address answers only requests whose Host is a loopback name or address (`localhost`,
`*.localhost`, `127.0.0.1`, `::1`, the bound address) plus what `--allowed-hosts` adds; `*` turns the check off.
A server bound elsewhere checks Host only when `--allowed-hosts` is given (it should use `--api-key` anyway).
Requests without a Host header are not from a browser and pass.

Path-free errors: messages of exceptions from libraries (xgrammar's `[10:10:58] /project/cpp/grammar_parser.cc:820:
...`, Python tracebacks, files under the interpreter's or dsv4's install directories) must not show the server's file
layout to clients. `scrub_paths` removes source locations and reduces such paths to their file name; `ServeError`
applies it to every message, and the full text still goes to the server log.

Deliberately not here: authentication (`--api-key`, app.py) and CORS (the server sends no CORS headers, so browsers
already refuse cross-origin reads of its responses; rebinding is what gets around that).
"""

from __future__ import annotations

import ipaddress
import os
import re
import site
import sys
from collections.abc import Awaitable, Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

LOOPBACK_HOSTS = ("localhost", "*.localhost", "127.0.0.1", "::1")


# ----------------------------------------------------------------------------------------------- Host allow-list
def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts_for(bind: str, extra: list[str] | None = None) -> list[str] | None:
    """The Host values a server bound to `bind` accepts, or None for "do not check"."""
    extra = [h.strip().lower() for h in extra or [] if h.strip()]
    if "*" in extra:
        return None
    if is_loopback(bind):
        return list(dict.fromkeys([*LOOPBACK_HOSTS, bind.strip("[]").lower(), *extra]))
    return extra or None


def host_name(header: str) -> str:
    """The name part of a Host header: no port, no IPv6 brackets, lower case, no trailing dot."""
    header = header.strip().lower()
    if header.startswith("["):
        name = header[1 : header.find("]")] if "]" in header else header[1:]
    elif header.count(":") == 1:
        name = header.split(":", 1)[0]
    else:
        name = header  # a bare name, or a bare IPv6 address (not valid in Host, but unambiguous)
    return name.rstrip(".")


def host_allowed(header: str, allowed: list[str]) -> bool:
    name = host_name(header)
    for entry in allowed:
        entry = entry.strip("[]").rstrip(".")
        if entry.startswith("*.") and name.endswith(entry[1:]) and len(name) > len(entry) - 1:
            return True
        if name == entry:
            return True
    return False


class HostAllowList:
    """ASGI middleware: requests whose Host header is not allowed get `reject(scope, receive, send, message)`."""

    def __init__(self, app: Any, allowed: list[str],
                 reject: Callable[[Any, Any, Any, str], Awaitable[None]]) -> None:
        self.app = app
        self.allowed = list(allowed)
        self.reject = reject

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            host = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"), None)
            if host is not None and not host_allowed(host, self.allowed):
                shown = ", ".join(self.allowed)
                await self.reject(scope, receive, send, (
                    f"The Host header {host[:100]!r} is not one this server answers to (allowed: {shown}); a web "
                    "page must not reach a local server through DNS rebinding. If you reach the server by that "
                    "name, start it with --allowed-hosts NAME."))
                return
        await self.app(scope, receive, send)


# ----------------------------------------------------------------------------------------------- path-free errors
_SOURCE_EXT = r"(?:py|pyx|pxd|pyi|c|cc|cpp|cxx|h|hh|hpp|cu|cuh|rs|go|so|dylib|dll)"
# `[10:10:58] /project/cpp/json_schema_converter.cc:5082: ` (xgrammar / dmlc logging) or any `dir/file.ext:LINE[:COL]`
_LOCATION = re.compile(
    r"(?:\[\d{1,2}:\d{2}:\d{2}\]\s*)?(?:[A-Za-z]:)?[\w.+~-]*(?:[/\\][\w.+~-]+)+\." + _SOURCE_EXT + r"(?::\d+)+:?[ \t]*"
)
_TRACEBACK = re.compile(r'\s*File "[^"\n]+", line \d+(?:, in [^\n]+)?')


@lru_cache(maxsize=1)
def _install_roots() -> tuple[str, ...]:
    """Directories whose files are library code or the server's own: interpreter, site-packages, dsv4, home."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(__file__).resolve().parents[2])}
    try:
        roots.update(site.getsitepackages())
        roots.add(site.getusersitepackages())
    except AttributeError:  # pragma: no cover - virtualenv's old site module
        pass
    home = os.path.expanduser("~")
    if home not in ("/", "~"):
        roots.add(home)
    return tuple(sorted((r.rstrip("/\\") for r in roots if r and len(r) > 1), key=len, reverse=True))


def scrub_paths(message: str) -> str:
    """`message` without source locations, traceback lines or paths into library / install directories (a path
    there is reduced to its file name, which still says what was wrong)."""
    text = _TRACEBACK.sub("", message)
    text = _LOCATION.sub("", text)
    for root in _install_roots():
        text = re.sub(re.escape(root) + r"[/\\][^\s'\"`)\],;]*", lambda m: os.path.basename(m.group(0)), text)
    text = re.sub(r"\bsite-packages[/\\][^\s'\"`)\],;]*", lambda m: os.path.basename(m.group(0)), text)
    return text.strip()
