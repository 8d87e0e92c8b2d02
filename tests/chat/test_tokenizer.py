"""The V4 tokenizer: where it loads from, special tokens, and the incremental detokenizer's two promises."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4.chat import encode_messages, load_tokenizer
from dsv4.chat.tokenizer import V4_VOCAB_SIZE, resolve_tokenizer_file
from tests.chat.chat_fixtures import shared_tokenizer, tok  # noqa: F401  (fixture)


def test_official_ids_and_special_tokens(tok) -> None:
    assert len(tok) == V4_VOCAB_SIZE and (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)
    named = {"user": 128803, "assistant": 128804, "think_start": 128821, "think_end": 128822, "dsml": 128825,
             "latest_reminder": 128828, "action": 128829, "title": 128836, "read_url": 128845}
    assert {k: tok.special_ids[k] for k in named} == named
    # spec chat-encoding.md section 7: the thinking-mode prompt of a two-message conversation
    prompt = encode_messages(
        [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 2+2?"}],
        "thinking",
    )
    assert tok.encode(prompt) == [0, 3476, 477, 260, 11502, 22896, 16, 128803, 3085, 344, 223, 20, 13, 20, 33, 128804,
                                  128821]
    assert tok.encode("hi", add_bos=True)[0] == tok.bos_id and tok.encode("hi")[0] != tok.bos_id
    assert tok.token_id("</think>") == 128822
    with pytest.raises(KeyError, match="not a single token"):
        tok.token_id("</thin")


def test_golden_prompts_round_trip(tok) -> None:
    from pathlib import Path

    for path in sorted((Path(__file__).parent / "fixtures").glob("test_output_*.txt")):
        text = path.read_text()
        assert tok.decode(tok.encode(text)) == text


def test_load_paths(tmp_path) -> None:
    official = resolve_tokenizer_file(None)
    with_file = tmp_path / "with_file"
    with_file.mkdir()
    shutil.copy(official, with_file / "tokenizer.json")
    assert resolve_tokenizer_file(with_file) == with_file / "tokenizer.json"
    assert resolve_tokenizer_file(with_file / "tokenizer.json") == with_file / "tokenizer.json"
    bare = tmp_path / "bare_v4"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"vocab_size": V4_VOCAB_SIZE}))
    assert resolve_tokenizer_file(bare) == official
    assert len(load_tokenizer(bare)) == V4_VOCAB_SIZE


def test_load_errors_say_what_to_do(tmp_path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"vocab_size": 32000}))
    with pytest.raises(FileNotFoundError, match="vocab_size=32000.*copy the matching tokenizer.json"):
        load_tokenizer(other)
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor config.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="could not read tokenizer file"):
        load_tokenizer(tmp_path / "broken.json")
    (tmp_path / "other_model.json").write_text(
        json.dumps({"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0, "[UNK]": 1}, "unk_token": "[UNK]"}})
    )
    with pytest.raises(ValueError, match="not a V4 tokenizer"):
        load_tokenizer(tmp_path / "other_model.json")


# Ids drawn from everywhere: multi-byte pieces (split UTF-8 characters), added and special tokens, plain BPE.
IDS = st.lists(
    st.one_of(st.integers(0, V4_VOCAB_SIZE - 1), st.integers(128000, V4_VOCAB_SIZE - 1), st.integers(200, 2000)),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ids=IDS, skip=st.booleans())
def test_incremental_detokenizer_concatenates_to_decode(ids: list[int], skip: bool) -> None:
    tok = shared_tokenizer()
    detok = tok.detokenizer(skip_special_tokens=skip)
    deltas = [detok.add(i) for i in ids] + [detok.finish()]
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=60))
def test_streamed_text_never_shows_broken_characters(text: str) -> None:
    tok = shared_tokenizer()
    detok = tok.detokenizer()
    deltas = [detok.add(i) for i in tok.encode(text)] + [detok.finish()]
    assert "".join(deltas) == text
    if "\ufffd" not in text:
        # a character split over tokens waits for its last byte instead of showing up as U+FFFD
        assert not any("\ufffd" in d for d in deltas)
