"""Training data: documents -> tokens -> chunks -> packed varlen micro-batches, in a seeded, resumable order.

Shapes: N = tokens in a micro-batch (all its sequences concatenated), B = sequences in it.

A document is one JSONL record's `text`, or one text file (or, with `split="blank_line"`, one blank-line separated
block of it). Each document becomes `BOS + tokens + EOS` and is cut into chunks of at most `seq_len + 1` tokens that
overlap by one token (the last input of a chunk is the first target of the next).

Loss masking (chat / SFT data): a JSONL record may instead hold `"segments": [{"text": str, "train": bool}, ...]`,
the document's text in order, each piece marked as trained on or context only (e.g. a rendered conversation whose
assistant replies are the only trained pieces; dsv4.train.chat_data writes such records). Segments are tokenised one
by one, so their borders should sit at special tokens (where the tokenizer splits anyway); such a document gets no
BOS/EOS of its own (its text carries them). Inside a chunk, a context-only token is stored as `-(id + 1)`: it is an
input like any other but never a target (of the next-token or the MTP loss). Every chunk is its own sequence of
the varlen batch, so attention and KV compression never cross a document boundary (report sec. 4.1: sample-level
attention masking) and no padding is spent.

The order is a seeded permutation of the chunks per epoch; the loader's whole state is (epoch, cursor), so a resumed run
sees exactly the batches an uninterrupted run would.

Deliberately not here: streaming corpora larger than memory (everything is tokenised up front; the corpora this is
meant for are a few hundred MB at most) and cross-document packing inside one sequence (it would need a mask).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IGNORE = -100
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text"}
JSON_SUFFIXES = {".jsonl", ".json"}


def iter_files(paths: list[str | Path]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES | JSON_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"training data path {path} does not exist; pass a text/JSONL file or a directory")
    if not files:
        raise FileNotFoundError(f"no .txt/.md/.rst/.py/.jsonl files found under {[str(p) for p in paths]}")
    return files


Document = str | list[tuple[str, bool]]  # plain text, or (text, trained) segments


def _segments(rec: dict, where: str) -> list[tuple[str, bool]]:
    segs = rec["segments"]
    if not isinstance(segs, list) or not segs or not all(
        isinstance(s, dict) and isinstance(s.get("text"), str) and isinstance(s.get("train"), bool) for s in segs
    ):
        raise ValueError(f'{where}: "segments" must be a non-empty list of {{"text": str, "train": bool}} objects')
    return [(s["text"], s["train"]) for s in segs]


def document_text(doc: Document) -> str:
    return doc if isinstance(doc, str) else "".join(t for t, _ in doc)


def load_documents(paths: list[str | Path], split: str = "file", text_key: str = "text") -> list[Document]:
    if split not in {"file", "blank_line"}:
        raise ValueError(f"data split must be 'file' or 'blank_line', got {split!r}")
    docs: list[str] = []
    for f in iter_files(paths):
        if f.suffix in JSON_SUFFIXES:
            # Split the bytes, not the decoded text: a bad byte is then reported with its line, and str.splitlines'
            # extra breaks (U+2028, \x1c, ...) cannot cut a JSON record in two.
            for lineno, raw in enumerate(f.read_bytes().splitlines(), 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(
                        f"{f}:{lineno} is not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                        "re-encode the file as UTF-8 or drop that line"
                    ) from e
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{lineno} is not valid JSON ({e}); JSONL needs one object per line") from e
                if isinstance(rec, dict) and "segments" in rec:
                    docs.append(_segments(rec, f"{f}:{lineno}"))
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get(text_key), str):
                    raise ValueError(
                        f'{f}:{lineno}: each JSONL record needs a string "{text_key}" field (or "segments")'
                    )
                docs.append(rec[text_key])
        else:
            text = f.read_text(encoding="utf-8", errors="replace")
            docs += [b for b in text.split("\n\n") if b.strip()] if split == "blank_line" else [text]
    return [d for d in docs if document_text(d).strip()]


def tokenize_documents(tokenizer, docs: list[Document], bos_id: int, eos_id: int) -> list[np.ndarray]:
    """`tokenizer` is a `tokenizers.Tokenizer`; added-token strings in the text (`<｜User｜>`, ...) become their ids.

    Plain documents get BOS/EOS around them; segment documents are taken as they are, their context-only tokens
    stored as `-(id + 1)`."""
    plain = [d for d in docs if isinstance(d, str)]
    encoded = iter(tokenizer.encode_batch(plain, add_special_tokens=False)) if plain else iter(())
    out = []
    for d in docs:
        if isinstance(d, str):
            out.append(np.asarray([bos_id, *next(encoded).ids, eos_id], dtype=np.int32))
            continue
        pieces = []
        for text, trained in d:
            ids = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)
            pieces.append(ids if trained else -(ids + 1))
        out.append(np.concatenate(pieces))
    return out


def is_masked(tokens: np.ndarray) -> np.ndarray:
    return tokens < 0


def token_ids(tokens: np.ndarray) -> np.ndarray:
    """Ids of a chunk whose context-only tokens are stored as -(id + 1)."""
    return np.where(tokens < 0, -tokens - 1, tokens)


def chunk_documents(docs: list[np.ndarray], seq_len: int) -> list[np.ndarray]:
    """Cut each document into pieces of <= seq_len + 1 tokens, overlapping by one (inputs = piece[:-1])."""
    chunks = []
    for d in docs:
        for start in range(0, max(1, len(d) - 1), seq_len):
            piece = d[start : start + seq_len + 1]
            if len(piece) >= 2:
                chunks.append(piece)
    return chunks


def split_heldout(docs: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic document-level train / held-out split (held-out documents are never trained on)."""
    if not docs:
        return [], []
    rng = np.random.default_rng(seed + 7919)
    n_held = int(round(len(docs) * fraction))
    held = set(rng.permutation(len(docs))[:n_held].tolist())
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


