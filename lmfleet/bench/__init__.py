"""`lmfleet bench`: a load generator for any OpenAI-compatible endpoint, and the in-process raw-decode baseline.

One sweep over concurrency levels against ``/chat/completions`` or ``/completions`` (our API server, vLLM, FastChat,
llama.cpp server, transformers serve), summarized per level (requests ok / failed, output tokens, output tok/s,
request/s, time to first token, inter-token latency and end-to-end latency percentiles) in a terminal table and a
JSON report. With ``--raw`` it instead measures a model's own aligned-batch greedy decode in process, one batch
size per level. With ``--multi-turn`` it holds conversations instead of a sweep: users x turns in a closed loop,
every prompt a shared system prompt and the whole history, time to first token of first and later turns apart and
the prompt tokens the server served from its cache. It owns no server, and is bounded by construction: each level
(each conversation) sends a fixed number of requests, each with a deadline, then stops.

One job per module:
  * settings: `BenchSettings` and the command line that makes them; `BenchError`, a setup problem
  * payload: what each request sends (the endpoint's body, the prompts, a conversation's messages)
  * load: sending the requests over HTTP and reading the answers, SSE parsed here (`run_http`, `run_multi_turn`)
  * raw: the raw-decode baseline (`run_raw`; torch is imported only when it runs)
  * stats: what one request produced, and the per-level (or multi-turn) summary with its percentiles
  * report: the report, its terminal table and JSON, and the progress and status lines of a run
  * main: `main`, parsing, running, printing, the exit status

    lmfleet bench --base-url http://127.0.0.1:8000/v1 --concurrency 1,4,16 --max-tokens 64 --json out.json
    lmfleet bench --raw --model-path DIR --dtype bfloat16 --concurrency 1,4,16
    lmfleet bench --base-url http://127.0.0.1:8000/v1 --multi-turn --users 12 --turns 4 --system-tokens 300
"""
