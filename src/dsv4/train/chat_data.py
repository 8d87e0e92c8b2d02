"""Synthetic DeepSeek-V4 conversations for teaching a small model the chat format (the bundled default model's data).

`generate_conversations(n, seed)` draws conversations from fixed word lists with `random.Random(seed)`, so a seed is
a data set: the same seed gives byte-identical records on every machine, no download involved. What they contain:

* system prompts of varied length (or none), user requests, short reasoning closed by `</think>`, answers in content;
* tool-using turns: a declared tool list (1-4 tools drawn from `FAMILIES`: agent tools such as read_file,
  list_directory, run_shell_command, search_files, write_file, and others such as get_weather, calculator,
  convert_currency; each family comes in several names and schemas), a DSML tool call whose arguments are taken from
  the request and are valid for the declared schema, the tool's result, then a final answer that uses the result;
  sometimes two calls in one block, sometimes a request that needs no tool although tools are declared;
* thinking and chat (non-thinking) mode; multi-turn conversations (the official encoder drops the reasoning of turns
  before the last user message when no tools are declared, and keeps it when they are).

`conversation_record(conv)` renders a conversation with dsv4's own encoder (dsv4.chat.encoding, the official format)
and marks as trained exactly the assistant replies the model writes at inference time: for each assistant message,
the text between the prompt the encoder would render for the conversation up to it (ending in
`<｜Assistant｜><think>` or `</think>`) and the end of that message (its EOS). Replies whose rendering in the whole
conversation differs from the one at inference time (earlier turns whose reasoning is dropped) stay context only.
The records are `{"segments": [{"text", "train"}, ...]}` lines that `dsv4 train` reads (dsv4.train.data).

    python3 -m dsv4.train.chat_data OUT.jsonl --conversations 4000 --seed 0 [--bible kjv.jsonl --bible-chapters 300]

Deliberately not here: natural-language variety beyond the templates (a 13M model can learn the format and the
copying of arguments, not open-ended dialogue), real tool execution (results are drawn from the same lists), and
any model-specific tokenisation (records are text; the trainer tokenises).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dsv4.chat.encoding import encode_messages

Message = dict[str, Any]

# ----------------------------------------------------------------------------------------------- word lists
DIRS = ["src", "src/app", "src/utils", "tests", "docs", "scripts", "config", "lib", "data", "notes", "build",
        "examples", "tools", "web", "api", "src/core", "assets", "bin", "docs/guide", "tests/unit"]
FILES = ["main.py", "README.md", "config.yaml", "utils.py", "server.js", "index.html", "Makefile", "notes.txt",
         "setup.cfg", "app.toml", "schema.sql", "todo.md", "train.py", "model.py", "run.sh", "data.csv",
         "settings.json", "parser.rs", "lib.go", "test_api.py", "CHANGELOG.md", "report.txt", "style.css", "db.py"]
WORDS = ["alpha", "beta", "gamma", "delta", "cache", "queue", "token", "engine", "model", "batch", "graph", "table",
         "user", "order", "price", "score", "state", "event", "frame", "block", "river", "stone", "light", "bread"]
CITIES = ["Paris", "London", "Tokyo", "Berlin", "Rome", "Madrid", "Cairo", "Lima", "Oslo", "Sydney", "Toronto",
          "Nairobi", "Seoul", "Dublin", "Lisbon", "Vienna", "Prague", "Athens", "Boston", "Denver", "Mumbai",
          "Jerusalem", "Chicago", "Warsaw", "Bogota", "Hanoi", "Zurich", "Helsinki"]
TIMEZONES = {"Paris": "Europe/Paris", "London": "Europe/London", "Tokyo": "Asia/Tokyo", "Berlin": "Europe/Berlin",
             "Rome": "Europe/Rome", "Madrid": "Europe/Madrid", "Cairo": "Africa/Cairo", "Lima": "America/Lima",
             "Oslo": "Europe/Oslo", "Sydney": "Australia/Sydney", "Toronto": "America/Toronto",
             "Seoul": "Asia/Seoul", "Dublin": "Europe/Dublin", "Chicago": "America/Chicago"}
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "foggy", "snowy", "clear", "stormy"]
COMMANDS = ["ls -la", "git status", "pwd", "df -h", "python3 --version", "uname -a", "date", "whoami", "du -sh .",
            "pytest -q", "make test", "git log --oneline -3", "echo hello", "wc -l README.md", "free -m",
            "git diff --stat", "cat VERSION", "npm test", "ls src", "head -3 main.py"]
TOPICS = ["python decorators", "rust lifetimes", "the tower of babel", "sourdough bread", "sliding window attention",
          "git rebase", "solar eclipses", "the river jordan", "json schema", "unit testing", "docker volumes",
          "prime numbers", "olive trees", "mixture of experts", "http status codes", "the book of ruth"]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "INR"]
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
DOMAINS = ["example.com", "mail.org", "work.net"]
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
            "Egypt": "Cairo", "Peru": "Lima", "Norway": "Oslo", "Ireland": "Dublin", "Portugal": "Lisbon",
            "Austria": "Vienna", "Greece": "Athens", "Poland": "Warsaw", "Kenya": "Nairobi", "Finland": "Helsinki"}
FACTS = [("Who built the ark?", "Noah built the ark."),
         ("Who led the children of Israel out of Egypt?", "Moses led them out of Egypt."),
         ("What does CPU stand for?", "CPU stands for central processing unit."),
         ("What does HTTP stand for?", "HTTP stands for HyperText Transfer Protocol."),
         ("How many days are in a week?", "A week has seven days."),
         ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
         ("How many books are in the Bible?", "The King James Bible has 66 books."),
         ("What language is dsv4 written in?", "dsv4 is written in Python, on PyTorch."),
         ("What is a tokenizer?", "A tokenizer splits text into the tokens a model reads."),
         ("Who slew Goliath?", "David slew Goliath with a sling and a stone.")]
GREETINGS = [("Hello!", "Hello! How can I help you today?"), ("Hi there.", "Hi! What can I do for you?"),
             ("Good morning.", "Good morning! How can I help?"), ("Thanks!", "You're welcome!"),
             ("Thank you, that helps.", "Glad it helped!"), ("Who are you?", "I am a small DeepSeek-V4 model "
              "running locally with dsv4.")]
SYSTEM_SENTENCES = [
    "You are a helpful assistant.", "You are dsv4, a small model running on this machine.", "Answer briefly.",
    "You are a coding agent working in a software repository.",
    "Use the tools to look at files before you answer questions about them.", "Be concise and accurate.",
    "Prefer plain language over jargon.", "The user prefers metric units.", "Never invent file contents.",
    "When a tool fails, say what went wrong.", "Reply in English.", "Keep answers to one or two sentences.",
    "You may call several tools in one turn when the request needs them.",
    "Work step by step and check the result of each tool call before you answer.",
    "The working directory is the root of the project.", "Today is a weekday.",
]


def _pick(rng: random.Random, xs: list) -> Any:
    return xs[rng.randrange(len(xs))]


def _path(rng: random.Random) -> str:
    return f"{_pick(rng, DIRS)}/{_pick(rng, FILES)}" if rng.random() < 0.8 else _pick(rng, FILES)


def _file_lines(rng: random.Random, path: str) -> list[str]:
    w = _pick(rng, WORDS)
    if path.endswith(".py"):
        return [f"def {w}():", f"    return {rng.randrange(100)}"]
    if path.endswith(".md"):
        return [f"# {w.title()}", f"Notes about the {w} module."]
    if path.endswith((".json", ".yaml", ".toml", ".cfg")):
        return [f"{w} = {rng.randrange(100)}", f"debug = {_pick(rng, ['true', 'false'])}"]
    return [f"{w} {rng.randrange(100)}", f"{_pick(rng, WORDS)} {rng.randrange(100)}"]


# ----------------------------------------------------------------------------------------------- tool families
@dataclass
class Variant:
    """One name and schema of a tool family; `slots` maps each parameter to the family's slot it carries."""

    name: str
    description: str
    properties: dict[str, dict]
    required: list[str]
    slots: dict[str, str]

    def tool(self) -> Message:
        params = {"type": "object", "properties": self.properties, "required": self.required}
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": params}}

    def arguments(self, values: dict[str, Any]) -> dict[str, Any]:
        return {p: values[s] for p, s in self.slots.items() if s in values}


