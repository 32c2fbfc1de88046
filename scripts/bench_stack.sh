#!/usr/bin/env bash
# Measure the served stack against the model's own limit, side by side in one run:
#   scripts/bench_stack.sh [float32|bfloat16] [OUT_DIR]
# Builds the 116M-parameter benchmark model (random weights) if it is missing, runs `lmfleet bench` against
# controller + worker + API server started with `lmfleet serve` (streaming chat, 1/4/16 concurrent streams of
# 64 tokens), stops it, then runs `lmfleet bench --raw` (plain batched greedy decode in process, no server)
# with the same prompt length in tokens, and prints served/raw ratios and the worker's peak RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
DTYPE=${1:-float32}
OUT=${2:-bench-results}
MODEL=${MODEL:-.models/small}
BIN=${BIN:-.venv/bin}
PORT=${PORT:-8123}
WORDS=${WORDS:-8}  # 8 words + the chat template ≈ 20 prompt tokens
CPORT=$((PORT + 1)); WPORT=$((PORT + 2))
mkdir -p "$OUT"
[ -f "$MODEL/config.json" ] || "$BIN/lmfleet" make-test-model "$MODEL" --size small

echo "== lmfleet (controller + worker + API), $DTYPE"
"$BIN/lmfleet" serve --model-path "$MODEL" --model-names small --dtype "$DTYPE" --port "$PORT" \
  --controller-port "$CPORT" --worker-port "$WPORT" --log-level warning > "$OUT/serve-$DTYPE.log" 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null; wait $SERVE 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  grep -q "lmfleet is serving" "$OUT/serve-$DTYPE.log" && break
  kill -0 $SERVE 2>/dev/null || { cat "$OUT/serve-$DTYPE.log"; exit 1; }
  sleep 0.5
done
"$BIN/lmfleet" bench --base-url "http://127.0.0.1:$PORT/v1" --model small --concurrency 1,4,16 --warmup 2 \
  --prompt-tokens "$WORDS" --ignore-eos --max-tokens 64 --quiet --json "$OUT/served-$DTYPE.json"
WORKER=$(pgrep -f "lmfleet.worker --port $WPORT" | head -1)
RSS=$(awk '/VmHWM/ {printf "%.2f GB", $2/1024/1024}' "/proc/$WORKER/status")
kill $SERVE; wait $SERVE 2>/dev/null || true

PROMPT=$("$BIN/python" -c "import json,sys; l=json.load(open(sys.argv[1]))['levels'][-1]; \
print(round(l['prompt_tokens']/l['ok']))" "$OUT/served-$DTYPE.json")
echo "== raw batched decode, $DTYPE, $PROMPT-token prompts"
"$BIN/lmfleet" bench --raw --model-path "$MODEL" --dtype "$DTYPE" --concurrency 1,4,16 --prompt-tokens "$PROMPT" \
  --max-tokens 64 --quiet --json "$OUT/raw-$DTYPE.json"

echo "== served / raw, $DTYPE (worker peak RSS $RSS)"
"$BIN/python" - "$OUT/served-$DTYPE.json" "$OUT/raw-$DTYPE.json" <<'PY'
import json, sys
served, raw = (json.load(open(p))["levels"] for p in sys.argv[1:3])
for s, r in zip(served, raw):
    ttft = s["ttft_ms"]["p50"] if s.get("ttft_ms") else float("nan")
    print(f"streams {s['concurrency']:>2}: served {s['output_tok_s']:7.1f} tok/s   raw {r['output_tok_s']:7.1f} tok/s"
          f"   ratio {s['output_tok_s'] / r['output_tok_s']:.2f}   TTFT p50 {ttft:.0f} ms")
PY
