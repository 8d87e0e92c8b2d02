"""ChatPrompt: a rendered V4 prompt that remembers which of its text the encoder wrote and which came from the messages.

The V4 control tokens (`<｜User｜>`, `<｜end▁of▁sentence｜>`, `</think>`, `｜DSML｜`, ...) are ordinary strings in the
prompt text, and the tokenizer turns any occurrence of them into the control token. Text from a client, a web page
or a tool result may contain those strings, and must not be able to end a turn or open a tool call. So the encoder
builds its prompt from two kinds of pieces: `ctrl` (its own template text and control tokens) and `data` (message
content, reasoning, tool schemas, call arguments, tool results); `Tokenizer.encode_prompt` makes control tokens
only from the first kind and encodes the second as plain text. `.text` is the plain string, byte-identical to what
the official encoder writes.

Deliberately not here: tokenization (tokenizer.py) and the rendering rules (encoding.py).
"""

from __future__ import annotations


class ChatPrompt:
    __slots__ = ("pieces",)

    def __init__(self, pieces: list[tuple[str, bool]] | None = None) -> None:
        self.pieces: list[tuple[str, bool]] = [p for p in pieces or [] if p[0]]  # (text, written by the encoder)

    def ctrl(self, text: str) -> ChatPrompt:
        """Append encoder-written text: its control-token strings become control tokens."""
        if text:
            self.pieces.append((text, True))
        return self

    def data(self, text: str) -> ChatPrompt:
        """Append text from the messages: it is always encoded as plain text."""
        if text:
            self.pieces.append((text, False))
        return self

    def extend(self, other: ChatPrompt) -> ChatPrompt:
        self.pieces += other.pieces
        return self

    def join(self, parts: list[ChatPrompt], sep: str) -> ChatPrompt:
        """Append `parts` separated by the encoder-written `sep`."""
        for i, part in enumerate(parts):
            if i:
                self.ctrl(sep)
            self.extend(part)
        return self

    def __add__(self, other: ChatPrompt) -> ChatPrompt:
        if not isinstance(other, ChatPrompt):
            return NotImplemented  # a plain str has no trust level: say which with .ctrl / .data
        return ChatPrompt(self.pieces + other.pieces)

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.pieces)

    def __str__(self) -> str:
        return self.text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChatPrompt) and self.pieces == other.pieces

    def __repr__(self) -> str:
        return f"ChatPrompt({self.pieces!r})"