@dataclass
class Task:
    """What one request asks of a family: slot values, the request, reasoning, the tool's result, the answer."""

    values: dict[str, Any]
    request: str
    intent: str  # "the weather in Paris": used in reasoning
    result: str
    answer: str


@dataclass
class Family:
    key: str
    variants: list[Variant]
    make: Callable[[random.Random], Task]
    # How a request to this family reads when it names the arguments, for mixing two calls in one request.
    weight: float = 1.0
    extra: dict = field(default_factory=dict)


def _s(description: str, **kw) -> dict:
    return {"type": "string", "description": description, **kw}


def _read_task(rng: random.Random) -> Task:
    path = _path(rng)
    request = _pick(rng, ["Show me the contents of {p}.", "What is in {p}?", "Read {p} for me.",
                          "Open {p} and tell me what it says.", "Can you print the file {p}?", "cat {p}",
                          "Please read the file {p}."]).format(p=path)
    if rng.random() < 0.1:
        return Task({"path": path}, request, f"the contents of {path}", f"Error: {path}: no such file",
                    f"I could not read {path}: the file does not exist.")
    lines = _file_lines(rng, path)
    return Task({"path": path}, request, f"the contents of {path}", "\n".join(lines),
                f"{path} has {len(lines)} lines. It starts with `{lines[0]}`.")


