"""`dsv4 serve`: the OpenAI- and Anthropic-compatible HTTP server.

    protocol.py   request/response bodies (pydantic; lenient on unknown fields, strict on types)
    openai.py     OpenAI Chat Completions / Completions <-> ChatJob, SSE chunks, OpenAI error bodies
    anthropic.py  Anthropic Messages / count_tokens <-> ChatJob, the Anthropic event stream, Anthropic error bodies
    responses.py  OpenAI Responses (+ responses_protocol.py): items <-> ChatJob, the event stream, stored responses
    turns.py      system messages in mid-conversation, placed at V4 turn boundaries (Anthropic, Responses)
    tokens.py     vLLM's /tokenize, /detokenize, /version
    request_log.py  one log line per request (tokens, TTFT, total time), body summary at debug
    core.py       ServingCore: ChatJob -> V4 prompt, limits, constraint, engine stream, V4 output parser, usage
    budget.py     Anthropic thinking.budget_tokens as a reasoning cap
    metrics.py    Prometheus metrics (/metrics)
    app.py        FastAPI routes, auth, errors, disconnect handling, `main(argv)` for `dsv4 serve`

The engine runs in its own thread (dsv4.engine.AsyncLLM); this package never touches the model.
"""
