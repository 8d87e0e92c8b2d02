"""Training data: documents -> tokens -> chunks -> packed varlen micro-batches, in a seeded, resumable order.

Shapes: N = tokens in a micro-batch (all its sequences concatenated), B = sequences in it.

A document is one JSONL record's `text`, or one text file (or, with `split="blank_line"`, one blank-line separated
block of it). Each document becomes `BOS + tokens + EOS` and is cut into chunks of at most `seq_len + 1` tokens that
overlap by one token (the last input of a chunk is the first target of the next). Every chunk is its own sequence of
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


def load_documents(paths: list[str | Path], split: str = "file", text_key: str = "text") -> list[str]:
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
                if not isinstance(rec, dict) or not isinstance(rec.get(text_key), str):
                    raise ValueError(f'{f}:{lineno}: each JSONL record needs a string "{text_key}" field')
                docs.append(rec[text_key])
        else:
            text = f.read_text(encoding="utf-8", errors="replace")
            docs += [b for b in text.split("\n\n") if b.strip()] if split == "blank_line" else [text]
    return [d for d in docs if d.strip()]


def tokenize_documents(tokenizer, docs: list[str], bos_id: int, eos_id: int) -> list[np.ndarray]:
    """`tokenizer` is a `tokenizers.Tokenizer`; special-token strings inside the text are NOT interpreted."""
    out = []
    for enc in tokenizer.encode_batch(docs, add_special_tokens=False):
        out.append(np.asarray([bos_id, *enc.ids, eos_id], dtype=np.int32))
    return out


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
    targets: torch.Tensor  # [N] int64, next token of each input within its sequence
    mtp_targets: torch.Tensor  # [N] int64, the token after that (IGNORE at each sequence's last input)
    positions: torch.Tensor  # [N] int64, position within its own sequence
    seq_lens: list[int]  # len B

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.targets, self.mtp_targets, self.positions)),
                     self.seq_lens)


def make_batch(chunks: list[np.ndarray]) -> Batch:
    ids, tgt, mtp, pos = [], [], [], []
    for c in chunks:
        c = torch.from_numpy(c.astype(np.int64))
        n = len(c) - 1
        ids.append(c[:-1])
        tgt.append(c[1:])
        # MTP (depth 1) predicts the token two ahead: at input i, target c[i + 2]; the chunk's last input has none.
        mtp.append(torch.cat([c[2:], torch.full((1,), IGNORE, dtype=torch.int64)]))
        pos.append(torch.arange(n, dtype=torch.int64))
    return Batch(torch.cat(ids), torch.cat(tgt), torch.cat(mtp), torch.cat(pos), [len(c) - 1 for c in chunks])


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