def _list_task(rng: random.Random) -> Task:
    d = _pick(rng, DIRS)
    recursive = rng.random() < 0.25
    request = _pick(rng, ["What files are in {d}?", "List the directory {d}.", "Show me what is inside {d}.",
                          "ls {d}", "Which files does {d} contain?"]).format(d=d)
    values: dict[str, Any] = {"path": d}
    if recursive:
        request = request.rstrip(".?") + ", recursively."
        values["recursive"] = True
    entries = sorted(rng.sample(FILES, rng.randint(1, 4)))
    return Task(values, request, f"the files in {d}", "\n".join(entries),
                f"{d} contains {len(entries)} entries: {', '.join(entries)}.")


def _shell_task(rng: random.Random) -> Task:
    cmd = _pick(rng, COMMANDS)
    request = _pick(rng, ["Run `{c}`.", "Please run {c} and tell me the output.", "Execute `{c}` in the shell.",
                          "What does `{c}` print?", "Run the command {c}"]).format(c=cmd)
    values: dict[str, Any] = {"command": cmd}
    if rng.random() < 0.2:
        values["timeout"] = _pick(rng, [10, 30, 60, 120])
        request += f" Use a timeout of {values['timeout']} seconds."
    out = {"pwd": "/home/user/project", "whoami": "user", "date": "Thu Dec  3 10:00:00 UTC 2026",
           "echo hello": "hello", "python3 --version": "Python 3.12.3"}.get(cmd, f"{_pick(rng, WORDS)} ok")
    return Task(values, request, f"the output of `{cmd}`", out, f"`{cmd}` printed: {out}")


