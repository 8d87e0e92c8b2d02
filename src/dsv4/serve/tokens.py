"""vLLM's utility endpoints: `POST /tokenize`, `POST /detokenize`, `GET /version`, in vLLM's request and response
shapes (clients such as lm-eval's tokenizer-less mode, aider's token counts and dashboards call them).

`/tokenize` takes a plain `prompt` or chat `messages` (then rendered exactly as /v1/chat/completions renders them,
thinking, tools and reasoning_effort included). The V4 tokenizer adds no BOS of its own (`add_bos_token: false`; the
chat format writes BOS into the prompt), so `add_special_tokens` changes nothing for a plain prompt.

Deliberately not here: the vLLM-only `/pooling`, `/score` and `/rerank` endpoints.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from dsv4 import __version__
from dsv4.serve import openai as openai_api
from dsv4.serve.core import ServeError
from dsv4.serve.protocol import ChatCompletionRequest, OpenAIMessage, OpenAITool, ReasoningEffort, ThinkingToggle, _Body



class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[OpenAIMessage] | None = None
    tools: list[OpenAITool] | None = None
    thinking: ThinkingToggle | None = None
    reasoning_effort: ReasoningEffort | None = None
    add_special_tokens: bool | None = True
    add_generation_prompt: bool | None = True
    return_token_strs: bool | None = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int] = Field(min_length=0)


def register(app: Any, core: Any) -> None:
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        if body.model is not None:
            core.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ServeError("invalid_request", "Send either `prompt` (text) or `messages` (a chat), not both or "
                             "neither.", param="prompt")
        if body.messages is not None:
            if body.add_generation_prompt is False:
                raise ServeError("invalid_request", "add_generation_prompt=false is not supported: the V4 chat format "
                                 "always ends a user turn with the assistant's generation prompt.",
                                 param="add_generation_prompt")
            req = ChatCompletionRequest(model=body.model or core.model_names[0], messages=body.messages,
                                        tools=body.tools, thinking=body.thinking,
                                        reasoning_effort=body.reasoning_effort)
            text, _, _ = core.render_chat(openai_api.chat_job(req, core.default_thinking))
        else:
            text = body.prompt or ""
        ids = await core.off_loop(core.encode, text)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": core.max_model_len, "tokens": ids,
                               "token_strs": None}
        if body.return_token_strs:
            out["token_strs"] = [core.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        if body.model is not None:
            core.check_model(body.model)
        vocab = len(core.tokenizer)
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise ServeError("invalid_request", f"token ids {bad[:5]} are outside the vocabulary [0, {vocab}).",
                             param="tokens")
        return {"prompt": core.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}
