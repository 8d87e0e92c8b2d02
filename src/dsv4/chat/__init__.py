"""The DeepSeek-V4 chat format: tokenizer, prompt encoding, output parsing, streaming and constrained decoding."""

from __future__ import annotations

from .constraint import Constraint, build_constraint
from .encoding import encode_chat_prompt, encode_messages
from .parser import parse_completion
from .prompt import ChatPrompt
from .stream import Delta, StreamParser
from .tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

__all__ = [
    "ChatPrompt",
    "Constraint",
    "Delta",
    "IncrementalDetokenizer",
    "StreamParser",
    "Tokenizer",
    "build_constraint",
    "encode_chat_prompt",
    "encode_messages",
    "load_tokenizer",
    "parse_completion",
]