def _weather_task(rng: random.Random) -> Task:
    city = _pick(rng, CITIES)
    request = _pick(rng, ["What's the weather in {c}?", "Is it raining in {c} right now?",
                          "How warm is it in {c} today?", "Weather for {c}, please.",
                          "Tell me the current weather in {c}."]).format(c=city)
    values: dict[str, Any] = {"city": city}
    unit = "celsius"
    if rng.random() < 0.25:
        unit = _pick(rng, ["celsius", "fahrenheit"])
        request = request.rstrip(".?") + f" in {unit}?"
        values["unit"] = unit
    t = rng.randint(-5, 35) if unit == "celsius" else rng.randint(25, 95)
    cond = _pick(rng, CONDITIONS)
    result = json.dumps({"city": city, "temperature": t, "unit": unit, "condition": cond})
    return Task(values, request, f"the weather in {city}", result, f"It is {t} degrees {unit} and {cond} in {city}.")


def _search_task(rng: random.Random) -> Task:
    topic = _pick(rng, TOPICS)
    request = _pick(rng, ["Search the web for {t}.", "Look up {t} online.", "Find articles about {t}.",
                          "Search for {t}"]).format(t=topic)
    values: dict[str, Any] = {"query": topic}
    if rng.random() < 0.25:
        values["max_results"] = rng.randint(1, 5)
        request = request.rstrip(".") + f" and give me the top {values['max_results']} results."
    title = f"{topic.title()}: a short guide"
    return Task(values, request, f"web results for {topic}", json.dumps([{"title": title, "url": f"https://"
                f"{_pick(rng, DOMAINS)}/{topic.replace(' ', '-')}"}]), f'The top result is "{title}".')


def _grep_task(rng: random.Random) -> Task:
    pattern, d = _pick(rng, ["TODO", "FIXME", "import torch", "def main", "print(", "config"] + WORDS), _pick(rng, DIRS)
    request = _pick(rng, ["Find where {p} appears in {d}.", "Search {d} for {p}.", "grep for {p} in {d}",
                          "Which files in {d} mention {p}?"]).format(p=pattern, d=d)
    n = rng.randint(0, 3)
    hits = [f"{d}/{_pick(rng, FILES)}:{rng.randint(1, 90)}: {pattern}" for _ in range(n)]
    answer = f"{pattern} appears {n} times in {d}." if n else f"No file in {d} contains {pattern}."
    return Task({"pattern": pattern, "path": d}, request, f"where {pattern} appears in {d}",
                "\n".join(hits) or "no matches", answer)


def _write_task(rng: random.Random) -> Task:
    path, text = _path(rng), f"{_pick(rng, WORDS)} {_pick(rng, WORDS)}"
    request = _pick(rng, ["Create the file {p} containing: {t}", "Write {t} to {p}.",
                          "Save the text {t} in {p}."]).format(p=path, t=text)
    return Task({"path": path, "content": text}, request, f"writing to {path}",
                f"wrote {len(text)} bytes to {path}", f"Done: {path} now contains the text.")


def _time_task(rng: random.Random) -> Task:
    city = _pick(rng, sorted(TIMEZONES))
    request = _pick(rng, ["What time is it in {c}?", "Current time in {c}?", "Tell me the time in {c}."]).format(c=city)
    hhmm = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
    return Task({"timezone": TIMEZONES[city]}, request, f"the time in {city}",
                json.dumps({"timezone": TIMEZONES[city], "time": hhmm}), f"It is {hhmm} in {city}.")


def _calc_task(rng: random.Random) -> Task:
    a, b, op = rng.randint(2, 999), rng.randint(2, 99), _pick(rng, ["+", "-", "*"])
    expr = f"{a} {op} {b}"
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    request = _pick(rng, ["What is {e}?", "Calculate {e}.", "Compute {e} for me.", "{e} = ?"]).format(e=expr)
    return Task({"expression": expr}, request, f"the value of {expr}", str(value), f"{expr} = {value}.")


def _currency_task(rng: random.Random) -> Task:
    src, dst = rng.sample(CURRENCIES, 2)
    amount = rng.randint(1, 500)
    request = _pick(rng, ["Convert {a} {s} to {d}.", "How much is {a} {s} in {d}?",
                          "What are {a} {s} worth in {d}?"]).format(a=amount, s=src, d=dst)
    value = round(amount * rng.uniform(0.5, 1.5), 2)
    return Task({"amount": amount, "from": src, "to": dst}, request, f"{amount} {src} in {dst}",
                json.dumps({"result": value, "currency": dst}), f"{amount} {src} is {value} {dst}.")


