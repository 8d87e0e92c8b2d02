"""The `dsv4` console script: one entry point, one subcommand per job.

Each subcommand's implementation lives with its part of the package and is imported lazily, so `dsv4 --help` stays
fast and `dsv4 generate` does not import the server stack.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# subcommand -> (module, function, one-line help). The function takes argv (list[str]) and returns an exit code.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "generate": ("dsv4.cli", "generate_main", "complete a prompt with a model (the bundled default if none is given)"),
    "chat": ("dsv4.cli", "chat_main", "chat with a model in the terminal, in the V4 chat format"),
    "serve": ("dsv4.serve.app", "main", "serve the OpenAI- and Anthropic-compatible HTTP API"),
    "train": ("dsv4.train.trainer", "main", "pre-train or fine-tune a V4 model"),
    "plot": ("dsv4.train.plot", "main", "render loss curves and expert load from a training log"),
    "bench": ("dsv4.engine.bench", "main", "benchmark the engine against transformers on this machine"),
}


def default_model_path() -> Path:
    """The small trained V4 model that ships inside the package (see src/dsv4/assets/default/README.md)."""
    path = Path(__file__).parent / "assets" / "default"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the bundled default model is missing from {path}; reinstall dsv4 or pass --model PATH"
        )
    return path


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)


def _make_llm(args: argparse.Namespace):
    import torch

    from dsv4 import LLM

    path = args.model if args.model is not None else default_model_path()
    return LLM(str(path), dtype=getattr(torch, args.dtype), device=args.device)


def _sampling(args: argparse.Namespace):
    from dsv4 import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed
    )


def generate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dsv4 generate", description=COMMANDS["generate"][2])
    p.add_argument("prompt", nargs="*", help="prompt text (several prompts are batched together)")
    _add_model_args(p)
    args = p.parse_args(argv)
    prompts = args.prompt or ["In the beginning"]
    llm = _make_llm(args)
    for prompt, out in zip(prompts, llm.generate(prompts, _sampling(args))):
        print(f"\033[1m{prompt}\033[0m{out.outputs[0].text}")
        print(f"[{len(out.outputs[0].token_ids)} tokens, finish: {out.outputs[0].finish_reason}]\n")
    return 0


def chat_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dsv4 chat", description=COMMANDS["chat"][2])
    _add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--thinking", action="store_true", help="thinking mode (reasoning before the answer)")
    args = p.parse_args(argv)

    from dsv4.chat import encode_chat_prompt, parse_completion

    llm = _make_llm(args)
    mode = "thinking" if args.thinking else "chat"
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("dsv4 chat: type a message, or /exit to quit.")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return 0
        if line in {"/exit", "/quit"}:
            return 0
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        # token ids, so that control-token strings in what was typed (or in the model's earlier replies) stay text;
        # without a tokenizer, generate() says why it cannot take text
        rendered = encode_chat_prompt(messages, thinking_mode=mode)
        tok = llm.get_tokenizer()
        prompt = tok.encode_prompt(rendered) if tok is not None else rendered.text
        out = llm.generate([prompt], _sampling(args))[0].outputs[0]
        reply = parse_completion(out.text, thinking_mode=mode, strict=False)  # text lacks the (special) EOS
        if reply.get("reasoning_content"):
            print(f"\033[2m{reply['reasoning_content']}\033[0m")
        print(reply.get("content") or "")
        messages.append({k: v for k, v in reply.items() if v})


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        print("usage: dsv4 <command> [options]\n\ncommands:")
        for name, (_, _, help_) in COMMANDS.items():
            print(f"  {name:<10} {help_}")
        print("\n`dsv4 <command> --help` shows a command's options.")
        return 0 if not argv or argv[0] in {"-h", "--help"} else 2
    module, func, _ = COMMANDS[argv[0]]
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
