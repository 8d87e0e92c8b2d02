"""Shared fixtures of the chat tests (imported by name; a tests/chat/conftest.py would shadow tests/conftest.py's
`from conftest import ...` used by other areas)."""

from __future__ import annotations

import functools

import pytest

from dsv4.chat import Tokenizer, load_tokenizer


@functools.cache
def shared_tokenizer() -> Tokenizer:
    # Loading the 129280-token vocabulary takes ~1 s, and xgrammar caches its vocabulary info per instance.
    return load_tokenizer()


@pytest.fixture
def tok() -> Tokenizer:
    return shared_tokenizer()