@dataclass
class Batch:
    input_ids: torch.Tensor  # [N] int64
    targets: torch.Tensor  # [N] int64, next token of each input within its sequence (IGNORE where context-only)
    mtp_targets: torch.Tensor  # [N] int64, the token after that (IGNORE at each sequence's last input)
    positions: torch.Tensor  # [N] int64, position within its own sequence
    seq_lens: list[int]  # len B
    next_ids: torch.Tensor  # [N] int64, the next token itself (masked or not): the MTP block's input

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device | str) -> Batch:
        moved = [t.to(device) for t in (self.input_ids, self.targets, self.mtp_targets, self.positions)]
        return Batch(*moved, self.seq_lens, self.next_ids.to(device))


def make_batch(chunks: list[np.ndarray]) -> Batch:
    ids, tgt, mtp, pos, nxt = [], [], [], [], []
    for raw in chunks:
        c = torch.from_numpy(token_ids(raw).astype(np.int64))
        labels = c.masked_fill(torch.from_numpy(is_masked(raw)), IGNORE)  # context-only tokens are never targets
        n = len(c) - 1
        ids.append(c[:-1])
        nxt.append(c[1:])
        tgt.append(labels[1:])
        # MTP (depth 1) predicts the token two ahead: at input i, target c[i + 2]; the chunk's last input has none.
        mtp.append(torch.cat([labels[2:], torch.full((1,), IGNORE, dtype=torch.int64)]))
        pos.append(torch.arange(n, dtype=torch.int64))
    return Batch(torch.cat(ids), torch.cat(tgt), torch.cat(mtp), torch.cat(pos), [len(c) - 1 for c in chunks],
                 torch.cat(nxt))


class PackedLoader:
    """Packs chunks (in a seeded per-epoch order) into micro-batches of at most `tokens_per_batch` input tokens."""

    def __init__(self, chunks: list[np.ndarray], tokens_per_batch: int, seed: int, shuffle: bool = True):
        if not chunks:
            raise ValueError("no training chunks: the data is empty after tokenisation")
        longest = max(len(c) - 1 for c in chunks)
        if longest > tokens_per_batch:
            raise ValueError(
                f"a chunk has {longest} tokens but a micro-batch holds {tokens_per_batch}: "
                "raise tokens_per_batch to at least seq_len"
            )
        self.chunks, self.tokens_per_batch, self.seed, self.shuffle = chunks, tokens_per_batch, seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.chunks))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.chunks))

    def next_batch(self) -> Batch:
        picked, budget = [], self.tokens_per_batch
        while True:
            if self.cursor >= len(self._order):
                if picked:  # an epoch never ends mid-batch with a partial batch from the next epoch
                    break
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            c = self.chunks[self._order[self.cursor]]
            if len(c) - 1 > budget:
                break
            picked.append(c)
            budget -= len(c) - 1
            self.cursor += 1
        return make_batch(picked)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "num_chunks": len(self.chunks)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_chunks"] != len(self.chunks) or state["seed"] != self.seed:
            raise ValueError(
                "the checkpoint's data position does not fit this data: it was saved with "
                f"{state['num_chunks']} chunks / seed {state['seed']}, now {len(self.chunks)} / {self.seed}; "
                "resume with the same data, tokenizer, seq_len and seed"
            )
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)


def eval_batches(chunks: list[np.ndarray], tokens_per_batch: int, max_batches: int | None = None) -> Iterator[Batch]:
    loader = PackedLoader(chunks, tokens_per_batch, seed=0, shuffle=False)
    n = 0
    while loader.cursor < len(chunks) and (max_batches is None or n < max_batches):
        yield loader.next_batch()
        n += 1
