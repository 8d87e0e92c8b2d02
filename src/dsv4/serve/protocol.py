"""Request and response bodies of the OpenAI and Anthropic HTTP APIs, as pydantic models.

Like the real APIs, requests are lenient about fields they do not know (an SDK newer than this server must still
work) and strict about the types of the fields they do know (`"temperature": "hot"` is a 400, not a coercion).
Responses are built as plain dicts by openai.py / anthropic.py; the models here describe only what the server reads,
plus the few response shapes the OpenAPI document advertises.

This module deliberately holds no translation logic: turning a request into V4 chat messages lives in openai.py and
anthropic.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dsv4.serve.validate import check_text

# NOTE: strict=True makes "1" an error for an int field (as the real APIs do); ints are still accepted for floats.
_LENIENT = ConfigDict(extra="allow", strict=True)


class _Body(BaseModel):
    model_config = _LENIENT


class _Request(_Body):
    """A whole request body. Before any field is read, every string in it must be valid Unicode: a lone surrogate
    (`\\ud800`) is a 400 naming its field (validate.check_text raises the server's own error, which pydantic lets
    through), never a tokenizer crash or an error response that cannot be encoded."""

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        check_text(data)
        return data


# ---------------------------------------------------------------------------------------------------------------
# OpenAI Chat Completions
# ---------------------------------------------------------------------------------------------------------------


class OpenAIFunction(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class OpenAITool(_Body):
    type: Literal["function"] = "function"
    function: OpenAIFunction


class OpenAIToolCallFunction(_Body):
    name: str
    arguments: str | None = ""  # null (some clients send it for a call without arguments) means "{}"


class OpenAIToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: OpenAIToolCallFunction


class OpenAIContentPart(_Body):
    type: str
    text: str | None = None


class OpenAIMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[OpenAIContentPart] | None = None
    name: str | None = None
    # assistant turns: DeepSeek's reasoning field and earlier tool calls
    reasoning_content: str | None = None
    tool_calls: list[OpenAIToolCall] | None = None
    # tool turns
    tool_call_id: str | None = None


class NamedToolChoiceFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedToolChoiceFunction


class JSONSchemaSpec(_Body):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None


class StreamOptions(_Body):
    include_usage: bool | None = None


class ThinkingToggle(_Body):
    """DeepSeek's extra body field `thinking` (OpenAI format); also Anthropic's `thinking` (with budget_tokens)."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=0)


# OpenAI's documented efforts plus DeepSeek's "max"; "minimal"/"low"/"medium" map to high, "xhigh" to max, as
# DeepSeek's API does. Any other string is accepted too and means the default effort (openai.thinking_of): an SDK
# newer than this server may send an effort this server does not know yet, and that must not fail the request.
ReasoningEffort = str


class ChatCompletionRequest(_Request):
    model: str
    messages: list[OpenAIMessage] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    n: int | None = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI documents
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    logit_bias: dict[str, float] | None = None
    tools: list[OpenAITool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: ReasoningEffort | None = None
    thinking: ThinkingToggle | None = None
    user: str | None = None


class CompletionRequest(_Request):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # OpenAI's legacy endpoint defaults to 16 tokens; 0 with echo scores a prompt (lm-eval's loglikelihood)
    max_tokens: int | None = Field(default=16, ge=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    n: int | None = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI documents
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool | None = False
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)  # vLLM's extension
    best_of: int | None = Field(default=None, ge=1, le=16)
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dsv4"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------------------------------------------------
# Anthropic Messages
# ---------------------------------------------------------------------------------------------------------------


class AnthropicBlock(_Body):
    """One content block. Which fields matter depends on `type` (text, thinking, redacted_thinking, tool_use,
    tool_result, image, document); the translation in anthropic.py checks them, so one open model keeps the OpenAPI
    document small and unknown block types a clear 400 instead of a schema error."""

    type: str
    text: str | None = None
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[AnthropicBlock] | None = None
    is_error: bool | None = None


class AnthropicMessage(_Body):
    # "system" in the middle of `messages` is what Claude Code sends (system reminders); anthropic.py places it
    role: Literal["user", "assistant", "system"]
    content: str | list[AnthropicBlock]


class AnthropicTool(_Body):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None


class AnthropicToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class AnthropicOutputFormat(_Body):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class AnthropicOutputConfig(_Body):
    effort: ReasoningEffort | None = None
    format: AnthropicOutputFormat | None = None  # structured output (LangChain's ChatAnthropic sends it)


class MessagesRequest(_Request):
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[AnthropicBlock] | None = None
    stream: bool | None = False
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: ThinkingToggle | None = None
    output_config: AnthropicOutputConfig | None = None
    metadata: dict[str, Any] | None = None


class CountTokensRequest(_Request):
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[AnthropicBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: ThinkingToggle | None = None
    output_config: AnthropicOutputConfig | None = None


class CountTokensResponse(BaseModel):
    input_tokens: int
