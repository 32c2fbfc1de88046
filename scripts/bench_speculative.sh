#!/usr/bin/env bash
# Speculative decoding: lmfleet's llama.cpp engine with and without it, against llama.cpp's own llama-server with and
# without the same draft, on the same GGUF, in one run:
#   scripts/bench_speculative.sh [ROUNDS] [OUT_DIR]
# Each round runs, one system at a time (they share the cores), two `lmfleet bench` sweeps of streaming chat at
# LEVELS concurrent streams (default 1,4,16):
#   chat  different short prompts (~28 tokens), CHAT_TOKENS (64) tokens each with ignore_eos
#   edit  a code-editing prompt (a Python file to change: the answer mostly repeats it), up to EDIT_TOKENS (320)
#         tokens, ending where the model ends
# against
#   lmfleet              `lmfleet serve`, no speculation
#   lmfleet-ngram        `lmfleet serve --spec-type ngram` (prompt lookup, no draft model)
#   lmfleet-draft        `lmfleet serve --spec-type draft --draft-model-path DRAFT`
#   llama-server         llama.cpp's C++ server, -np 16 (when LLAMA_SERVER is set)
#   llama-server-ngram   the same with --spec-type ngram-simple (lookup and draft lengths as lmfleet's)
#   llama-server-draft   the same with --spec-type draft-simple --model-draft DRAFT
# every speculating system drafting at most DRAFT_MAX (8) tokens a step. Rounds interleave the systems (the machine
# drifts); the summary prints medians, lmfleet's acceptance rates (its worker's /metrics) and the ratios of the
# issue's targets, taken in the same run.
# MODEL / DRAFT: the GGUFs (default: the packaged SmolLM2 drafting for itself, a smoke test). The real run, on
# Qwen2.5-Coder-1.5B-Instruct with the 0.5B as the draft (see scripts/bench_llamacpp.sh to build llama-server):
#   MODEL=$(python3 scripts/real_models.py path qwen2.5-coder-1.5b) \
#   DRAFT=$(python3 scripts/real_models.py path qwen2.5-coder-0.5b) NAME=qwen2.5-coder-1.5b \
#   LLAMA_SERVER=/tmp/llsrc/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server \
#   scripts/bench_speculative.sh 2
# A tiny end-to-end check (a minute or two):
#   LEVELS=1,2 CHAT_TOKENS=8 EDIT_TOKENS=24 scripts/bench_speculative.sh 1 /tmp/bench-spec
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
OUT=${2:-bench-results/speculative}
BIN=${BIN:-.venv/bin}
MODEL=${MODEL:-$("$BIN/lmfleet" model-path)}
DRAFT=${DRAFT:-$MODEL}
NAME=${NAME:-smollm2}
THREADS=${THREADS:-$(nproc)}
PORT=${PORT:-8131}
LEVELS=${LEVELS:-1,4,16}
CHAT_TOKENS=${CHAT_TOKENS:-64}
EDIT_TOKENS=${EDIT_TOKENS:-320}
DRAFT_MAX=${DRAFT_MAX:-8}
NGRAM=${NGRAM:-3}
WORDS=${WORDS:-8}  # 8 words + the chat template ≈ 28 prompt tokens
mkdir -p "$OUT"
source scripts/bench_servers.sh  # PIDS and their cleanup, wait_model, peak_rss

EDIT_PROMPT='Add type hints to every function in this Python module and change nothing else. Reply with the whole
module in one code block.

```python
import math


def mean(values):
    """The arithmetic mean of a non-empty list."""
    return sum(values) / len(values)


def variance(values):
    """The population variance."""
    m = mean(values)
    return sum((v - m) ** 2 for v in values) / len(values)


def stddev(values):
    return math.sqrt(variance(values))


def normalize(values):
    """Scale values to zero mean and unit variance."""
    m, s = mean(values), stddev(values)
    if s == 0:
        return [0.0 for _ in values]
    return [(v - m) / s for v in values]


def moving_average(values, window):
    out = []
    for i in range(len(values) - window + 1):
        out.append(mean(values[i : i + window]))
    return out


class Histogram:
    def __init__(self, bins, low, high):
        self.bins = bins
        self.low = low
        self.high = high
        self.counts = [0] * bins

    def add(self, value):
        if value < self.low or value >= self.high:
            return False
        index = int((value - self.low) / (self.high - self.low) * self.bins)
        self.counts[index] += 1
        return True

    def total(self):
        return sum(self.counts)
```'

