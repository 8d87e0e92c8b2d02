"""Constrained decoding for the V4 chat format: DSML tool calls that follow each tool's schema, and JSON output.

`build_constraint(tokenizer, tools=..., tool_choice=..., response_format=..., thinking_mode=...)` returns a per-request
`Constraint` (or None when nothing is constrained); the engine calls it once per decoding step:

    c.fill_bitmask(bitmask, row)   # or c.allowed_mask() / c.apply(logits): which tokens may come next
    c.accept(token_id)             # after sampling; False means the token broke the grammar (engine bug)
    c.is_finished()                # the grammar is complete and the model produced EOS

Why xgrammar (0.2.x), not llguidance: xgrammar is installed here as a CPU wheel, compiles a V4 tool grammar in
~0.1 s and fills a 129280-token mask in well under a millisecond on CPU, has a structural-tag language (tags, triggers,
sequences, JSON-schema and free-text regions) that expresses the DSML block directly, and is the library vLLM and
SGLang use, so its behaviour is well exercised. llguidance would need another native wheel for the same job.

What the grammar forces (spec chat-encoding.md section 4, written exactly as the official encoder renders a call, so
the strict parser reads every constrained output):

    [reasoning</think>]                                  thinking mode: reasoning is free text up to </think>
    content | \\n\\n<｜DSML｜tool_calls>\\n{invoke}(\\n{invoke})*\\n</｜DSML｜tool_calls>     then EOS
    invoke = <｜DSML｜invoke name="f">\\n{parameter\\n}*</｜DSML｜invoke>
    parameter = <｜DSML｜parameter name="k" string="true">raw text</｜DSML｜parameter>      (string values)
              | <｜DSML｜parameter name="k" string="false">JSON</｜DSML｜parameter>        (everything else)

Parameters follow the declared property order; required ones must appear, optional ones may be left out. tool_choice
"auto": free content (and free reasoning), and a tool-call block may follow, whose DSML and argument schemas are then
enforced exactly as for "required"; "required": only a tool-call block; a named function: only that function. response_format json_object / json_schema: the content is JSON (validated by xgrammar's JSON-schema
grammar); with tools and "auto", JSON or a tool-call block.

Deliberately not covered (the arguments are still well-formed DSML, and their values still JSON where non-string):
`minLength` and `format` of string parameters (`pattern`, `enum`, `const` and `maxLength` are enforced),
`additionalProperties` beyond the declared properties, and `patternProperties`. Free text (content, reasoning, string
values) cannot contain "<｜" or "｜DSML｜" (so no special token or DSML tag is spelled out) nor `<think>`/`</think>`;
JSON strings are held to the same rule unless the schema has length bounds (then only the token-level ban applies).
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

from .tokenizer import DSML, THINK_END, THINK_START, Tokenizer

TOOL_CALLS_BEGIN = f"\n\n<{DSML}tool_calls>\n"
TOOL_CALLS_END = f"\n</{DSML}tool_calls>"
PARAM_END = f"</{DSML}parameter>"
# Never inside free text (content, reasoning, string values): the special tokens and DSML tags. Every special token
# but <think>/</think> starts with "<｜", and every DSML tag holds "｜DSML｜", so these two strings cover them all and
# keep grammar compilation fast (each excluded string adds matcher states that are checked against all 129280
# tokens: the eight spelled-out tokens took ~0.4 s per free-text region). A lone fullwidth bar "｜" stays allowed:
# tool_choice "auto" constrains every turn that offers tools, and prose may use the character.
TEXT_EXCLUDES = ["<｜", DSML, THINK_START, THINK_END]

# Bounded whitespace inside JSON values: free whitespace lets a weak model loop on spaces forever.
JSON_WHITESPACE = 1

# Token-level ban, on top of the grammar: every added token (role, task, legacy/FIM/placeholder tokens, <think>) is
# masked out except EOS, `｜DSML｜` when tool calls are possible and `</think>` in thinking mode. This also covers JSON
# string values, where a text-level exclusion is only applied to schemas without length bounds (xgrammar drops
# maxLength/minLength from strings it filters).

_INFO_CACHE: dict[int, tuple[Tokenizer, Any, np.ndarray]] = {}

# Background compilation (`build_constraint(..., background=True)`, what the server uses for tool_choice "auto"):
# the grammar of a large tool set takes seconds to compile the first time (Claude Code's 24 tools: ~20 s on 2 busy
# cores), which must not delay a chat turn that the parser can recover anyway. One worker, and one lock around every
# compilation, because xgrammar's compiler caches are not meant for concurrent use.
_COMPILE_LOCK = threading.Lock()
_PENDING_LOCK = threading.Lock()
_SETUP_LOCK = threading.Lock()
_BACKGROUND = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsv4-grammar")
# (tokenizer id, structural tag JSON) -> the compiled grammar; one entry per distinct tool set, like xgrammar's cache
_COMPILED: dict[tuple[int, str], Future] = {}


def _xgr():
    try:
        import xgrammar
    except ImportError as err:  # pragma: no cover - exercised only without the chat extra
        raise ImportError("constrained decoding needs xgrammar: pip install 'dsv4[chat]'") from err
    return xgrammar


def _setup(tokenizer: Tokenizer) -> tuple[Tokenizer, Any, np.ndarray]:
    """(tokenizer, xgrammar GrammarCompiler, keep) per tokenizer; building the info walks all 129280 tokens.

    keep: bool [32 * ceil(V/32)], False for every added token but EOS (see the token-level ban above).
    """
    key = id(tokenizer)
    with _SETUP_LOCK:
        return _setup_locked(tokenizer, key)


def _setup_locked(tokenizer: Tokenizer, key: int) -> tuple[Tokenizer, Any, np.ndarray]:
    if key not in _INFO_CACHE:
        xgr = _xgr()
        vocab = [""] * tokenizer.vocab_size
        for text, token_id in tokenizer.backend.get_vocab(with_added_tokens=True).items():
            vocab[token_id] = text
        info = xgr.TokenizerInfo(
            vocab, xgr.VocabType.BYTE_LEVEL, vocab_size=tokenizer.vocab_size, stop_token_ids=[tokenizer.eos_id]
        )
        threads = min(8, os.cpu_count() or 1)
        keep = np.ones(-(-tokenizer.vocab_size // 32) * 32, dtype=np.bool_)
        for token_id in tokenizer.backend.get_added_tokens_decoder():
            keep[token_id] = token_id == tokenizer.eos_id
        _INFO_CACHE[key] = (tokenizer, xgr.GrammarCompiler(info, max_threads=threads), keep)
    return _INFO_CACHE[key]


# -- schema -> structural-tag formats ---------------------------------------------------------------------------------


def _types(schema: dict[str, Any]) -> set[str] | None:
    """The JSON types a schema admits, or None when it does not say (then both DSML forms are allowed)."""
    if "const" in schema:
        return {"string" if isinstance(schema["const"], str) else "other"}
    if "enum" in schema:
        return {"string" if isinstance(v, str) else "other" for v in schema["enum"]}
    kind = schema.get("type")
    if isinstance(kind, str):
        return {"string" if kind == "string" else "other"}
    if isinstance(kind, list):
        return {"string" if k == "string" else "other" for k in kind}
    for key in ("anyOf", "oneOf"):
        if key in schema:
            out: set[str] = set()
            for sub in schema[key]:
                sub_types = _types(sub) if isinstance(sub, dict) else None
                if sub_types is None:
                    return None
                out |= sub_types
            return out
    return None


def _string_value(schema: dict[str, Any]) -> dict[str, Any]:
    """The raw text of a string="true" parameter (no quotes, no escapes: written as is)."""
    strings = [v for v in schema.get("enum", [schema.get("const")] if "const" in schema else []) if isinstance(v, str)]
    if strings:
        return {"type": "or", "elements": [{"type": "const_string", "value": v} for v in strings]}
    if isinstance(schema.get("pattern"), str):
        return {"type": "regex", "pattern": schema["pattern"]}
    text: dict[str, Any] = {"type": "any_text", "excludes": list(TEXT_EXCLUDES)}  # DSML also stops PARAM_END
    if isinstance(schema.get("maxLength"), int):
        # NOTE: a length bound costs ~1-2 s of grammar compilation (once per distinct tool set; xgrammar caches)
        text["max_chars"] = schema["maxLength"]
    return text


def _json_content(schema: Any) -> dict[str, Any]:
    fmt: dict[str, Any] = {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": JSON_WHITESPACE}
    if '"maxLength"' not in json.dumps(schema) and '"minLength"' not in json.dumps(schema):
        # keep markup out of JSON strings too (only without length bounds, which xgrammar would drop)
        fmt["excludes"] = list(TEXT_EXCLUDES)
    return fmt


def _with_defs(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    # A property schema compiled on its own still needs the root's definitions for its $refs.
    extra = {k: root[k] for k in ("$defs", "definitions") if k in root and k not in schema}
    return {**schema, **extra} if extra else schema


def _parameter(key: str, schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    head = f'<{DSML}parameter name="{key}" string='
    types = _types(schema)
    branches = []
    if types is None or "string" in types:
        branches.append(
            {"type": "tag", "begin": head + '"true">', "content": _string_value(schema), "end": PARAM_END + "\n"}
        )
    if types is None or "other" in types:
        json_schema = _with_defs(schema, root)
        branches.append(
            {
                "type": "tag",
                "begin": head + '"false">',
                "content": _json_content(json_schema),
                "end": PARAM_END + "\n",
            }
        )
    return branches[0] if len(branches) == 1 else {"type": "or", "elements": branches}


def _invoke(function: dict[str, Any]) -> dict[str, Any]:
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"tool function without a name: {function!r}")
    schema = function.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(schema, dict):
        raise ValueError(f"tool {name!r}: parameters must be a JSON schema object, got {schema!r}")
    properties = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    unknown = required - set(properties)
    if unknown:
        raise ValueError(f"tool {name!r}: required parameters {sorted(unknown)} are not among its properties")
    elements: list[dict[str, Any]] = []
    for key, prop in properties.items():
        param = _parameter(key, prop if isinstance(prop, dict) else {}, schema)
        elements.append(param if key in required else {"type": "optional", "content": param})
    if not elements:
        # an argument-less call renders like the official encoder's: header, empty line, end tag
        content: dict[str, Any] = {"type": "const_string", "value": "\n"}
    else:
        content = {"type": "sequence", "elements": elements} if len(elements) > 1 else elements[0]
    return {"type": "tag", "begin": f'<{DSML}invoke name="{name}">\n', "content": content, "end": f"</{DSML}invoke>"}


def _tool_block(functions: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    invokes = {
        "type": "tags_with_separator",
        "tags": [_invoke(f) for f in functions],
        "separator": "\n",
        "at_least_one": True,
        "stop_after_first": not parallel,
    }
    return {"type": "tag", "begin": TOOL_CALLS_BEGIN, "content": invokes, "end": TOOL_CALLS_END}


def _json_format(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema", spec.get("schema_"))
        if not isinstance(schema, (dict, bool)):
            raise ValueError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
    else:
        raise ValueError(f"response_format type must be text, json_object or json_schema, got {kind!r}")
    return _json_content(schema)


def _functions(tools: list[dict[str, Any]] | None, tool_choice: Any) -> tuple[list[dict[str, Any]], str]:
    """The functions the model may call and the mode ("none" | "auto" | "required")."""
    functions = []
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}, got {tool!r}")
        functions.append(tool["function"])
    if tool_choice is None:
        tool_choice = "auto" if functions else "none"
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        chosen = [f for f in functions if f.get("name") == name]
        if not chosen:
            offered = ", ".join(str(f.get("name")) for f in functions) or "none"
            raise ValueError(f"tool_choice names function {name!r}, which is not among the tools (offered: {offered})")
        return chosen, "required"
    if tool_choice not in ("none", "auto", "required"):
        raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or a named function, got {tool_choice!r}")
    if tool_choice != "none" and not functions:
        if tool_choice == "required":
            raise ValueError("tool_choice='required' needs at least one tool")
        tool_choice = "none"
    return functions, tool_choice


def structural_tag(
    tools: list[dict[str, Any]] | None = None,
    tool_choice: Any = None,
    response_format: dict[str, Any] | None = None,
    thinking_mode: str = "chat",
    parallel_tool_calls: bool = True,
) -> dict[str, Any] | None:
    """The xgrammar structural tag (as a dict) for one request, or None when the output is unconstrained."""
    if thinking_mode not in ("chat", "thinking"):
        raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
    functions, mode = _functions(tools, tool_choice)
    json_fmt = _json_format(response_format)
    if mode == "none" and json_fmt is None:
        return None
    free_text = {"type": "any_text", "excludes": list(TEXT_EXCLUDES)}
    if mode == "required":
        body = _tool_block(functions, parallel_tool_calls)
    elif mode == "auto":
        block = _tool_block(functions, parallel_tool_calls)
        if json_fmt is not None:
            body = {"type": "or", "elements": [json_fmt, block]}
        else:
            # Content, optionally followed by the block. (A triggered tag cannot be used: its trigger contains
            # "｜DSML｜", which the content must exclude.)
            content_then_block = {
                "type": "sequence",
                "elements": [
                    {"type": "tag", "begin": "", "content": free_text, "end": TOOL_CALLS_BEGIN},
                    block["content"],
                    {"type": "const_string", "value": TOOL_CALLS_END},
                ],
            }
            body = {"type": "or", "elements": [free_text, content_then_block]}
    else:
        body = json_fmt
    if thinking_mode == "thinking":
        reasoning = {"type": "tag", "begin": "", "content": free_text, "end": THINK_END}
        body = {"type": "sequence", "elements": [reasoning, body]}
    return {"type": "structural_tag", "format": body}


# -- the per-request object ----------------------------------------------------------------------------------------


class Constraint:
    """One request's grammar state. Not thread-safe; one per sequence (fork() for parallel samples)."""

    def __init__(self, matcher: Any, vocab_size: int, eos_id: int, keep_bits: np.ndarray) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self._keep_bits = keep_bits

    def fill_bitmask(self, bitmask: torch.Tensor, index: int = 0) -> None:
        """Write row `index` of an xgrammar bitmask (int32 [B, ceil(V/32)], see `allocate_bitmask`)."""
        import torch

        self._matcher.fill_next_token_bitmask(bitmask, index)
        keep = torch.from_numpy(self._keep_bits[: bitmask.shape[1]]).to(bitmask.device)
        bitmask[index, : keep.numel()] &= keep

    def allowed_mask(self, vocab_size: int | None = None) -> torch.Tensor:
        """bool [vocab_size]: True where the token may come next (ids past the tokenizer's vocabulary: False)."""
        bitmask = _xgr().allocate_token_bitmask(1, self.vocab_size)
        self.fill_bitmask(bitmask, 0)
        # bit j of int32 word w is token 32*w + j (little-endian words and bits)
        import torch  # lazily: `import dsv4.chat` stays light for tokenizer/encoding users

        bits = np.unpackbits(bitmask[0].numpy().view(np.uint8), bitorder="little")[: self.vocab_size]
        mask = torch.from_numpy(bits.astype(np.bool_))  # [V]
        size = vocab_size or self.vocab_size
        if size > self.vocab_size:
            mask = torch.cat([mask, torch.zeros(size - self.vocab_size, dtype=torch.bool)])
        return mask[:size]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Set disallowed logits to -inf in place; `logits` is [V] or [1, V] (model vocab may be padded)."""
        mask = self.allowed_mask(logits.shape[-1]).to(logits.device)
        logits.masked_fill_(~mask, float("-inf"))
        return logits

    def accept(self, token_id: int) -> bool:
        return bool(self._matcher.accept_token(int(token_id)))

    def accept_text(self, text: str) -> bool:
        """Advance by text rather than tokens (e.g. a prefill the client wrote)."""
        return bool(self._matcher.accept_string(text))

    def jump_forward_string(self) -> str:
        """Text the grammar forces next (e.g. the rest of a tag); "" when the next step is a real choice. An engine
        may tokenize and accept it without running the model (jump-forward decoding)."""
        return str(self._matcher.find_jump_forward_string())

    def is_finished(self) -> bool:
        return bool(self._matcher.is_terminated())

    def can_finish(self) -> bool:
        """The grammar is complete, so EOS is allowed now."""
        return bool(self._matcher.is_completed())

    def rollback(self, num_tokens: int) -> None:
        self._matcher.rollback(num_tokens)

    def reset(self) -> None:
        self._matcher.reset()

    def fork(self) -> Constraint:
        return Constraint(self._matcher.fork(), self.vocab_size, self.eos_id, self._keep_bits)


def allocate_bitmask(batch_size: int, vocab_size: int) -> torch.Tensor:
    return _xgr().allocate_token_bitmask(batch_size, vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """logits [B, V] (fp32, any device xgrammar supports) masked in place by a filled bitmask."""
    _xgr().apply_token_bitmask_inplace(logits, bitmask.to(logits.device))


def build_constraint(
    tokenizer: Tokenizer,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: Any = None,
    response_format: dict[str, Any] | None = None,
    thinking_mode: str = "chat",
    parallel_tool_calls: bool = True,
    background: bool = False,
    wait: float = 0.0,
) -> Constraint | None:
    """The constraint for one request, or None when nothing constrains the output (no tools, free-text format).

    `background=True`: a grammar not compiled yet is compiled on a worker thread; the call waits up to `wait`
    seconds for it and returns None if it is not ready by then (the request runs unconstrained); later requests with
    the same tools get the constraint at once.

    `tools` and `tool_choice` are OpenAI-shaped (`tool_choice` None means "auto" with tools); `response_format` is
    OpenAI's `{"type": "json_object"}` / `{"type": "json_schema", "json_schema": {"schema": ...}}`. Generation starts
    right after the generation prompt of `encode_messages` (`...<｜Assistant｜><think>` in thinking mode).
    """
    tag = structural_tag(tools, tool_choice, response_format, thinking_mode, parallel_tool_calls)
    if tag is None:
        return None
    xgr = _xgr()
    tag_json = json.dumps(tag)  # key order kept: xgrammar's JSON grammar follows the schema's property order
    future = None
    if background:
        with _PENDING_LOCK:
            key = (id(tokenizer), tag_json)
            future = _COMPILED.get(key)
            if future is None:  # (a failed compile stays failed: the same tools fail the same way)
                future = _COMPILED[key] = _BACKGROUND.submit(_compile_for, tokenizer, tag_json)
        wait_for([future], timeout=wait)
        if not future.done():
            return None
    _, compiler, keep = _setup(tokenizer)
    keep = keep.copy()
    if _functions(tools, tool_choice)[1] != "none":
        keep[tokenizer.token_id(DSML)] = True
    if thinking_mode == "thinking":
        keep[tokenizer.token_id(THINK_END)] = True
    keep_bits = np.packbits(keep, bitorder="little").view(np.int32)  # [ceil(V/32)], xgrammar's bitmask layout
    try:
        compiled = future.result() if future is not None else _compile(compiler, tag_json)
    except Exception as err:
        raise ValueError(f"could not build a grammar from these tools / response_format: {err}") from err
    return Constraint(xgr.GrammarMatcher(compiled), tokenizer.vocab_size, tokenizer.eos_id, keep_bits)


def _compile(compiler: Any, tag_json: str) -> Any:
    with _COMPILE_LOCK:
        return compiler.compile_structural_tag(tag_json)


def _compile_for(tokenizer: Tokenizer, tag_json: str) -> Any:
    # the tokenizer info (a walk over all 129280 tokens, seconds) is built here too the first time, off the caller
    return _compile(_setup(tokenizer)[1], tag_json)


def wait_for_background_compiles(timeout: float | None = None) -> None:
    """Block until every grammar submitted with `background=True` so far is compiled (tests, warm-up)."""
    _BACKGROUND.submit(lambda: None).result(timeout)
