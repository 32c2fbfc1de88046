#!/usr/bin/env bash
# lmfleet's llama.cpp engine against llama.cpp's own servers, on the same GGUF, in one run:
#   scripts/bench_llamacpp.sh [ROUNDS] [OUT_DIR]
# Each round runs, one system at a time (they share the cores), the same `lmfleet bench` sweep (streaming chat,
# 1/4/16 concurrent streams of 64 tokens with ignore_eos, ~28 prompt tokens) against
#   lmfleet      `lmfleet serve` (controller + llama.cpp worker + API server)
#   llama-server llama.cpp's C++ server, -np 16, built from the llama.cpp that llama-cpp-python vendors
#   llama_cpp    `python -m llama_cpp.server` (llama-cpp-python's bundled server)
# and records each one's peak resident memory; rounds interleave the systems (the machine drifts), and the
# summary prints medians and the ratios taken in the same run. Each system is measured once it lists the model
# in /v1/models (lmfleet answers /v1/models before its worker has registered; llama-server answers 503 while
# loading).
# MODEL: the GGUF (default: the packaged SmolLM2). NAME: the model name every system serves it under and the bench
# asks for (default: smollm2). On Qwen2.5-Coder-1.5B-Instruct:
#   MODEL=$(python3 scripts/real_models.py path qwen2.5-coder-1.5b) NAME=qwen2.5-coder-1.5b scripts/bench_llamacpp.sh 2
# LLAMA_SERVER: path to the llama-server binary (skipped when unset). LLAMA_CPP_PY: a Python that has
# `llama-cpp-python[server]` (skipped when unset). This script builds neither. llama-server from the llama.cpp that
# llama-cpp-python 0.3.36 vendors (about 6-8 minutes on 2 cores; the UI flags keep cmake from downloading the web
# UI, which it cannot here):
#   pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcp
#   tar xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp
#   cmake -S /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp -B /tmp/lcp/build -G Ninja -DCMAKE_BUILD_TYPE=Release \
#     -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF && cmake --build /tmp/lcp/build --target llama-server
#   LLAMA_SERVER=/tmp/lcp/build/bin/llama-server scripts/bench_llamacpp.sh 2
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
OUT=${2:-bench-results/llamacpp}
BIN=${BIN:-.venv/bin}
MODEL=${MODEL:-$("$BIN/lmfleet" model-path)}
NAME=${NAME:-smollm2}
THREADS=${THREADS:-$(nproc)}
PORT=${PORT:-8131}
WORDS=${WORDS:-8}  # 8 words + the chat template ≈ 28 prompt tokens
mkdir -p "$OUT"
source scripts/bench_servers.sh  # PIDS and their cleanup, wait_model, peak_rss

run_one() {  # SYSTEM ROUND
  local name=$1 round=$2 log="$OUT/$1-$2.log" pid rss pattern
  case $name in
    lmfleet)
      "$BIN/lmfleet" serve --model-path "$MODEL" --model-names "$NAME" --port "$PORT" --controller-port \
        $((PORT + 1)) --worker-port $((PORT + 2)) --threads "$THREADS" --log-level warning > "$log" 2>&1 &
      pattern="lmfleet.worker --port $((PORT + 2))" ;;
    llama-server)
      "$LLAMA_SERVER" -m "$MODEL" -np 16 -c 8192 -t "$THREADS" --host 127.0.0.1 --port "$PORT" \
        --alias "$NAME" > "$log" 2>&1 &
      pattern="llama-server -m" ;;
    llama_cpp)
      "$LLAMA_CPP_PY" -m llama_cpp.server --model "$MODEL" --model_alias "$NAME" --n_threads "$THREADS" \
        --n_ctx 8192 --interrupt_requests False --host 127.0.0.1 --port "$PORT" > "$log" 2>&1 &
      pattern="llama_cpp.server --model" ;;
  esac
  pid=$!
  PIDS+=("$pid")
  wait_model "http://127.0.0.1:$PORT" "$pid" "$log"
  echo "== round $round: $name"
  "$BIN/lmfleet" bench --base-url "http://127.0.0.1:$PORT/v1" --model "$NAME" --concurrency 1,4,16 --warmup 2 \
    --prompt-tokens "$WORDS" --ignore-eos --max-tokens 64 --quiet --json "$OUT/$name-$round.json"
  rss=$(peak_rss "$pattern")
  echo "{\"rss_mb\": ${rss:-null}}" > "$OUT/$name-$round.rss.json"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  sleep 1
}

SYSTEMS=(lmfleet)
[ -n "${LLAMA_SERVER:-}" ] && SYSTEMS+=(llama-server)
[ -n "${LLAMA_CPP_PY:-}" ] && SYSTEMS+=(llama_cpp)
for round in $(seq "$ROUNDS"); do
  for name in "${SYSTEMS[@]}"; do run_one "$name" "$round"; done
done

"$BIN/python" - "$OUT" "$ROUNDS" "${SYSTEMS[@]}" <<'PY'
import json, statistics, sys
out, rounds, systems = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def load(name, r, kind="json"):
    return json.load(open(f"{out}/{name}-{r}.{kind}" if kind != "json" else f"{out}/{name}-{r}.json"))
med = {}
for name in systems:
    runs = [load(name, r)["levels"] for r in range(1, rounds + 1)]
    tok = [statistics.median(run[i]["output_tok_s"] for run in runs) for i in range(3)]
    ttft = statistics.median(run[2]["ttft_ms"]["p50"] for run in runs if run[2].get("ttft_ms"))
    errors = sum(lv["errors"] for run in runs for lv in run)
    rss = [json.load(open(f"{out}/{name}-{r}.rss.json"))["rss_mb"] for r in range(1, rounds + 1)]
    med[name] = tok
    print(f"{name:13s} tok/s @1/4/16: {tok[0]:6.1f} {tok[1]:6.1f} {tok[2]:6.1f}   first token p50 @16: "
          f"{ttft / 1000:.2f} s   peak RSS: {max(r or 0 for r in rss)} MB   errors: {errors}")
def tok_s(name, r):
    return [lv["output_tok_s"] for lv in load(name, r)["levels"]]
for other in systems[1:]:
    ratios = " ".join(f"{a / b:.2f}" for a, b in zip(med["lmfleet"], med[other]))
    print(f"lmfleet / {other} @1/4/16, medians: {ratios}")
    # each round's own ratio (the two systems ran minutes apart), then their spread across rounds
    per_round = [[a / b for a, b in zip(tok_s("lmfleet", r), tok_s(other, r))] for r in range(1, rounds + 1)]
    for r, ratio in enumerate(per_round, 1):
        print(f"  round {r}: " + " ".join(f"{x:.2f}" for x in ratio))
    spread = " ".join(f"{min(c):.2f}-{max(c):.2f}" for c in zip(*per_round))
    print(f"  spread across rounds @1/4/16: {spread}")
PY