def _email_task(rng: random.Random) -> Task:
    to = f"{_pick(rng, NAMES)}@{_pick(rng, DOMAINS)}"
    subject = f"{_pick(rng, WORDS)} {_pick(rng, ['update', 'meeting', 'report', 'question'])}"
    request = _pick(rng, ["Send an email to {t} with the subject {s}.", "Email {t} about {s}.",
                          "Write to {t}, subject: {s}"]).format(t=to, s=subject)
    return Task({"to": to, "subject": subject}, request, f"an email to {to}", "sent",
                f"I sent the email about {subject} to {to}.")


FAMILIES: list[Family] = [
    Family("read_file", [
        Variant("read_file", "Read a text file and return its contents.",
                {"path": _s("Path of the file, relative to the working directory")}, ["path"], {"path": "path"}),
        Variant("view_file", "Show the contents of a file.", {"file_path": _s("The file to show")}, ["file_path"],
                {"file_path": "path"}),
        Variant("Read", "Reads a file from the local filesystem.", {"file_path": _s("The path of the file to read")},
                ["file_path"], {"file_path": "path"}),
    ], _read_task, 2.0),
    Family("list_directory", [
        Variant("list_directory", "List the entries of a directory.",
                {"path": _s("Directory to list"), "recursive": {"type": "boolean", "description": "Descend into "
                 "subdirectories"}}, ["path"], {"path": "path", "recursive": "recursive"}),
        Variant("ls", "List files in a directory.", {"dir": _s("The directory"), "recursive": {"type": "boolean"}},
                ["dir"], {"dir": "path", "recursive": "recursive"}),
        Variant("list_files", "Return the files under a folder.", {"directory": _s("Folder path"),
                "recursive": {"type": "boolean"}}, ["directory"], {"directory": "path", "recursive": "recursive"}),
    ], _list_task, 1.5),
    Family("run_shell_command", [
        Variant("run_shell_command", "Run a shell command and return its output.",
                {"command": _s("The command line to run"), "timeout": {"type": "integer", "description": "Seconds "
                 "before the command is stopped", "minimum": 1}}, ["command"], {"command": "command",
                 "timeout": "timeout"}),
        Variant("bash", "Execute a bash command.", {"cmd": _s("Command"), "timeout": {"type": "integer"}}, ["cmd"],
                {"cmd": "command", "timeout": "timeout"}),
        Variant("Bash", "Executes a given bash command in a persistent shell session.",
                {"command": _s("The command to execute"), "timeout": {"type": "number", "description": "Optional "
                 "timeout in seconds"}}, ["command"], {"command": "command", "timeout": "timeout"}),
    ], _shell_task, 2.0),
    Family("get_weather", [
        Variant("get_weather", "Get the current weather for a city.",
                {"city": _s("City name"), "unit": _s("Temperature unit", enum=["celsius", "fahrenheit"])}, ["city"],
                {"city": "city", "unit": "unit"}),
        Variant("weather_lookup", "Look up current weather conditions.",
                {"location": _s("A city"), "units": _s("celsius or fahrenheit", enum=["celsius", "fahrenheit"])},
                ["location"], {"location": "city", "units": "unit"}),
        Variant("current_weather", "Current weather by city.", {"city": _s("City")}, ["city"], {"city": "city"}),
    ], _weather_task, 1.5),
    Family("search_web", [
        Variant("search_web", "Search the web and return the top results.",
                {"query": _s("Search query"), "max_results": {"type": "integer", "minimum": 1, "maximum": 10}},
                ["query"], {"query": "query", "max_results": "max_results"}),
        Variant("web_search", "Web search.", {"q": _s("Query"), "limit": {"type": "integer"}}, ["q"],
                {"q": "query", "limit": "max_results"}),
    ], _search_task),
    Family("search_files", [
        Variant("search_files", "Find lines matching a pattern in the files under a directory.",
                {"pattern": _s("Text or regular expression"), "path": _s("Directory to search")},
                ["pattern", "path"], {"pattern": "pattern", "path": "path"}),
        Variant("grep", "Search file contents.", {"pattern": _s("Pattern"), "dir": _s("Where to search")},
                ["pattern"], {"pattern": "pattern", "dir": "path"}),
        Variant("Grep", "A search tool built on ripgrep.", {"pattern": _s("The regular expression to search for"),
                "path": _s("File or directory to search in")}, ["pattern"], {"pattern": "pattern", "path": "path"}),
    ], _grep_task),
    Family("write_file", [
        Variant("write_file", "Write text to a file, replacing it.", {"path": _s("File path"),
                "content": _s("The new contents")}, ["path", "content"], {"path": "path", "content": "content"}),
        Variant("create_file", "Create a file with the given text.", {"filename": _s("Name of the file"),
                "text": _s("File contents")}, ["filename", "text"], {"filename": "path", "text": "content"}),
    ], _write_task),
    Family("get_time", [
        Variant("get_current_time", "Current local time in a time zone.", {"timezone": _s("IANA time zone, e.g. "
                "Europe/Paris")}, ["timezone"], {"timezone": "timezone"}),
        Variant("world_clock", "What time it is somewhere.", {"tz": _s("IANA zone name")}, ["tz"],
                {"tz": "timezone"}),
    ], _time_task),
    Family("calculator", [
        Variant("calculator", "Evaluate an arithmetic expression.", {"expression": _s("e.g. 12 * 7")},
                ["expression"], {"expression": "expression"}),
        Variant("evaluate", "Compute a math expression.", {"expr": _s("Expression")}, ["expr"],
                {"expr": "expression"}),
    ], _calc_task),
    Family("convert_currency", [
        Variant("convert_currency", "Convert an amount between currencies.",
                {"amount": {"type": "number", "description": "Amount to convert"}, "from": _s("ISO code, e.g. USD"),
                 "to": _s("ISO code, e.g. EUR")}, ["amount", "from", "to"],
                {"amount": "amount", "from": "from", "to": "to"}),
        Variant("fx_convert", "Currency conversion.", {"value": {"type": "number"}, "source": _s("From currency"),
                "target": _s("To currency")}, ["value", "source", "target"],
                {"value": "amount", "source": "from", "target": "to"}),
    ], _currency_task),
    Family("send_email", [
        Variant("send_email", "Send an email.", {"to": _s("Recipient address"), "subject": _s("Subject line")},
                ["to", "subject"], {"to": "to", "subject": "subject"}),
        Variant("email_send", "Send a short email message.", {"recipient": _s("Address"), "title": _s("Subject")},
                ["recipient", "title"], {"recipient": "to", "title": "subject"}),
    ], _email_task),
]
FAMILY = {f.key: f for f in FAMILIES}
# The first variant of each family is its usual name (the one most tool lists use); it is drawn half the time.
CANONICAL_SHARE = 0.5


