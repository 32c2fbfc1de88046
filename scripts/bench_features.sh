#!/usr/bin/env bash
# What a feature costs the batch, side by side in one run: serves the packaged SmolLM2 GGUF (llama.cpp), then
# interleaves `lmfleet bench` at 16 streams (64 tokens, ignore_eos) of plain requests, requests under a JSON schema
# (constrained decoding), and requests asking for log probabilities (top 5), ROUNDS times; prints output tok/s per
# round, the medians and the ratios to plain.
#   scripts/bench_features.sh [ROUNDS] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
OUT=${2:-bench-results/features}
BIN=${BIN:-.venv/bin}
PORT=${PORT:-8140}
mkdir -p "$OUT"
cat > "$OUT/schema.json" <<'JSON'
{"type": "object", "properties": {"words": {"type": "array", "items": {"type": "string", "maxLength": 12},
 "minItems": 40, "maxItems": 40}}, "required": ["words"]}
JSON
"$BIN/lmfleet" serve --port "$PORT" --controller-port $((PORT + 1)) --worker-port $((PORT + 2)) > "$OUT/serve.log" 2>&1 &
SERVE=$!
trap 'kill -TERM $SERVE 2>/dev/null; wait $SERVE 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do grep -q "lmfleet is serving" "$OUT/serve.log" && break; sleep 1; done
common=(--base-url "http://127.0.0.1:$PORT/v1" --concurrency 16 --requests 32 --warmup 2 --max-tokens 64 --ignore-eos
        --quiet)
for round in $(seq 1 "$ROUNDS"); do
  "$BIN/lmfleet" bench "${common[@]}" --json "$OUT/plain-$round.json"
  "$BIN/lmfleet" bench "${common[@]}" --response-format "$OUT/schema.json" --json "$OUT/schema-$round.json"
  "$BIN/lmfleet" bench "${common[@]}" --logprobs 5 --json "$OUT/logprobs-$round.json"
done
"$BIN/python" - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
tok_s = {m: [json.loads(p.read_text())["levels"][0]["output_tok_s"] for p in sorted(out.glob(f"{m}-*.json"))]
         for m in ("plain", "schema", "logprobs")}
base = statistics.median(tok_s["plain"])
for mode, values in tok_s.items():
    median = statistics.median(values)
    print(f"{mode:9s} {' '.join(f'{v:6.1f}' for v in values)}   median {median:6.1f}   x{median / base:.2f}")
PY
