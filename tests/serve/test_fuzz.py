"""Schema fuzzing (schemathesis) of every operation in the server's own OpenAPI document: whatever a client sends,
the answer is never a 5xx.

Two runs. In-process, a scripted engine keeps each call to a few milliseconds, so a few hundred generated requests
stay well under a minute. Then against a real `dsv4 serve` process on loopback (test_server.py's fixture, with a tiny
random model), where the fuzzer's requests reach the real tokenizer, chat format, grammars and engine; its context
limit is kept small, so no generated request can run long whatever max_tokens / n it asks for, and afterwards no
cache page may remain in use.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from dsv4.chat import load_tokenizer
from dsv4.serve.app import create_app
from dsv4.serve.core import ServingCore

from . import test_server
from .fakes import FakeChat, FakeEngine
from .test_server import KEY, MODEL, Server, server  # noqa: F401  (`server`: the real-server fixture, reused)

SEED = 1234

TOK = load_tokenizer(None)
_engine = FakeEngine(TOK, lambda ids, params: "Hm.</think>Yes.")
_core = ServingCore(_engine, TOK, model_names=["tiny"], max_model_len=512, chat=FakeChat())
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(_core))
# Only the random fuzzing phase, bounded by max_examples: the exhaustive "coverage" phase alone sends ~2000 requests.
schema.config.phases.coverage.enabled = False
schema.config.seed = SEED


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case) -> None:
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
    assert _engine.live == set()  # every request, however it ended, released its (fake) cache page


# ---- a real `dsv4 serve` process -----------------------------------------------------------------------------------
# Context limit of the fuzzed server: a short chat prompt (a json_schema prompt fits; one offering tools, ~240 tokens,
# is a 400) plus a few dozen generated tokens. No choice runs past it (a larger max_tokens is a 400), so each call
# stays short whatever the fuzzer sends; the whole real-server run takes ~20 s on 2 CPU cores.
FUZZ_MAX_LEN = 96


@pytest.fixture(scope="module")
def short_context() -> Iterator[None]:
    """test_server's `server` fixture starts `dsv4 serve --max-model-len test_server.MAX_LEN`; set to FUZZ_MAX_LEN
    while this module's server starts (the fixture is requested before `server`)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(test_server, "MAX_LEN", FUZZ_MAX_LEN)
        yield


@pytest.fixture(scope="module")
def fuzz_server(short_context: None, server: Server) -> Server:  # noqa: F811
    return server


@pytest.fixture(scope="module")
def real_schema(fuzz_server: Server) -> schemathesis.schemas.BaseSchema:
    server = fuzz_server
    models = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [(MODEL, FUZZ_MAX_LEN)], models
    loaded = schemathesis.openapi.from_url(f"{server.url}/openapi.json", timeout=10,
                                           headers={"Authorization": f"Bearer {KEY}"})
    loaded.config.phases.coverage.enabled = False
    loaded.config.seed = SEED
    return loaded


real = schemathesis.pytest.from_fixture("real_schema")


@real.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_real_server_no_server_errors(case: schemathesis.Case) -> None:
    # The served model's name, where a body names one: a random name only ever meets the (in-process fuzzed) 404,
    # while this one takes the request through the real tokenizer, chat format, grammar compiler and engine.
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = MODEL
    case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=[not_a_server_error], timeout=60)


def test_real_server_released_every_page(fuzz_server: Server) -> None:
    """After the fuzz run (pytest runs this module's tests in order): no request holds cache pages or an engine
    slot, and the server is still up."""
    health = fuzz_server.wait_idle(timeout=30)
    assert health["pages_used"] == 0, health
    assert fuzz_server.proc.poll() is None