def pick_variant(rng: random.Random, fam: Family) -> Variant:
    if rng.random() < CANONICAL_SHARE or len(fam.variants) == 1:
        return fam.variants[0]
    return _pick(rng, fam.variants[1:])


def pick_family(rng: random.Random, exclude: set[str] = frozenset()) -> Family:
    pool = [f for f in FAMILIES if f.key not in exclude]
    return rng.choices(pool, weights=[f.weight for f in pool])[0]


# ----------------------------------------------------------------------------------------------- conversations
# Many OpenAI clients send earlier assistant turns back without `reasoning_content`; with tools the encoder then
# renders them as `<think></think>...`. That share of tool conversations shows such a history (never trained on).
CLIENT_DROPS_REASONING = 0.3
def system_prompt(rng: random.Random) -> str | None:
    n = rng.choice([0, 1, 1, 2, 3, 5, 8])
    return " ".join(rng.sample(SYSTEM_SENTENCES, n)) if n else None


def chat_exchange(rng: random.Random, arithmetic: bool = True) -> tuple[str, str, str]:
    """(request, reasoning, answer) of a turn that needs no tool (no sums when a calculator is declared)."""
    kind = rng.random()
    if not arithmetic and 0.7 <= kind < 0.85:
        kind = 0.9
    if kind < 0.2:
        req, ans = _pick(rng, GREETINGS)
        return req, "The user is making small talk. A short friendly reply is enough.", ans
    if kind < 0.4:
        country = _pick(rng, sorted(CAPITALS))
        return (f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}.",
                f"The capital of {country} is {CAPITALS[country]}.")
    if kind < 0.55:
        q, a = _pick(rng, FACTS)
        return q, "I know this one.", a
    if kind < 0.7:
        phrase = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        return f"Repeat after me: {phrase}", "The user wants the phrase repeated exactly.", phrase
    if kind < 0.85:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {a + b}."
    n = rng.randint(3, 8)
    return f"Count from 1 to {n}.", f"I list the numbers 1 to {n}.", ", ".join(str(i) for i in range(1, n + 1)) + "."


