from __future__ import annotations

import pytest

from dsv4.chat import Tokenizer, load_tokenizer


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    # Loading the 129280-token vocabulary takes ~1 s; share one instance across the chat tests.
    return load_tokenizer()
