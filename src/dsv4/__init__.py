"""dsv4: DeepSeek-V4 on your own hardware."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Lazy top-level names: `import dsv4` stays cheap, and a part that is not importable does not break the others.
_LAZY = {
    "LLM": "dsv4.engine.llm",
    "SamplingParams": "dsv4.engine.sampling",
    "AsyncLLM": "dsv4.engine.async_llm",
    "load_model": "dsv4.model.loader",
    "ModelConfig": "dsv4.config",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dsv4' has no attribute {name!r}")
