"""Agent and evaluation clients against real `dsv4 serve` processes on loopback.

* The bundled default model (trained; Bible-flavoured text): the openai SDK's `responses.create` and
  `responses.stream`, and lm-eval's `local-completions` loglikelihood request, whose scores must equal those computed
  directly from the model's logits.
* A tiny random checkpoint with the real V4 vocabulary (prefill of a 10K-40K token prompt in seconds): the real
  request bodies of Codex CLI and Claude Code, with each client's expectations (Claude Code's length-error retry,
  the events each one reads, in order).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

from .test_server import KEY, Server
from .tiny import tiny_config

CLIENTS = Path(__file__).parent / "clients"


class Proc(Server):
    """A started `dsv4 serve` (test_server.Server, ready on return) with a keyed POST."""

    def __init__(self, log: Path, *args: str) -> None:
        super().__init__(log, *args)
        try:
            self.wait_ready()
        except RuntimeError:
            self.close()
            raise

    def post(self, path: str, body: dict, timeout: float = 300) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=timeout)


@pytest.fixture(scope="module")
def bundled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    srv = Proc(tmp_path_factory.mktemp("bundled") / "server.log", "--served-model-name", "default",
               "--max-model-len", "2048", "--max-num-seqs", "8")
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    from dsv4.model import checkpoint_io
    from dsv4.model.transformer import Transformer

    root = tmp_path_factory.mktemp("tiny")
    model = Transformer(tiny_config(max_position_embeddings=65536), dtype=torch.float32).init_weights(0)
    checkpoint_io.save_checkpoint(root / "ckpt", model.state_dict(), model.config, dtype=torch.bfloat16)
    # 40000 tokens: Claude Code's prompt fits, its max_tokens of 32000 on top does not (the retry path)
    # --accept-any-model-name: Claude Code and Codex send their own model names unless configured otherwise
    srv = Proc(root / "server.log", "--model", str(root / "ckpt"), "--served-model-name", "default",
               "--dtype", "float32", "--max-model-len", "40000", "--max-num-seqs", "4", "--accept-any-model-name")
    yield srv
    srv.close()


# ---- the bundled model --------------------------------------------------------------------------------------------
def test_openai_sdk_responses_streamed_and_not(bundled: Proc) -> None:
    oai = openai.OpenAI(base_url=f"{bundled.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    # the bundled model answers this greeting in content, in more than 4 tokens ("Good morning! How can I help?")
    kw = dict(model="default", input="Say hello.", instructions="You are a helpful assistant.", temperature=0,
              max_output_tokens=4, reasoning={"effort": "none"})
    r = oai.responses.create(**kw)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert [o.type for o in r.output] == ["message"] and r.output_text and r.usage.output_tokens == 4
    # (the SDK's `responses.stream` helper only finishes on response.completed, so read the raw events here; the
    # helper itself is exercised on completed responses in test_responses.py)
    evs = list(oai.responses.create(**kw, stream=True))
    kinds = [ev.type for ev in evs]
    final = evs[-1].response
    assert final.output_text == r.output_text  # greedy: the stream and the response agree
    assert kinds[0] == "response.created" and kinds[-1] == "response.incomplete"
    assert "".join(ev.delta for ev in evs if ev.type == "response.output_text.delta") == r.output_text
    assert final.usage.input_tokens_details.cached_tokens >= 0
    # thinking (the default): reasoning streams as reasoning_text, and comes back sealed when asked for
    r = oai.responses.create(model="default", input="And God said", max_output_tokens=12, temperature=0,
                             include=["reasoning.encrypted_content"])
    assert r.output[0].type == "reasoning" and r.output[0].encrypted_content.startswith("dsv4r1.")
    follow = oai.responses.create(model="default", previous_response_id=r.id, input="Go on", max_output_tokens=4)
    assert follow.previous_response_id == r.id and follow.usage.input_tokens > r.usage.input_tokens


def _lm_eval_parse_logprobs(choice: dict, ctxlen: int) -> tuple[float, bool]:
    """lm-eval's TemplateAPI.parse_logprobs for `local-completions` (lm_eval/models/openai_completions.py): the
    continuation is token_logprobs[ctxlen:-1] (the last entry is the one generated token)."""
    lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    return sum(lps), all(tok == max(top.values()) for tok, top in zip(lps, tops))


def test_lm_eval_loglikelihoods_equal_the_models_logits(bundled: Proc) -> None:
    from dsv4 import load_model
    from dsv4.chat import load_tokenizer
    from dsv4.cli import default_model_path

    tok = load_tokenizer(default_model_path())
    pairs = [("In the beginning God created", " the heaven and the earth."),
             ("And the LORD spake unto Moses, saying,", " Speak unto the children of Israel"),
             ("In the beginning God created", " a large language model.")]
    inputs, ctxlens = [], []
    for context, continuation in pairs:
        ctx, cont = tok.encode(context), tok.encode(continuation)
        inputs.append(ctx + cont)
        ctxlens.append(len(ctx))
    # lm-eval's request: the batch as token lists, one generated token, echo with logprobs 1
    r = bundled.post("/v1/completions", {"model": "default", "prompt": inputs, "temperature": 0, "max_tokens": 1,
                                         "logprobs": 1, "seed": 1234, "echo": True})
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    model = load_model(default_model_path(), dtype=torch.float32)
    for choice, ids, ctxlen in zip(choices, inputs, ctxlens):
        score, greedy = _lm_eval_parse_logprobs(choice, ctxlen)
        with torch.inference_mode():
            lp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)  # [S, V]
        want = sum(lp[j - 1, ids[j]].item() for j in range(ctxlen, len(ids)))
        want_greedy = all(lp[j - 1].argmax().item() == ids[j] for j in range(ctxlen, len(ids)))
        assert math.isclose(score, want, abs_tol=1e-3), (score, want)
        assert greedy == want_greedy
        assert choice["logprobs"]["token_logprobs"][0] is None
    # the newer request shape (max_tokens 0): the same scores, nothing generated
    r0 = bundled.post("/v1/completions", {"model": "default", "prompt": inputs, "temperature": 0, "max_tokens": 0,
                                          "logprobs": 1, "echo": True}).json()
    for c0, c1, ctxlen in zip(sorted(r0["choices"], key=lambda c: c["index"]), choices, ctxlens):
        assert c0["logprobs"]["token_logprobs"] == pytest.approx(c1["logprobs"]["token_logprobs"][:-1], abs=1e-4)
    assert r0["usage"]["completion_tokens"] == 0
    # the true continuation scores higher than the made-up one
    assert _lm_eval_parse_logprobs(choices[0], ctxlens[0])[0] > _lm_eval_parse_logprobs(choices[2], ctxlens[2])[0]


# ---- real client bodies on the tiny model -------------------------------------------------------------------------
def _events(resp: httpx.Response) -> list[tuple[str, dict]]:
    out, name = [], None
    for line in resp.text.splitlines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            out.append((name, json.loads(line[6:])))
    return out


@pytest.mark.slow
def test_codex_cli_body(tiny: Proc) -> None:
    body = json.loads((CLIENTS / "codex-0.171.0-responses.json").read_text())
    r = tiny.post("/v1/responses", {**body, "max_output_tokens": 24})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text[:500]
    evs = _events(r)
    kinds = [k for k, _ in evs]
    # what Codex reads: response.created first, output items added then done, one terminal event with usage
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert all(k == d["type"] for k, d in evs)
    assert [d["sequence_number"] for _, d in evs] == list(range(len(evs)))
    added = [d["item"]["id"] for k, d in evs if k == "response.output_item.added"]
    done = [d["item"] for k, d in evs if k == "response.output_item.done"]
    assert added == [d["id"] for d in done]
    final = evs[-1][1]["response"]
    assert final["usage"]["input_tokens"] > 5000 and final["usage"]["output_tokens"] == 24
    for item in done:
        if item["type"] == "reasoning":
            assert item["encrypted_content"].startswith("dsv4r1.")  # include: ["reasoning.encrypted_content"]
    # the next turn, as Codex sends it with store=false: the whole history with the output items passed back
    turn2 = {**body, "input": body["input"] + done + [{"type": "message", "role": "user",
                                                       "content": [{"type": "input_text", "text": "Go on."}]}],
             "max_output_tokens": 8, "stream": False}
    r2 = tiny.post("/v1/responses", turn2).json()
    assert r2["status"] == "incomplete" and r2["usage"]["input_tokens"] > final["usage"]["input_tokens"]
    # the first turn's prompt is reused from the prefix cache
    assert r2["usage"]["input_tokens_details"]["cached_tokens"] > 5000


CONTEXT_LIMIT = re.compile(r"input length and `max_tokens` exceed context limit: (\d+) \+ (\d+) > (\d+)")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["claude-code-2.1.197-messages-default.json",
                                  "claude-code-2.1.197-messages-sonnet.json"])
def test_claude_code_body(tiny: Proc, name: str) -> None:
    body = json.loads((CLIENTS / name).read_text())
    r = tiny.post("/v1/messages", {**body, "max_tokens": 32000})
    assert r.status_code == 400, r.text[:500]
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    prompt, max_tokens, limit = map(int, CONTEXT_LIMIT.search(err["error"]["message"]).groups())
    assert (max_tokens, limit) == (32000, 40000)
    # Claude Code's retry: max_tokens lowered to what fits (it keeps a margin; 16 is plenty here)
    r = tiny.post("/v1/messages", {**body, "max_tokens": min(16, limit - prompt)})
    assert r.status_code == 200, r.text[:500]
    evs = _events(r)
    kinds = [k for k, _ in evs]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert all(k == d["type"] for k, d in evs)
    assert evs[0][1]["message"]["usage"]["input_tokens"] == prompt
    starts = [d["index"] for k, d in evs if k == "content_block_start"]
    stops = [d["index"] for k, d in evs if k == "content_block_stop"]
    assert starts == stops == list(range(len(starts))) and starts
    assert evs[-2][1]["delta"]["stop_reason"] in ("max_tokens", "end_turn", "tool_use")
