from __future__ import annotations

import json

import numpy as np
import pytest

from dsv4.train.data import IGNORE, PackedLoader, chunk_documents, load_documents, make_batch, split_heldout
from dsv4.train.tokenizer_train import official_special_tokens, train_tokenizer


def test_load_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("para one\n\npara two\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "doc b"}) + "\n\n" + json.dumps({"text": "doc c"}) + "\n")
    assert load_documents([tmp_path]) == ["para one\n\npara two\n", "doc b", "doc c"]
    assert load_documents([tmp_path / "a.txt"], split="blank_line") == ["para one", "para two\n"]
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match='"text" field'):
        load_documents([tmp_path / "bad.jsonl"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents([tmp_path / "missing"])


def test_chunks_overlap_by_one_and_cover_document():
    doc = np.arange(23, dtype=np.int32)
    chunks = chunk_documents([doc], seq_len=8)
    assert [len(c) for c in chunks] == [9, 9, 7]
    # consecutive chunks share one token, so every next-token pair of the document is trained exactly once
    pairs = [(int(a), int(b)) for c in chunks for a, b in zip(c[:-1], c[1:])]
    assert pairs == [(i, i + 1) for i in range(22)]


def test_batch_targets_stay_inside_each_sequence():
    b = make_batch([np.array([5, 6, 7, 8]), np.array([9, 10, 11])])
    assert b.seq_lens == [3, 2]
    assert b.input_ids.tolist() == [5, 6, 7, 9, 10]
    assert b.targets.tolist() == [6, 7, 8, 10, 11]
    assert b.mtp_targets.tolist() == [7, 8, IGNORE, 11, IGNORE]
    assert b.positions.tolist() == [0, 1, 2, 0, 1]


def test_loader_packs_deterministically_and_resumes():
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 50, size=rng.integers(2, 17)).astype(np.int32) for _ in range(40)]
    a = PackedLoader(chunks, tokens_per_batch=32, seed=3)
    seq = [a.next_batch() for _ in range(30)]  # crosses several epochs
    assert all(b.num_tokens <= 32 for b in seq)
    resumed = PackedLoader(chunks, tokens_per_batch=32, seed=3)
    for _ in range(11):
        resumed.next_batch()
    state = resumed.state_dict()
    again = PackedLoader(chunks, tokens_per_batch=32, seed=3)
    again.load_state_dict(state)
    for i in range(11, 30):
        assert again.next_batch().input_ids.tolist() == seq[i].input_ids.tolist()
    other = PackedLoader(chunks, tokens_per_batch=32, seed=4)
    assert [other.next_batch().input_ids.tolist() for _ in range(3)] != [s.input_ids.tolist() for s in seq[:3]]


def test_epoch_covers_every_chunk_once():
    chunks = [np.full(3 + i % 5, i, dtype=np.int32) for i in range(25)]
    loader = PackedLoader(chunks, tokens_per_batch=10, seed=1)
    seen = []
    while loader.epoch == 0 and loader.cursor < 25:
        b = loader.next_batch()
        starts = np.cumsum([0] + b.seq_lens[:-1])
        seen += [int(b.input_ids[s]) for s in starts]
    assert sorted(seen) == list(range(25))


def test_heldout_split_is_disjoint():
    docs = [f"d{i}" for i in range(20)]
    tr, ho = split_heldout(docs, 0.1, seed=0)
    assert len(ho) == 2 and not set(tr) & set(ho) and sorted(tr + ho) == sorted(docs)


def test_tokenizer_keeps_every_v4_special_token():
    texts = ["In the beginning God created the heaven and the earth."] * 20
    tok = train_tokenizer(texts, vocab_size=1900)
    specials = official_special_tokens()
    assert tok.token_to_id("<｜begin▁of▁sentence｜>") == 0 and tok.token_to_id("<｜end▁of▁sentence｜>") == 1
    for s in ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "｜DSML｜", "<｜latest_reminder｜>"]:
        assert s in specials
        assert tok.encode(f"hi{s}there", add_special_tokens=False).tokens.count(s) == 1
    assert len({tok.token_to_id(s) for s in specials}) == len(specials)
    ids = tok.encode("<｜User｜>In the beginning", add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == "<｜User｜>In the beginning"


def test_segment_records_train_only_marked_text(tmp_path):
    from dsv4.train.data import tokenize_documents

    rec = {"segments": [{"text": "<｜User｜>hi<｜Assistant｜></think>", "train": False},
                        {"text": "hello there<｜end▁of▁sentence｜>", "train": True}]}
    (tmp_path / "c.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps({"text": "plain doc"}) + "\n")
    docs = load_documents([tmp_path / "c.jsonl"])
    assert docs == [[("<｜User｜>hi<｜Assistant｜></think>", False), ("hello there<｜end▁of▁sentence｜>", True)],
                    "plain doc"]
    tok = train_tokenizer(["hello there plain doc hi"] * 20, vocab_size=1900)
    seg_doc, plain = tokenize_documents(tok, docs, bos_id=0, eos_id=1)
    ctx = tok.encode("<｜User｜>hi<｜Assistant｜></think>", add_special_tokens=False).ids
    reply = tok.encode("hello there<｜end▁of▁sentence｜>", add_special_tokens=False).ids
    assert seg_doc.tolist() == [-(i + 1) for i in ctx] + reply  # no BOS/EOS added: the text carries them
    assert plain[0] == 0 and plain[-1] == 1
    b = make_batch([seg_doc])
    ids = ctx + reply
    assert b.input_ids.tolist() == ids[:-1]
    assert b.next_ids.tolist() == ids[1:]  # the MTP block reads the true next token, masked or not
    # targets: only the reply's tokens (the first reply token is the target of the last context token)
    assert b.targets.tolist() == [IGNORE] * (len(ctx) - 1) + reply
    assert b.mtp_targets.tolist() == [IGNORE] * (len(ctx) - 2) + reply + [IGNORE]


def test_bad_segments_record_says_what_to_fix(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"segments": [{"text": "x"}]}) + "\n")
    with pytest.raises(ValueError, match='"train": bool'):
        load_documents([tmp_path / "bad.jsonl"])
