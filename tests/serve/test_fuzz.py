"""Schema fuzzing (schemathesis) of every operation in the server's own OpenAPI document: whatever a client sends,
the answer is never a 5xx. The scripted engine keeps each call to a few milliseconds, so a few hundred generated
requests stay well under a minute; the real model is exercised in test_server.py."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings

from dsv4.chat import load_tokenizer
from dsv4.serve.app import create_app
from dsv4.serve.core import ServingCore

from .fakes import FakeChat, FakeEngine

TOK = load_tokenizer(None)
_engine = FakeEngine(TOK, lambda ids, params: "Hm.</think>Yes.")
_core = ServingCore(_engine, TOK, model_names=["tiny"], max_model_len=512, chat=FakeChat())
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(_core))
# Only the random fuzzing phase, bounded by max_examples: the exhaustive "coverage" phase alone sends ~2000 requests.
schema.config.phases.coverage.enabled = False
schema.config.seed = 1234


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case) -> None:
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
    assert _engine.live == set()  # every request, however it ended, released its (fake) cache page
