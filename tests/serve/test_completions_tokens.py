"""/v1/completions scoring (echo with prompt logprobs, max_tokens 0, vLLM's prompt_logprobs), vLLM's /tokenize,
/detokenize and /version, and 404s for unknown routes, against the scripted engine (its prompt logprobs are made up:
token j of the prompt gets -j/10, with token 7 as the other candidate; the real model's are checked against its
logits in test_agent_server.py)."""

from __future__ import annotations

from typing import Any

import pytest

from dsv4.chat.encoding import encode_messages

from .test_app import MODEL, TOK, make, sse


def test_echo_logprobs_cover_the_prompt_first_null() -> None:
    client, _, _ = make("Paris")
    prompt = "The capital of France is"
    ids = TOK.encode(prompt)
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "echo": True, "logprobs": 1,
                                             "max_tokens": 1})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == prompt + "Paris"
    assert lp["tokens"] == [TOK.decode([t]) for t in ids] + ["Paris"]
    assert lp["token_logprobs"] == [None] + [-j / 10 for j in range(1, len(ids))] + [-0.5]
    assert lp["top_logprobs"][0] is None and lp["top_logprobs"][1] == {TOK.decode([ids[1]]): -0.1, "%": -2.0}
    assert lp["text_offset"] == [len(TOK.decode(ids[:j])) for j in range(len(ids) + 1)]
    # without echo nothing about the prompt
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "logprobs": 1, "max_tokens": 1})
    assert r.json()["choices"][0]["logprobs"]["tokens"] == ["Paris"]


def test_max_tokens_zero_scores_batched_token_prompts() -> None:
    """lm-eval's loglikelihood request with max_tokens 0: token-id prompts in one request, nothing generated."""
    client, engine, _ = make("Paris")
    prompts = [[5, 6, 8, 9], [10, 11]]
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompts, "echo": True, "logprobs": 1,
                                             "max_tokens": 0, "temperature": 0, "seed": 1234})
    assert r.status_code == 200, r.text
    body = r.json()
    for choice, ids in zip(body["choices"], prompts):
        assert choice["text"] == TOK.decode(ids) and choice["finish_reason"] == "length"
        assert choice["logprobs"]["token_logprobs"] == [None] + [-j / 10 for j in range(1, len(ids))]
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] == 6
    assert engine.live == set()
    # max_tokens 0 without echo: an empty completion
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 0})
    assert r.json()["choices"][0]["text"] == ""


def test_vllm_prompt_logprobs_and_streamed_echo() -> None:
    client, _, _ = make("Paris")
    ids = [5, 6, 8]
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ids, "prompt_logprobs": 1, "max_tokens": 1})
    plp = r.json()["choices"][0]["prompt_logprobs"]
    assert plp[0] is None
    assert plp[1] == {"6": {"logprob": -0.1, "rank": 1, "decoded_token": TOK.decode([6])},
                      "7": {"logprob": -2.0, "rank": 2, "decoded_token": TOK.decode([7])}}
    chunks = sse(client.post("/v1/completions", json={"model": MODEL, "prompt": ids, "echo": True, "logprobs": 0,
                                                      "max_tokens": 2, "stream": True}))
    first = chunks[0]["choices"][0]
    assert first["text"] == TOK.decode(ids) and first["logprobs"]["token_logprobs"] == [None, -0.1, -0.2]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == TOK.decode(ids) + "Paris"


def test_tokenize_detokenize_version() -> None:
    client, _, _ = make(api_key="k")
    key = {"Authorization": "Bearer k"}
    assert client.post("/tokenize", json={"prompt": "Hello"}).status_code == 401  # behind the key like /v1/
    r = client.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}, headers=key).json()
    assert r == {"count": 2, "max_model_len": 4096, "tokens": TOK.encode("Hello world"),
                 "token_strs": ["Hello", " world"]}
    msgs = [{"role": "user", "content": "Hi"}]
    r = client.post("/tokenize", json={"model": MODEL, "messages": msgs, "thinking": {"type": "disabled"}},
                    headers=key).json()
    assert r["tokens"] == TOK.encode(encode_messages(msgs, thinking_mode="chat"))
    assert client.post("/detokenize", json={"tokens": r["tokens"]}, headers=key).json() == {
        "prompt": encode_messages(msgs, thinking_mode="chat")}
    bad = client.post("/detokenize", json={"tokens": [10**9]}, headers=key)
    assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]
    assert client.post("/tokenize", json={"model": "nope", "prompt": "x"}, headers=key).status_code == 404
    assert client.post("/tokenize", json={}, headers=key).status_code == 400
    assert client.get("/version").json() == {"version": "0.1.0"}


@pytest.mark.parametrize("path, anthropic", [("/v1/nothing", False), ("/nothing", False), ("/v1/messages/x", True)])
def test_unknown_routes_are_404_not_found(path: str, anthropic: bool) -> None:
    client, _, _ = make()
    r = client.post(path, json={})
    assert r.status_code == 404
    body: Any = r.json()
    if anthropic:
        assert body["error"]["type"] == "not_found_error"
    else:
        assert body["error"]["code"] == "not_found" and "no such endpoint" in body["error"]["message"]
    r = client.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_server_default_thinking_and_any_model_name() -> None:
    """`dsv4 serve --thinking disabled --accept-any-model-name`: requests that do not choose get chat mode (asking for
    an effort or thinking still turns it on), and any model name is this model."""
    from fastapi.testclient import TestClient

    from dsv4.serve.app import build_parser, create_app
    from dsv4.serve.core import ServingCore

    from .fakes import FakeChat, FakeEngine
    from .test_responses import recording

    args = build_parser().parse_args(["--thinking", "disabled", "--accept-any-model-name"])
    assert args.thinking == "disabled" and args.accept_any_model_name
    fn, prompts = recording("Paris.")
    core = ServingCore(FakeEngine(TOK, fn), TOK, model_names=[MODEL], max_model_len=4096, chat=FakeChat(),
                       default_thinking=False, accept_any_model=True)
    client = TestClient(create_app(core))
    user = [{"role": "user", "content": "Q"}]
    for path, body in [("/v1/chat/completions", {"messages": user}), ("/v1/messages", {"messages": user,
                                                                                       "max_tokens": 9}),
                       ("/v1/responses", {"input": "Q"})]:
        r = client.post(path, json={"model": "gpt-5.2-codex", **body})
        assert r.status_code == 200 and r.json()["model"] == "gpt-5.2-codex", r.text
        assert prompts[-1].endswith("<｜Assistant｜></think>")
    client.post("/v1/chat/completions", json={"model": MODEL, "messages": user, "reasoning_effort": "high"})
    assert prompts[-1].endswith("<｜Assistant｜><think>")
    client.post("/v1/messages", json={"model": MODEL, "messages": user, "max_tokens": 9,
                                      "thinking": {"type": "adaptive"}})
    assert prompts[-1].endswith("<｜Assistant｜><think>")
