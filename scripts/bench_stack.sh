#!/usr/bin/env bash
# Measure the served stack against the model's own limit, side by side in one run:
#   scripts/bench_stack.sh [float32|bfloat16] [OUT_DIR]
# Builds the 116M-parameter benchmark model (random weights) if it is missing, runs `lmfleet bench --raw`
# (plain batched decode in process) and then `lmfleet bench` against controller + worker + API server
# started with `lmfleet serve`, at 1, 4 and 16 concurrent streams of 64 tokens. Prints the worker's peak RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
DTYPE=${1:-float32}
OUT=${2:-bench-results}
MODEL=${MODEL:-.models/small}
BIN=${BIN:-.venv/bin}
PORT=${PORT:-8123}
CPORT=$((PORT + 1)); WPORT=$((PORT + 2))
mkdir -p "$OUT"
[ -f "$MODEL/config.json" ] || "$BIN/lmfleet" make-test-model "$MODEL" --size small

echo "== raw batched decode, $DTYPE"
"$BIN/lmfleet" bench --raw --model-path "$MODEL" --dtype "$DTYPE" --concurrency 1,4,16 --quiet \
  --json "$OUT/raw-$DTYPE.json"

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
  --ignore-eos --max-tokens 64 --quiet --json "$OUT/served-$DTYPE.json"
WORKER=$(pgrep -f "lmfleet.worker --port $WPORT" | head -1)
echo "worker peak RSS: $(grep VmHWM /proc/"$WORKER"/status | awk '{printf "%.2f GB", $2/1024/1024}')"