run_one() {  # SYSTEM ROUND
  local name=$1 round=$2 log="$OUT/$1-$2.log" pid spec=() lspec=()
  case $name in
    lmfleet*)
      case $name in
        lmfleet-ngram) spec=(--spec-type ngram --spec-ngram-size-n "$NGRAM") ;;
        lmfleet-draft) spec=(--spec-type draft --draft-model-path "$DRAFT") ;;
      esac
      [ ${#spec[@]} -gt 0 ] && spec+=(--spec-draft-n-max "$DRAFT_MAX")
      "$BIN/lmfleet" serve --model-path "$MODEL" --model-names "$NAME" --port "$PORT" --controller-port \
        $((PORT + 1)) --worker-port $((PORT + 2)) --threads "$THREADS" --log-level warning "${spec[@]}" \
        > "$log" 2>&1 & ;;
    llama-server*)
      case $name in
        llama-server-ngram) lspec=(--spec-type ngram-simple --spec-ngram-simple-size-n "$NGRAM"
          --spec-ngram-simple-size-m "$DRAFT_MAX") ;;
        llama-server-draft) lspec=(--spec-type draft-simple --model-draft "$DRAFT" --spec-draft-n-max "$DRAFT_MAX") ;;
      esac
      "$LLAMA_SERVER" -m "$MODEL" -np 16 -c 8192 -t "$THREADS" --host 127.0.0.1 --port "$PORT" \
        --alias "$NAME" "${lspec[@]}" > "$log" 2>&1 & ;;
  esac
  pid=$!
  PIDS+=("$pid")
  wait_model "http://127.0.0.1:$PORT" "$pid" "$log"
  echo "== round $round: $name"
  "$BIN/lmfleet" bench --base-url "http://127.0.0.1:$PORT/v1" --model "$NAME" --concurrency "$LEVELS" --warmup 1 \
    --prompt-tokens "$WORDS" --ignore-eos --max-tokens "$CHAT_TOKENS" --quiet --json "$OUT/$name-chat-$round.json"
  "$BIN/lmfleet" bench --base-url "http://127.0.0.1:$PORT/v1" --model "$NAME" --concurrency "$LEVELS" --warmup 1 \
    --prompt "$EDIT_PROMPT" --max-tokens "$EDIT_TOKENS" --quiet --json "$OUT/$name-edit-$round.json"
  if [[ $name == lmfleet* ]]; then  # the worker's speculative decoding counters
    curl -sf "http://127.0.0.1:$((PORT + 2))/metrics" | grep '^lmfleet_worker_spec_' > "$OUT/$name-$round.spec" || true
  fi
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  sleep 1
}

# SYSTEMS: which of the six to run (default: lmfleet's three, and llama-server's three when LLAMA_SERVER is set)
DEFAULT_SYSTEMS="lmfleet lmfleet-ngram lmfleet-draft"
[ -n "${LLAMA_SERVER:-}" ] && DEFAULT_SYSTEMS+=" llama-server llama-server-ngram llama-server-draft"
read -r -a SYSTEMS <<< "${SYSTEMS:-$DEFAULT_SYSTEMS}"
for round in $(seq "$ROUNDS"); do
  for name in "${SYSTEMS[@]}"; do run_one "$name" "$round"; done
done

"$BIN/python" - "$OUT" "$ROUNDS" "$LEVELS" "${SYSTEMS[@]}" <<'PY'
import json, os, re, statistics, sys
out, rounds, levels, systems = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4:]
med = {}
for workload in ("chat", "edit"):
    print(f"-- {workload}: output tok/s @ {'/'.join(levels)} (median of {rounds})")
    for name in systems:
        runs = [json.load(open(f"{out}/{name}-{workload}-{r}.json"))["levels"] for r in range(1, rounds + 1)]
        tok = [statistics.median(run[i]["output_tok_s"] for run in runs) for i in range(len(levels))]
        errors = sum(lv["errors"] for run in runs for lv in run)
        med[name, workload] = tok
        print(f"  {name:19s}" + " ".join(f"{t:7.1f}" for t in tok) + f"   errors: {errors}")
for name in systems:
    counts = {}
    for r in range(1, rounds + 1):
        path = f"{out}/{name}-{r}.spec"
        if os.path.exists(path):
            for line in open(path):
                m = re.match(r"lmfleet_worker_spec_(\w+)_total\{.*\} ([0-9.e+]+)", line)
                if m:
                    counts[m[1]] = counts.get(m[1], 0) + float(m[2])
    if counts.get("draft_tokens"):
        rate = counts["accepted_tokens"] / counts["draft_tokens"]
        print(f"{name}: drafted {counts['draft_tokens']:.0f}, accepted {counts['accepted_tokens']:.0f} ({rate:.0%})")
def ratio(a, b, workload):
    if (a, workload) in med and (b, workload) in med:
        r = " ".join(f"{x / y:.2f}" for x, y in zip(med[a, workload], med[b, workload]))
        print(f"{a} / {b} ({workload}) @ {'/'.join(levels)}: {r}")
for workload in ("chat", "edit"):
    for a, b in [("lmfleet-ngram", "lmfleet"), ("lmfleet-draft", "lmfleet"), ("lmfleet-ngram", "llama-server-ngram"),
                 ("lmfleet-draft", "llama-server-draft"), ("lmfleet", "llama-server")]:
        ratio(a, b, workload)
PY
