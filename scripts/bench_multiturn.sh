#!/usr/bin/env bash
# Multi-turn chat, lmfleet against llama.cpp's own server on the same GGUF, in one run:
#   scripts/bench_multiturn.sh [ROUNDS] [OUT_DIR]
# Each round runs, one system at a time (they share the cores), the same `lmfleet bench --multi-turn` (USERS users
# x TURNS turns in a closed loop: each user sends turn t+1 once turn t is answered; every prompt is a shared system
# prompt of ~SYSTEM words and the whole history, earlier answers included; MAX_TOKENS tokens a turn) against
#   lmfleet      `lmfleet serve` (controller + llama.cpp worker + API server)
#   llama-server llama.cpp's C++ server, -np USERS -c CTX (a slot per user)
# Rounds interleave the systems (the machine drifts); the summary prints, per system, the medians over rounds of the
# time to first token of first turns and of later turns (p50 / p90), output tok/s, wall time and the prompt tokens
# the server said it served from its cache, then the ratios taken in the same run.
# The issue's workload is the default (12 users x 4 turns, ~300-word system prompt, 32 tokens a turn); a quick check
# that it runs end to end:
#   USERS=2 TURNS=2 LLAMA_SERVER=/path/to/llama-server scripts/bench_multiturn.sh 1
# The full one, on Qwen2.5-Coder-1.5B-Instruct (about the model an agent would run):
#   MODEL=$(python3 scripts/real_models.py path qwen2.5-coder-1.5b) NAME=qwen2.5-coder-1.5b \
#     LLAMA_SERVER=/path/to/llama-server scripts/bench_multiturn.sh 2
# MODEL: the GGUF (default: the packaged SmolLM2). NAME: the model name both systems serve it under. LLAMA_SERVER:
# the llama-server binary (skipped when unset; scripts/bench_llamacpp.sh says how to build it).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
OUT=${2:-bench-results/multiturn}
BIN=${BIN:-.venv/bin}
MODEL=${MODEL:-$("$BIN/lmfleet" model-path)}
NAME=${NAME:-smollm2}
THREADS=${THREADS:-$(nproc)}
PORT=${PORT:-8141}
USERS=${USERS:-12}
TURNS=${TURNS:-4}
SYSTEM=${SYSTEM:-300}  # words in the shared system prompt, about as many tokens
WORDS=${WORDS:-20}  # words in each user turn
MAX_TOKENS=${MAX_TOKENS:-32}
CTX=${CTX:-8192}  # llama-server's context, shared by its USERS slots
mkdir -p "$OUT"
source scripts/bench_servers.sh  # PIDS and their cleanup, wait_model, peak_rss

run_one() {  # SYSTEM ROUND
  local name=$1 round=$2 log="$OUT/$1-$2.log" pid
  case $name in
    lmfleet)
      "$BIN/lmfleet" serve --model-path "$MODEL" --model-names "$NAME" --port "$PORT" --controller-port \
        $((PORT + 1)) --worker-port $((PORT + 2)) --threads "$THREADS" --log-level warning > "$log" 2>&1 & ;;
    llama-server)
      "$LLAMA_SERVER" -m "$MODEL" -np "$USERS" -c "$CTX" -t "$THREADS" --host 127.0.0.1 --port "$PORT" \
        --alias "$NAME" > "$log" 2>&1 & ;;
  esac
  pid=$!
  PIDS+=("$pid")
  wait_model "http://127.0.0.1:$PORT" "$pid" "$log"
  echo "== round $round: $name"
  "$BIN/lmfleet" bench --base-url "http://127.0.0.1:$PORT/v1" --model "$NAME" --multi-turn --users "$USERS" \
    --turns "$TURNS" --system-tokens "$SYSTEM" --prompt-tokens "$WORDS" --max-tokens "$MAX_TOKENS" --warmup 2 \
    --quiet --json "$OUT/$name-$round.json"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  sleep 1
}

SYSTEMS=(lmfleet)
[ -n "${LLAMA_SERVER:-}" ] && SYSTEMS+=(llama-server)
for round in $(seq "$ROUNDS"); do
  for name in "${SYSTEMS[@]}"; do run_one "$name" "$round"; done
done

"$BIN/python" - "$OUT" "$ROUNDS" "${SYSTEMS[@]}" <<'PY'
import json, statistics, sys
out, rounds, systems = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None

def figures(name):
    runs = [json.load(open(f"{out}/{name}-{r}.json"))["multi_turn"] for r in range(1, rounds + 1)]
    q = lambda run, key, p: (run[key] or {}).get(p)
    return {
        "first p50": median(q(r, "first_turn_ttft_ms", "p50") for r in runs),
        "first p90": median(q(r, "first_turn_ttft_ms", "p90") for r in runs),
        "later p50": median(q(r, "later_turn_ttft_ms", "p50") for r in runs),
        "later p90": median(q(r, "later_turn_ttft_ms", "p90") for r in runs),
        "tok/s": median(r["output_tok_s"] for r in runs),
        "wall s": median(r["wall_s"] for r in runs),
        "cached": median(r["cached_tokens"] for r in runs),
        "prompt": median(r["prompt_tokens"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
    }

def show(value, digits=0):
    return "-" if value is None else f"{value:.{digits}f}"

med = {name: figures(name) for name in systems}
for name, f in med.items():
    print(f"{name:13s} TTFT ms first turns p50/p90: {show(f['first p50'])}/{show(f['first p90'])}   "
          f"later turns: {show(f['later p50'])}/{show(f['later p90'])}   tok/s: {show(f['tok/s'], 1)}   "
          f"wall: {show(f['wall s'], 1)} s   cached prompt tokens: {show(f['cached'])} of {show(f['prompt'])}   "
          f"errors: {f['errors']}")
for other in systems[1:]:
    a, b = med["lmfleet"], med[other]
    ratio = lambda key: "-" if a[key] is None or not b[key] else f"{a[key] / b[key]:.2f}"
    print(f"lmfleet / {other}: TTFT first p50 {ratio('first p50')}, later p50 {ratio('later p50')}, "
          f"later p90 {ratio('later p90')}; tok/s {ratio('tok/s')}; wall {ratio('wall s')}")
PY