def tool_turns(rng: random.Random, declared: dict[str, Variant], fam: Family, call_id: int) -> list[Message]:
    """User request -> assistant call(s) -> tool result(s) -> assistant answer, for the declared `fam`."""
    variant = declared[fam.key]
    tasks = [fam.make(rng)]
    if rng.random() < 0.08:  # two calls in one block: the same family twice
        tasks.append(fam.make(rng))
    request = tasks[0].request if len(tasks) == 1 else f"{tasks[0].request} Also: {tasks[1].request}"
    calls, results = [], []
    for i, t in enumerate(tasks):
        cid = f"call_{call_id + i}"
        calls.append({"id": cid, "type": "function", "function": {
            "name": variant.name, "arguments": json.dumps(variant.arguments(t.values), ensure_ascii=False)}})
        results.append({"role": "tool", "tool_call_id": cid, "content": t.result})
    intents = " and ".join(t.intent for t in tasks)
    args_said = "; ".join(", ".join(f"{k} {v}" for k, v in variant.arguments(t.values).items()) for t in tasks)
    think1 = f"The user wants {intents}. I will call {variant.name} with {args_said}."
    think2 = "The tool answered. I can reply now." if len(tasks) == 1 else "Both calls answered. I can reply now."
    answer = " ".join(t.answer for t in tasks)
    return [{"role": "user", "content": request},
            {"role": "assistant", "reasoning_content": think1, "content": "", "tool_calls": calls},
            *results,
            {"role": "assistant", "reasoning_content": think2, "content": answer}]


def generate_conversation(rng: random.Random) -> dict[str, Any]:
    """One conversation: {"messages", "tools" (or None), "thinking_mode"}."""
    mode = "thinking" if rng.random() < 0.5 else "chat"
    messages: list[Message] = []
    sys_text = system_prompt(rng)
    if sys_text:
        messages.append({"role": "system", "content": sys_text})
    tools = None
    kind = rng.random()
    if kind < 0.62:  # tools declared
        n_tools = rng.choice([1, 1, 2, 2, 3, 4])
        fams: list[Family] = []
        while len(fams) < n_tools:
            fams.append(pick_family(rng, {f.key for f in fams}))
        declared = {f.key: pick_variant(rng, f) for f in fams}
        tools = [declared[f.key].tool() for f in rng.sample(fams, len(fams))]
        call_id = rng.randrange(1000)
        for turn in range(rng.choice([1, 2, 2, 3, 3, 4])):
            if turn == 0 and kind < 0.52 or turn > 0 and rng.random() < 0.6:
                messages += tool_turns(rng, declared, _pick(rng, fams), call_id)
                call_id += 2
            else:  # tools are offered but this request needs none
                req, think, ans = chat_exchange(rng, arithmetic="calculator" not in declared)
                messages += [{"role": "user", "content": req},
                             {"role": "assistant", "reasoning_content": think + " No tool is needed.", "content": ans}]
        if mode == "thinking" and rng.random() < CLIENT_DROPS_REASONING:
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            for m in messages[:last]:
                m.pop("reasoning_content", None)
    else:
        for _ in range(rng.choice([1, 1, 2, 3])):
            req, think, ans = chat_exchange(rng)
            messages += [{"role": "user", "content": req},
                         {"role": "assistant", "reasoning_content": think, "content": ans}]
    return {"messages": messages, "tools": tools, "thinking_mode": mode}


