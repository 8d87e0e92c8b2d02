#!/usr/bin/env bash
# One non-interactive turn of Claude Code and of Codex CLI against `dsv4 serve`, each configured with nothing but the
# server's base URL and key (issue 12). Not part of the test suite: it installs both CLIs from npm into a temporary
# prefix (nodejs/npm from apt-get when missing) and needs minutes of prefill for their 15K-55K token prompts on a CPU.
#
#   scripts/agent_clis.sh                       # the bundled model on 127.0.0.1:18150
#   MODEL=/path/to/ckpt PORT=18151 scripts/agent_clis.sh
#   CLAUDE_VERSION=2.1.197 CODEX_VERSION=0.171.0 scripts/agent_clis.sh   (the default versions)
#   ONLY=codex THINKING=disabled scripts/agent_clis.sh                   (one CLI; chat mode by default)
#
# The server runs with --accept-any-model-name, because each CLI asks for its own default model (claude-sonnet-...,
# gpt-...-codex) when nothing else is configured. Telemetry is off (DISABLE_TELEMETRY, no nonessential traffic);
# both CLIs get a fresh HOME / CODEX_HOME, so no earlier login or config takes part. The last stdout line is JSON.
set -u

PORT=${PORT:-18150}
KEY=${KEY:-agent-clis-key}
CLAUDE_VERSION=${CLAUDE_VERSION:-2.1.197}
CODEX_VERSION=${CODEX_VERSION:-0.171.0}
TURN_TIMEOUT=${TURN_TIMEOUT:-1500}
PROMPT=${PROMPT:-"Say hello in one short sentence."}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/dsv4-agent-clis.XXXXXX)
URL="http://127.0.0.1:${PORT}"
SERVER_PID=""

cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -INT "$SERVER_PID"
        wait "$SERVER_PID" 2>/dev/null
    fi
    # the npm prefix is ~650 MB; the logs, outputs and the CLIs' session files stay in $WORK (KEEP_NPM=1 keeps all)
    [ -n "${KEEP_NPM:-}" ] || rm -rf "$WORK/npm"
}
trap cleanup EXIT

if ! command -v npm >/dev/null 2>&1; then
    echo "npm not found: installing nodejs and npm with apt-get" >&2
    apt-get update -qq && apt-get install -y -qq nodejs npm >&2 || { echo "apt-get install nodejs npm failed" >&2; exit 2; }
fi

echo "== installing @anthropic-ai/claude-code@${CLAUDE_VERSION} and @openai/codex@${CODEX_VERSION} into $WORK/npm" >&2
npm install --silent --no-fund --no-audit --prefix "$WORK/npm" \
    "@anthropic-ai/claude-code@${CLAUDE_VERSION}" "@openai/codex@${CODEX_VERSION}" >&2 \
    || { echo "npm install failed" >&2; exit 2; }
BIN="$WORK/npm/node_modules/.bin"

echo "== starting dsv4 serve on $URL" >&2
SERVE_ARGS=(serve --port "$PORT" --api-key "$KEY" --accept-any-model-name --log-level info)
[ -n "${MODEL:-}" ] && SERVE_ARGS+=(--model "$MODEL")
# THINKING=disabled: chat mode for requests that do not choose (the bundled model rarely closes its reasoning, so
# with thinking on its whole output is reasoning and the CLIs print an empty answer)
[ -n "${THINKING:-}" ] && SERVE_ARGS+=(--thinking "$THINKING")
PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" python3 -m dsv4.cli "${SERVE_ARGS[@]}" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 300); do
    curl -sf "$URL/health" >/dev/null 2>&1 && break
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "dsv4 serve exited:" >&2; tail -20 "$WORK/server.log" >&2; exit 2; }
    sleep 1
done

mkdir -p "$WORK/project" "$WORK/home-claude" "$WORK/home-codex/.codex"
# Codex 0.171 ignores OPENAI_BASE_URL (it goes to api.openai.com): the base URL and the key's variable are a model
# provider in its config; no model is set, so it asks for its own default model name.
cat >"$WORK/home-codex/.codex/config.toml" <<TOML
model_provider = "dsv4"

[model_providers.dsv4]
name = "dsv4"
base_url = "$URL/v1"
env_key = "DSV4_API_KEY"
wire_api = "responses"
TOML
ONLY=${ONLY:-}  # "claude" or "codex" to run one of the two
claude_rc=-1 claude_s=0 codex_rc=-1 codex_s=0

touch "$WORK/claude.out" "$WORK/claude.err" "$WORK/codex.out" "$WORK/codex.err"
if [ "$ONLY" != codex ]; then
    echo "== claude -p (Claude Code ${CLAUDE_VERSION})" >&2
    start=$(date +%s)
    (cd "$WORK/project" && HOME="$WORK/home-claude" ANTHROPIC_BASE_URL="$URL" ANTHROPIC_API_KEY="$KEY" \
        DISABLE_TELEMETRY=1 CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 \
        timeout "$TURN_TIMEOUT" "$BIN/claude" -p "$PROMPT" --output-format json) >"$WORK/claude.out" 2>"$WORK/claude.err"
    claude_rc=$?
    claude_s=$(( $(date +%s) - start ))
fi

if [ "$ONLY" != claude ]; then
    echo "== codex exec (Codex CLI ${CODEX_VERSION})" >&2
    start=$(date +%s)
    (cd "$WORK/project" && HOME="$WORK/home-codex" CODEX_HOME="$WORK/home-codex/.codex" DSV4_API_KEY="$KEY" \
        timeout "$TURN_TIMEOUT" "$BIN/codex" exec --skip-git-repo-check "$PROMPT") >"$WORK/codex.out" 2>"$WORK/codex.err"
    codex_rc=$?
    codex_s=$(( $(date +%s) - start ))
fi

echo "== server request log" >&2
grep "dsv4.serve.requests" "$WORK/server.log" >&2
echo "== claude stdout (last 1500 bytes)" >&2; tail -c 1500 "$WORK/claude.out" >&2; echo >&2
echo "== claude stderr (last 1500 bytes)" >&2; tail -c 1500 "$WORK/claude.err" >&2; echo >&2
echo "== codex stdout (last 1500 bytes)" >&2; tail -c 1500 "$WORK/codex.out" >&2; echo >&2
echo "== codex stderr (last 1500 bytes)" >&2; tail -c 1500 "$WORK/codex.err" >&2; echo >&2

python3 - "$WORK" "$claude_rc" "$claude_s" "$codex_rc" "$codex_s" "$CLAUDE_VERSION" "$CODEX_VERSION" <<'EOF'
import json, re, sys
work, claude_rc, claude_s, codex_rc, codex_s, claude_v, codex_v = sys.argv[1:]
log = open(f"{work}/server.log", errors="replace").read()
requests = re.findall(r"dsv4\.serve\.requests: (\S+ \S+ \d+) ", log)
try:
    claude = json.loads(open(f"{work}/claude.out").read() or "null")
except ValueError:
    claude = None
print(json.dumps({
    "claude_code": {"version": claude_v, "exit": int(claude_rc), "seconds": int(claude_s),
                    "is_error": claude.get("is_error") if isinstance(claude, dict) else None,
                    "result": (claude.get("result") or "")[:200] if isinstance(claude, dict) else None},
    "codex": {"version": codex_v, "exit": int(codex_rc), "seconds": int(codex_s),
              "answer": open(f"{work}/codex.out", errors="replace").read()[-200:]},
    "server_requests": requests, "work_dir": work,
}))
EOF
