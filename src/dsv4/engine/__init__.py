"""The inference engine: continuous batching over V4's hybrid cache (see docs/contracts.md, Engine section)."""

from __future__ import annotations

from dsv4.engine.async_llm import AsyncLLM
from dsv4.engine.config import EngineConfig
from dsv4.engine.llm import LLM, LLMEngine
from dsv4.engine.request import CompletionOutput, RequestOutput
from dsv4.engine.sampling import SamplingParams

__all__ = ["LLM", "AsyncLLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]
