"""A randomly initialised tiny V4 model (real 129280-token vocabulary) decoding under the constraint produces
parseable, schema-valid tool calls and JSON in every seeded run.

The model knows nothing, so every structure in its output comes from the constraint. Decoding is plain step-by-step
sampling with a full forward per step (no cache); a step whose mask allows exactly one token takes it without a
forward (the grammar decides it), which keeps the test within seconds. The schemas bound every free region (enums,
integer ranges, maxLength, maxItems): a random model never chooses to stop a free string by itself.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from dsv4.chat import build_constraint, encode_messages, parse_completion
from dsv4.model.batch import ForwardBatch
from dsv4.model.transformer import Transformer
from tests.chat.chat_fixtures import tok  # noqa: F401  (fixture)
from tests.conftest import make_tiny_config

RUNS = 20
MAX_NEW = 200  # tokens, most of them forced markup taken without a forward

FORECAST = {
    "type": "function",
    "function": {
        "name": "forecast",
        "description": "Weather forecast",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
                "note": {"type": "string", "maxLength": 6},
                "metric": {"type": "boolean"},
            },
            "required": ["city", "days"],
        },
    },
}
ALARM = {
    "type": "function",
    "function": {
        "name": "set_alarm",
        "parameters": {
            "type": "object",
            "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}, "label": {"type": "string", "enum": ["wake", "nap"]}},
            "required": ["hour"],
        },
    },
}
TOOLS = [FORECAST, ALARM]
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo"]},
        "score": {"type": "integer", "minimum": -5, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 1},
        "ok": {"type": "boolean"},
    },
    "required": ["city", "score", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model() -> Transformer:
    cfg = make_tiny_config(vocab_size=129280, num_hidden_layers=2, compress_ratios=[0, 4, 0], num_nextn_predict_layers=0)
    return Transformer(cfg, dtype=torch.float32).init_weights(0).eval()


@torch.no_grad()
def _generate(model, tok, constraint, prompt: str, seed: int) -> str:
    ids = tok.encode(prompt)
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while len(out) < MAX_NEW:
        forced = constraint.jump_forward_string()
        if forced:
            # the grammar alone decides this text: take it without a forward (jump-forward decoding)
            for token in tok.encode(forced):
                assert constraint.accept(token), f"the constraint refused its own forced text {forced!r}"
                out.append(token)
            continue
        mask = constraint.allowed_mask(model.config.vocab_size)  # [V] bool
        batch = ForwardBatch.from_sequences([ids + out], logits_indices=torch.tensor([len(ids) + len(out) - 1]))
        logits = model.forward_batch(batch, None).logits[0].masked_fill(~mask, float("-inf"))  # [V]
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        assert constraint.accept(token), "the constraint refused a token its own mask allowed"
        out.append(token)
        if constraint.is_finished():
            return tok.decode(out)
    raise AssertionError(f"seed {seed}: no EOS within {MAX_NEW} tokens: {tok.decode(out)!r}")


def test_tool_calls_are_parseable_and_schema_valid(model, tok) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    prompt = encode_messages([{"role": "user", "content": "Weather in Oslo, and wake me at 7?"}], "chat")
    for seed in range(RUNS):
        tool_choice = "required" if seed % 2 == 0 else {"type": "function", "function": {"name": "set_alarm"}}
        # NOTE: one call per turn. With parallel calls allowed, a random model may keep choosing "another invoke"
        # forever (the grammar rightly allows it); the two-call form is checked on fixed text in test_constraint.py.
        constraint = build_constraint(tok, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False)
        text = _generate(model, tok, constraint, prompt, seed)
        message = parse_completion(text, "chat")  # strict: raises on anything malformed
        assert message["tool_calls"], text
        for call in message["tool_calls"]:
            name = call["function"]["name"]
            assert len(message["tool_calls"]) == 1 and (name == "set_alarm" or seed % 2 == 0)
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[name])


def test_json_is_parseable_and_schema_valid(model, tok) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}
    prompt = encode_messages([{"role": "user", "content": "Judge Paris."}], "chat")
    for seed in range(RUNS):
        text = _generate(model, tok, build_constraint(tok, response_format=rf), prompt, 1000 + seed)
        message = parse_completion(text, "chat")
        jsonschema.validate(json.loads(message["content"]), SCHEMA)


def test_thinking_mode_reasoning_then_a_valid_call(model, tok) -> None:
    # Reasoning is free: the random model writes some, then (as a real model would) closes it with </think>.
    prompt = encode_messages([{"role": "user", "content": "Wake me at 7."}], "thinking")
    constraint = build_constraint(tok, tools=TOOLS, tool_choice="required", thinking_mode="thinking")
    reasoning = tok.encode("I should set an alarm for seven.")
    for token in reasoning:
        assert constraint.accept(token)
    assert constraint.accept(tok.token_id("</think>"))
    text = _generate(model, tok, constraint, prompt + tok.decode(reasoning) + "</think>", seed=7)
    message = parse_completion("I should set an alarm for seven.</think>" + text, "thinking")
    assert message["reasoning_content"] == "I should set an alarm for seven." and message["tool_calls"]


def test_engine_applies_the_constraint_end_to_end(model, tok) -> None:
    # The contract with the engine: SamplingParams(constraint=c) -> allowed_mask() each step, accept() each token.
    from dsv4 import LLM, SamplingParams

    llm = LLM(model, tokenizer=tok)
    prompt = encode_messages([{"role": "user", "content": "Wake me at 7."}], "chat")
    named = {"type": "function", "function": {"name": "set_alarm"}}
    constraint = build_constraint(tok, tools=TOOLS, tool_choice=named, parallel_tool_calls=False)
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=300, constraint=constraint, skip_special_tokens=False)
    out = llm.generate([prompt], params)[0].outputs[0]
    assert out.finish_reason == "stop" and constraint.is_finished()
    (call,) = parse_completion(out.text, "chat")["tool_calls"]
    assert call["function"]["name"] == "set_alarm"
    jsonschema.validate(json.loads(call["function"]["arguments"]), ALARM["function"]["parameters"])


def test_auto_leaves_content_free_and_constrains_an_opened_block(model, tok) -> None:
    # tool_choice "auto": the content is the model's (nearly every token allowed); once the block is opened, the
    # random model can only finish it as a well-formed, schema-valid call.
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    prompt = encode_messages([{"role": "user", "content": "Weather in Oslo?"}], "chat")
    opened = "Let me check.\n\n<｜DSML｜tool_calls>\n"
    for seed in range(RUNS // 2):
        constraint = build_constraint(tok, tools=TOOLS, tool_choice="auto", parallel_tool_calls=False)
        assert constraint.allowed_mask().float().mean() > 0.98  # free text: special tokens and DSML are out
        assert constraint.accept_text(opened)
        text = opened + _generate(model, tok, constraint, prompt + opened, 2000 + seed)
        message = parse_completion(text, "chat")  # strict
        assert message["content"] == "Let me check." and len(message["tool_calls"]) == 1, text
        call = message["tool_calls"][0]["function"]
        jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])
