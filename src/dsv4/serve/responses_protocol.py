"""Request bodies of the OpenAI Responses API (`POST /v1/responses`), as pydantic models.

Lenient on unknown fields and strict on the types of known ones, like protocol.py. Input items and tools are open
models (one class each, every type's fields optional): responses.py checks the fields each `type` needs, so an item
type this server does not handle is a 400 that names it rather than a wall of union-validation errors.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from dsv4.serve.protocol import ReasoningEffort, _Body, _Request


class InputContentPart(_Body):
    type: str  # input_text | output_text | refusal | summary_text | reasoning_text | input_image | input_file
    text: str | None = None
    refusal: str | None = None


class ToolSpec(_Body):
    type: str  # function | namespace | custom | hosted types (web_search, file_search, ...)
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    tools: list[ToolSpec] | None = None  # namespace members


class InputItem(_Body):
    """One entry of `input`: a message (with or without `type: "message"`), a function_call, a function_call_output,
    a reasoning item passed back, a custom tool call / output, or additional_tools (more tools from here on)."""

    type: str | None = None
    id: str | None = None
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[InputContentPart] | None = None
    # function_call / custom_tool_call
    call_id: str | None = None
    name: str | None = None
    namespace: str | None = None
    arguments: str | None = None
    input: str | None = None
    # function_call_output / custom_tool_call_output
    output: str | list[InputContentPart] | None = None
    # reasoning
    summary: list[InputContentPart] | None = None
    encrypted_content: str | None = None
    status: str | None = None
    # additional_tools
    tools: list[ToolSpec] | None = None


class ToolChoiceObject(_Body):
    type: str  # function | custom | allowed_tools | hosted tool types
    name: str | None = None
    mode: Literal["auto", "required"] | None = None
    tools: list[dict[str, Any]] | None = None


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(_Body):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(_Body):
    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(_Request):
    model: str
    input: str | list[InputItem] = Field(default_factory=list)
    instructions: str | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceObject | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    include: list[str] | None = None
    store: bool | None = True
    previous_response_id: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    stream: bool | None = False
    background: bool | None = None
    conversation: Any = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