def generate_conversations(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [generate_conversation(rng) for _ in range(n)]


# ----------------------------------------------------------------------------------------------- rendering
def render(messages: list[Message], conv: dict[str, Any]) -> str:
    return encode_messages(messages, thinking_mode=conv["thinking_mode"], tools=conv["tools"])


def conversation_record(conv: dict[str, Any]) -> dict[str, Any]:
    """{"segments": [...]}: the rendered conversation, its inference-time assistant replies marked as trained."""
    msgs = conv["messages"]
    full = render(msgs, conv)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        if conv["thinking_mode"] == "thinking" and not m.get("reasoning_content"):
            continue  # a history turn whose reasoning the client dropped: the model never writes it that way
        prompt, upto = render(msgs[:i], conv), render(msgs[: i + 1], conv)
        # Trained only where the whole conversation shows the reply exactly as the model writes it at inference.
        if upto.startswith(prompt) and full.startswith(upto):
            spans.append((len(prompt), len(upto)))
    segments, pos = [], 0
    for start, end in spans:
        if start > pos:
            segments.append({"text": full[pos:start], "train": False})
        segments.append({"text": full[start:end], "train": True})
        pos = end
    if pos < len(full):
        segments.append({"text": full[pos:], "train": False})
    return {"segments": segments}


def prompt_cases(conv: dict[str, Any]) -> list[dict[str, Any]]:
    """The generation points of a conversation, for evaluation: one per assistant reply, with what it should be.

    Each case: {"messages": the conversation before the reply, "tools", "thinking_mode", "expected": the reply}."""
    out = []
    for i, m in enumerate(conv["messages"]):
        if m["role"] == "assistant":
            out.append({"messages": conv["messages"][:i], "tools": conv["tools"],
                        "thinking_mode": conv["thinking_mode"], "expected": m})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m dsv4.train.chat_data", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="JSONL file to write")
    p.add_argument("--conversations", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bible", type=Path, default=None, help="KJV JSONL (recipes/make_kjv_corpus.py) to mix in")
    p.add_argument("--bible-chapters", type=int, default=300, help="how many chapters of it (a seeded sample)")
    args = p.parse_args(argv)
    if args.bible is not None and not args.bible.is_file():
        print(f"{args.bible} does not exist; make it with python3 recipes/make_kjv_corpus.py", file=sys.stderr)
        return 1
    records = [conversation_record(c) for c in generate_conversations(args.conversations, args.seed)]
    chars_trained = sum(len(s["text"]) for r in records for s in r["segments"] if s["train"])
    chars_all = sum(len(s["text"]) for r in records for s in r["segments"])
    if args.bible is not None:
        chapters = [json.loads(line) for line in args.bible.read_text(encoding="utf-8").splitlines() if line.strip()]
        picked = random.Random(args.seed + 1).sample(chapters, min(args.bible_chapters, len(chapters)))
        bible_chars = sum(len(c["text"]) for c in picked)
        records += picked
        random.Random(args.seed + 2).shuffle(records)
        print(f"{len(picked)} Bible chapters ({bible_chars} chars, all trained)")
    with args.out.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{args.conversations} conversations ({chars_all} chars, {chars_trained} trained) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
