# Shared by the scripts that compare servers (bench_llamacpp.sh, bench_multiturn.sh, bench_speculative.sh): sourced
# after they cd to the repository root and set BIN and NAME. Starts nothing itself.
# PIDS: every server a script started, killed on exit.
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_model() {  # URL PID LOG: until URL/v1/models lists $NAME (or the server exits)
  for _ in $(seq 600); do
    curl -sf "$1/v1/models" 2>/dev/null | "$BIN/python" -c \
      'import json, sys; sys.exit(sys.argv[1] not in [m["id"] for m in json.load(sys.stdin)["data"]])' "$NAME" \
      2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || { tail -20 "$3"; return 1; }
    sleep 0.5
  done
  echo "$1 did not list the model $NAME in 300 s" >&2
  tail -20 "$3"
  return 1
}

peak_rss() {  # PATTERN: the peak RSS (MB) of the newest process whose command line matches
  local pid; pid=$(pgrep -n -f "$1" || true)
  [ -n "$pid" ] && awk '/VmHWM/ {printf "%.0f", $2/1024}' "/proc/$pid/status" || echo ""
}
