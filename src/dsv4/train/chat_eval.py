"""How well a model speaks the V4 chat format, measured on held-out generated conversations (dsv4.train.chat_data).

Two kinds of generation points (cases) are drawn from conversations of a seed the training data did not use:

* `answer`: the reply should be an answer. Thinking mode: it must close `</think>` and put a non-empty answer in
  content, with no tool call, and end (EOS, not max_tokens); chat mode: the same without `</think>`. Also counted,
  not required: the answer equal to the generator's (the templated answer, e.g. "It is 21 degrees celsius and
  cloudy in Paris.", which needs the facts of the request or of the tool result).
* `call`: tools are declared (tool_choice "auto", no grammar) and the request needs one: the reply must hold a call to
  the tool the request needs, with arguments valid for that tool's JSON schema. Also counted, not required: arguments
  equal to the expected ones (taken from the request), and the split by whether the tool has its family's usual name
  (read_file, get_weather, ...) or another one (view_file, weather_lookup, ...), and how often the reply opens a
  tool-call block at all (`<｜DSML｜tool_calls>`, in call cases and, wrongly, in answer cases): once a block is open,
  a grammar can hold the rest of it to the schemas.

`score(case, text)` scores a completion text (what follows the generation prompt, special tokens spelled out);
`run_engine` generates greedily with `dsv4.LLM`; `run_http` sends the same cases to a running server through the
`openai` SDK (thinking on, or off with `thinking: {"type": "disabled"}`), and scores what the API returns; with
`tool_choice="required"` there, the server's grammar forces a schema-valid call and only the choice of tool and the
argument values are the model's.

    python3 -m dsv4.train.chat_eval [--model DIR] [--calls 100] [--answers 100] [--http-cases 40] [--report FILE]

(without `--model`: the bundled default; `--http-cases N` starts `dsv4 serve` of the same model on a free port
and runs N cases of each kind through it). The last stdout line is JSON.

Deliberately not here: open-ended quality (the cases come from the generator's templates; this checks the format,
the choice of tool and the copying of arguments), sampling at temperature > 0, and constrained decoding.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from dsv4.chat.encoding import TOOL_CALLS_START, encode_messages
from dsv4.chat.parser import parse_completion
from dsv4.chat.tokenizer import THINK_END
from dsv4.train.chat_data import FAMILIES, generate_conversations, prompt_cases

HELDOUT_SEED = 1_000_003  # the training corpus uses seed 0; any other seed is a different stream of conversations
USUAL_NAMES = {f.variants[0].name for f in FAMILIES}


@dataclass
class Case:
    kind: str  # "call" | "answer"
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    thinking_mode: str
    expected: dict[str, Any]  # the assistant message the generator wrote

    @property
    def expected_calls(self) -> list[dict[str, Any]]:
        return [c["function"] for c in self.expected.get("tool_calls") or []]

    def prompt(self) -> str:
        return encode_messages(self.messages, thinking_mode=self.thinking_mode, tools=self.tools)


def heldout_cases(n_calls: int, n_answers: int, seed: int = HELDOUT_SEED) -> list[Case]:
    """At most one case of each kind per conversation (so the cases spread over many conversations)."""
    calls: list[Case] = []
    answers: list[Case] = []
    for conv in generate_conversations(8 * (n_calls + n_answers) + 16, seed):
        points = prompt_cases(conv)
        random.Random(len(calls) * 7919 + len(answers)).shuffle(points)
        call = next((p for p in points if p["expected"].get("tool_calls")), None)
        answer = next((p for p in points if not p["expected"].get("tool_calls")), None)
        if call is not None and len(calls) < n_calls:
            calls.append(Case("call", call["messages"], call["tools"], call["thinking_mode"], call["expected"]))
        if answer is not None and len(answers) < n_answers:
            answers.append(Case("answer", answer["messages"], answer["tools"], answer["thinking_mode"],
                                answer["expected"]))
        if len(calls) >= n_calls and len(answers) >= n_answers:
            break
    return calls + answers


def _schema_of(case: Case, name: str) -> dict[str, Any] | None:
    for tool in case.tools or []:
        if tool["function"]["name"] == name:
            return tool["function"]["parameters"]
    return None


def score_message(case: Case, content: str, calls: list[dict[str, Any]], closed: bool,
                  finished: bool, opens_block: bool = False) -> dict[str, Any]:
    """`calls`: [{"name", "arguments" (JSON string)}] as the parser or the API returned them; `finished`: the reply
    ended by itself (EOS), not at max_tokens."""
    has_content = bool(content.strip())
    out: dict[str, Any] = {"kind": case.kind, "mode": case.thinking_mode, "closed_think": closed,
                           "content": has_content, "finished": finished, "n_calls": len(calls),
                           "opens_block": opens_block or bool(calls)}
    if case.kind == "answer":
        out["ok"] = closed and has_content and not calls and finished
        out["exact_answer"] = content.strip() == (case.expected.get("content") or "").strip()
        return out
    want = case.expected_calls
    out["usual_name"] = want[0]["name"] in USUAL_NAMES
    out["right_tool"] = bool(calls) and calls[0]["name"] == want[0]["name"]
    valid = False
    if out["right_tool"]:
        try:
            args = json.loads(calls[0]["arguments"])
            jsonschema.validate(args, _schema_of(case, calls[0]["name"]))
            valid = isinstance(args, dict)
        except (ValueError, jsonschema.ValidationError, jsonschema.SchemaError):
            valid = False
    out["schema_valid"] = valid
    out["exact_args"] = len(calls) == len(want) and all(
        c["name"] == w["name"] and _loads(c["arguments"]) == json.loads(w["arguments"]) for c, w in zip(calls, want)
    )
    out["ok"] = out["right_tool"] and valid
    return out


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def score(case: Case, text: str, finished: bool) -> dict[str, Any]:
    """Score a raw completion (special tokens spelled out, EOS optional) with the tolerant V4 parser."""
    msg = parse_completion(text, case.thinking_mode, strict=False, tools=case.tools)
    calls = [c["function"] for c in msg.get("tool_calls") or []]
    closed = THINK_END in text if case.thinking_mode == "thinking" else THINK_END not in text
    opens = TOOL_CALLS_START.strip() in text
    return {**score_message(case, msg.get("content") or "", calls, closed, finished, opens), "text": text}


def run_engine(llm: Any, cases: list[Case], max_tokens: int = 200) -> list[dict[str, Any]]:
    from dsv4.engine.sampling import SamplingParams

    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, skip_special_tokens=False)
    outputs = llm.generate([tok.encode(c.prompt()) for c in cases], params)
    return [score(c, tok.decode(o.outputs[0].token_ids), o.outputs[0].finish_reason == "stop")
            for c, o in zip(cases, outputs)]


def _openai_messages(case: Case) -> list[dict[str, Any]]:
    msgs = []
    for m in case.messages:
        m = dict(m)
        if m["role"] == "assistant" and m.get("tool_calls"):
            m["content"] = m.get("content") or None
        msgs.append(m)
    return msgs


def run_http(base_url: str, cases: list[Case], max_tokens: int = 200, workers: int = 8,
             tool_choice: str = "auto") -> list[dict[str, Any]]:
    """The cases through `/v1/chat/completions` with the openai SDK, temperature 0."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=600)
    model = client.models.list().data[0].id

    def one(case: Case) -> dict[str, Any]:
        kw: dict[str, Any] = {"tools": case.tools, "tool_choice": tool_choice} if case.tools else {}
        if case.thinking_mode == "chat":
            kw["extra_body"] = {"thinking": {"type": "disabled"}}
        r = client.chat.completions.create(model=model, messages=_openai_messages(case), temperature=0,
                                           max_tokens=max_tokens, **kw)
        msg = r.choices[0].message
        calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in msg.tool_calls or []]
        reasoning = (msg.model_extra or {}).get("reasoning_content")
        # Through the API, "closed </think>" shows as an answer or a call after the reasoning; an unclosed think
        # leaves everything in reasoning_content and stops at max_tokens.
        finished = r.choices[0].finish_reason in ("stop", "tool_calls")
        closed = finished if case.thinking_mode == "thinking" else True
        out = score_message(case, msg.content or "", calls, closed, finished)
        return {**out, "text": json.dumps({"reasoning": reasoning, "content": msg.content, "calls": calls})}

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, cases))


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    def frac(rows: list[dict[str, Any]], key: str = "ok") -> dict[str, Any]:
        return {"n": len(rows), "fraction": round(sum(bool(r[key]) for r in rows) / len(rows), 3) if rows else None}

    calls = [r for r in results if r["kind"] == "call"]
    answers = [r for r in results if r["kind"] == "answer"]
    thinking_answers = [r for r in answers if r["mode"] == "thinking"]
    return {
        "thinking_answer_closes_think_and_answers": frac(thinking_answers),
        "chat_answer_in_content": frac([r for r in answers if r["mode"] == "chat"]),
        "answer_ok_all_modes": frac(answers),
        "answer_exact": frac(answers, "exact_answer"),
        "call_right_tool_schema_valid": frac(calls),
        "call_exact_arguments": frac(calls, "exact_args"),
        "call_opens_block": frac(calls, "opens_block"),
        "answer_opens_block_wrongly": frac(answers, "opens_block"),
        "call_usual_tool_names": frac([r for r in calls if r["usual_name"]]),
        "call_other_tool_names": frac([r for r in calls if not r["usual_name"]]),
        "call_thinking_mode": frac([r for r in calls if r["mode"] == "thinking"]),
        "call_chat_mode": frac([r for r in calls if r["mode"] == "chat"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m dsv4.train.chat_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: the bundled model)")
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--answers", type=int, default=100)
    p.add_argument("--http-cases", type=int, default=0, help="also run this many cases of each kind over HTTP")
    p.add_argument("--http-required", action="store_true",
                   help="also run the HTTP call cases with tool_choice 'required' (the grammar writes the call)")
    p.add_argument("--port", type=int, default=0, help="port for the HTTP run (0 = a free one)")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--seed", type=int, default=HELDOUT_SEED)
    p.add_argument("--samples", type=Path, default=None, help="write every case's output here (JSONL)")
    args = p.parse_args(argv)

    import torch

    import dsv4
    from dsv4.cli import default_model_path

    torch.set_num_threads(1)
    model = args.model or default_model_path()
    cases = heldout_cases(args.calls, args.answers, args.seed)
    t0 = time.perf_counter()
    llm = dsv4.LLM(str(model), dtype=torch.float32, device="cpu")
    results = run_engine(llm, cases, args.max_tokens)
    report: dict[str, Any] = {"model": str(model), "seed": args.seed, "engine": summarize(results),
                              "engine_s": round(time.perf_counter() - t0, 1)}
    http_results: list[dict[str, Any]] = []
    if args.http_cases:
        del llm
        from dsv4.serve.process import ServeProcess

        # the model the engine cases ran, through the HTTP API (no model argument: the bundled default)
        server = ServeProcess(*(["--model", str(args.model)] if args.model else []), port=args.port,
                              log=Path(tempfile.gettempdir()) / f"dsv4_chat_eval_serve_{os.getpid()}.log")
        try:
            server.wait_ready()
            t0 = time.perf_counter()
            sub = [c for c in cases if c.kind == "call"][: args.http_cases]
            sub += [c for c in cases if c.kind == "answer"][: args.http_cases]
            http_results = run_http(server.url, sub, args.max_tokens)
            report["http"] = summarize(http_results)
            report["http_s"] = round(time.perf_counter() - t0, 1)
            if args.http_required:
                forced = run_http(server.url, [c for c in sub if c.kind == "call"], args.max_tokens,
                                  tool_choice="required")
                report["http_required"] = {k: v for k, v in summarize(forced).items() if k.startswith("call_")}
                http_results += [{**r, "tool_choice": "required"} for r in forced]
        finally:
            server.close()
    if args.samples:
        with args.samples.open("w") as f:
            for where, rows in (("engine", results), ("http", http_results)):
                for r in rows:
                    f.write(json.dumps({"where": where, **r}, ensure_ascii=False) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
