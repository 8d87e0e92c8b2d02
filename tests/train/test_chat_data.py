"""The synthetic chat corpus: deterministic, rendered by the official-format encoder, trained only on replies."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from dsv4.chat.encoding import encode_messages
from dsv4.chat.parser import parse_completion
from dsv4.chat.tokenizer import EOS, THINK_END, load_tokenizer
from dsv4.train.chat_data import FAMILIES, TIMEZONES, conversation_record, generate_conversations, main, prompt_cases

DEFAULT = Path(__file__).resolve().parents[2] / "src" / "dsv4" / "assets" / "default"


def test_same_seed_same_records_other_seed_other_records():
    a = [conversation_record(c) for c in generate_conversations(40, seed=3)]
    b = [conversation_record(c) for c in generate_conversations(40, seed=3)]
    c = [conversation_record(c) for c in generate_conversations(40, seed=4)]
    assert json.dumps(a) == json.dumps(b) and json.dumps(a) != json.dumps(c)


def test_records_are_the_encoder_output_and_train_the_replies_as_generated():
    convs = generate_conversations(150, seed=0)
    for conv in convs:
        rec = conversation_record(conv)
        full = encode_messages(conv["messages"], thinking_mode=conv["thinking_mode"], tools=conv["tools"])
        assert "".join(s["text"] for s in rec["segments"]) == full
        pos = 0
        for seg in rec["segments"]:
            if seg["train"]:
                # a trained piece starts where the encoder's generation prompt ends and is one whole reply
                prompt = full[:pos]
                assert prompt.endswith(("<｜Assistant｜><think>", "<｜Assistant｜></think>"))
                assert seg["text"].endswith(EOS) and seg["text"].count(EOS) == 1
                mode = conv["thinking_mode"]
                msg = parse_completion(seg["text"], mode)  # the strict parser reads every reply
                assert (THINK_END in seg["text"]) == (mode == "thinking")
                assert msg["content"] or msg.get("tool_calls")
            pos += len(seg["text"])
    kinds = {(c["thinking_mode"], c["tools"] is not None) for c in convs}
    assert kinds == {("thinking", True), ("thinking", False), ("chat", True), ("chat", False)}


def test_earlier_reasoning_is_dropped_without_tools_and_kept_with_tools():
    convs = generate_conversations(300, seed=1)
    multi = [c for c in convs if c["thinking_mode"] == "thinking" and c["tools"] is None
             and sum(m["role"] == "user" for m in c["messages"]) > 1]
    assert multi
    for conv in multi:
        rec = conversation_record(conv)
        trained = [s["text"] for s in rec["segments"] if s["train"]]
        assert len(trained) == 1  # only the reply after the last user turn keeps its reasoning
        first = next(m for m in conv["messages"] if m["role"] == "assistant")
        context = "".join(s["text"] for s in rec["segments"] if not s["train"])
        assert first["reasoning_content"] + THINK_END not in context
    with_tools = [c for c in convs if c["thinking_mode"] == "thinking" and c["tools"]
                  and all(m.get("reasoning_content") for m in c["messages"] if m["role"] == "assistant")]
    for conv in with_tools:
        n_replies = sum(m["role"] == "assistant" for m in conv["messages"])
        assert sum(s["train"] for s in conversation_record(conv)["segments"]) == n_replies


def test_tool_calls_are_schema_valid_and_come_from_the_request():
    names = {v.name for f in FAMILIES for v in f.variants}
    seen = set()
    for conv in generate_conversations(300, seed=2):
        declared = {t["function"]["name"]: t["function"] for t in conv["tools"] or []}
        for case in prompt_cases(conv):
            calls = case["expected"].get("tool_calls") or []
            request = next(m["content"] for m in reversed(case["messages"]) if m["role"] == "user")
            for call in calls:
                fn = declared[call["function"]["name"]]
                args = json.loads(call["function"]["arguments"])
                jsonschema.validate(args, fn["parameters"])
                for value in args.values():
                    if isinstance(value, str) or value is True:
                        continue
                    assert str(value) in request  # numbers come from the request text too
                for value in (v for v in args.values() if isinstance(v, str)):
                    # a time zone is the one value the request gives indirectly: by its city
                    city = next((c for c, tz in TIMEZONES.items() if tz == value), None)
                    assert value in request or city is not None and city in request
                seen.add(fn["name"])
    assert {"read_file", "list_directory", "run_shell_command", "get_weather"} <= seen and len(seen) > len(names) // 2


def test_segments_tokenize_as_the_whole_text():
    tok = load_tokenizer(DEFAULT).backend
    for conv in generate_conversations(30, seed=5):
        rec = conversation_record(conv)
        whole = tok.encode("".join(s["text"] for s in rec["segments"]), add_special_tokens=False).ids
        pieces = [i for s in rec["segments"] for i in tok.encode(s["text"], add_special_tokens=False).ids]
        assert pieces == whole


def test_cli_mixes_bible_chapters(tmp_path, capsys):
    bible = tmp_path / "kjv.jsonl"
    bible.write_text("".join(json.dumps({"text": f"Genesis {i}\n\n1 In the beginning\n"}) + "\n" for i in range(5)))
    out = tmp_path / "mix.jsonl"
    assert main([str(out), "--conversations", "12", "--seed", "0", "--bible", str(bible), "--bible-chapters", "3"]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 15 and sum("text" in r for r in recs) == 3
    assert main([str(out), "--bible", str(tmp_path / "missing.jsonl")]) == 1
    assert "make_kjv_corpus" in capsys.readouterr().err
