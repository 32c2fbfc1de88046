"""`lmfleet worker`'s flags and the engines' flags, and the `WorkerSettings` they make (lmfleet.worker.app).

Owns the worker's flags (`add_args`; FastChat's names kept, its flags without an lmfleet meaning accepted and
ignored), the engine flags `lmfleet serve` passes on to every worker (`add_engine_args`), the chosen engine's
settings (`engine_settings`) and the worker's (`settings`); with several models (`multi_model`: --model-path
twice, --models-dir, --models-config or a budget flag) the multi-model worker's (`multi_settings`,
lmfleet.worker.multi). `settings` locates the model and chooses its engine
first, then checks that the engine's extra is installed: a path that names nothing loadable, or an engine whose
library is missing (`pip install 'lmfleet[llamacpp]'`, `[transformers]`), is one line before anything loads.

Building the parser imports none of the worker's extras (llguidance, numpy, llama_cpp, torch, transformers), so
`lmfleet --help` works on the base install: the defaults are read where `WorkerSettings` takes them from
(lmfleet.drain, lmfleet.engine.runner, lmfleet.worker.registration, the engines' settings), and lmfleet.worker.app,
which loads llguidance, is imported only by `settings`.

Does not own: the flags every part shares (lmfleet.flags), the settings themselves (lmfleet.worker.app, the
engines' packages), which engine serves a model (lmfleet.engine.registry), running the process (lmfleet.cli).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from typing import TYPE_CHECKING

from lmfleet import flags
from lmfleet.client import DEFAULT_CONTROLLER
from lmfleet.drain import DEFAULT_TIMEOUT_S
from lmfleet.engine import registry
from lmfleet.engine.base import BatchSettings
from lmfleet.engine.runner import DEFAULT_MAX_QUEUED
from lmfleet.engine.speculative import SPEC_TYPES, SpecSettings
from lmfleet.engine.transformers import DEVICES, DTYPES
from lmfleet.protocol.fastchat import TEMPLATES
from lmfleet.protocol.worker import duration_seconds
from lmfleet.worker import catalog
from lmfleet.worker.registration import HEARTBEAT_INTERVAL_S

if TYPE_CHECKING:
    from lmfleet.worker.app import WorkerSettings
    from lmfleet.worker.multi import MultiWorkerSettings

PORT = 21002  # FastChat's worker port


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The model's engine and its settings; `serve` passes them on to every worker."""
    g = p.add_argument_group("engine")
    g.add_argument(
        "--engine",
        default=registry.AUTO,
        choices=[registry.AUTO, *registry.ENGINES],
        help="auto (default): llamacpp for a .gguf, embedding for a sentence-transformers folder (modules.json) or a "
        "cross-encoder, transformers for any other Hugging Face folder or hub id; embedding: serve an encoder's "
        "pooled vectors (or a cross-encoder's scores)",
    )
    batch = BatchSettings()
    seqs = batch.max_num_seqs
    g.add_argument(
        "--max-num-seqs", type=int, default=seqs, help=f"sequences decoded together in one batch (default {seqs})"
    )
    tokens = batch.max_batch_tokens
    g.add_argument(
        "--max-batch-tokens", type=int, default=tokens, help=f"prompt tokens prefilled per step (default {tokens})"
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="cap on prompt + output tokens (default: the model's context; llama.cpp caps its KV cache at 8192)",
    )
    g.add_argument("--threads", type=int, default=None, help="llamacpp: CPU threads (default: every core)")
    g.add_argument(
        "--no-flash-attn",
        dest="flash_attn",
        action="store_false",
        help="llamacpp: plain attention (about 1.4x slower at 16 streams)",
    )
    g.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        help="compute every prompt whole instead of reusing the cached prefixes of earlier requests",
    )
    g.add_argument(
        "--prefix-cache-host-bytes",
        type=flags.byte_size,
        default=None,
        help="host memory for cached prefixes pushed out of the KV cache, e.g. 2GiB; 0: none (default: a quarter "
        "of the machine's memory, at most 8GiB)",
    )
    g.add_argument(
        "--deterministic",
        action="store_true",
        help="identical answers to identical requests: one request at a time and no prefix cache (throughput of a "
        "single stream; without it a request's answer can move with its batch companions and cached prefixes)",
    )
    spec = SpecSettings()
    g.add_argument(
        "--spec-type",
        default=spec.type,
        choices=list(SPEC_TYPES),
        help="llamacpp: speculative decoding: none (default), ngram (draft from the request's own tokens: answers "
        "that repeat the prompt, as code edits do) or draft (a draft model, --draft-model-path)",
    )
    g.add_argument(
        "--draft-model-path",
        default=None,
        help="llamacpp: the draft model for --spec-type draft, a .gguf file with the model's vocabulary (e.g. the "
        "0.5B of the same family)",
    )
    g.add_argument(
        "--spec-draft-n-max",
        type=int,
        default=spec.draft_max,
        help=f"llamacpp: tokens a request drafts per step at most (default {spec.draft_max})",
    )
    g.add_argument(
        "--spec-draft-n-min",
        type=int,
        default=spec.draft_min,
        help=f"llamacpp: a shorter draft is not verified (default {spec.draft_min})",
    )
    g.add_argument(
        "--spec-ngram-size-n",
        type=int,
        default=spec.ngram_max,
        help=f"llamacpp: the longest n-gram --spec-type ngram looks up (default {spec.ngram_max})",
    )
    g.add_argument(
        "--spec-ngram-min-n",
        type=int,
        default=spec.ngram_min,
        help=f"llamacpp: the shortest n-gram --spec-type ngram drafts from (default {spec.ngram_min})",
    )
    g.add_argument(
        "--spec-max-running",
        type=int,
        default=spec.max_running,
        help=f"llamacpp: no request speculates while more than this many run (default {spec.max_running})",
    )
    g.add_argument(
        "--spec-verify-cost",
        type=float,
        default=None,
        help="llamacpp: the cost of one more token in a decode relative to a one-token decode, 0..1, which decides "
        "how far a request drafts (default: measured from the engine's own steps)",
    )
    g.add_argument("--device", default=None, choices=list(DEVICES), help="transformers: default cuda when available")
    g.add_argument("--dtype", default="auto", choices=list(DTYPES), help="transformers: default the checkpoint's")
    g.add_argument(
        "--matryoshka",
        action="store_true",
        help="embedding: allow `dimensions` (shorter vectors, renormalized) although the model's config does not "
        "say it was trained for them",
    )
    g.add_argument(
        "--tool-parser",
        default="auto",
        # lmfleet.worker.tools.FORMATS, not imported here: it loads llguidance (tests/worker/test_tools.py checks)
        choices=["auto", "hermes", "llama3_json", "mistral"],
        help="how the model writes tool calls (default auto: from its chat template; hermes for the generic prompt)",
    )
    g.add_argument(
        "--reasoning-parser",
        default="auto",
        choices=["auto", "none", "deepseek_r1", "qwen3"],  # lmfleet.worker.reasoning.FORMATS (not imported here)
        help="how the model marks its reasoning (<think>...</think>), sent apart from the answer as "
        "reasoning_content (default auto: from its chat template; none: the answer keeps it)",
    )


def add_args(p: argparse.ArgumentParser) -> None:
    flags.add_listen_args(p, PORT)
    p.add_argument(
        "--model-path",
        action="append",
        default=None,
        help="a .gguf file, a folder holding one, a Hugging Face model folder, or a hub id; repeat it to serve "
        "several models, loaded on demand (see 'several models')",
    )
    p.add_argument(
        "--model-names",
        type=flags.csv,
        default=None,
        help="comma-separated names to serve the model "
        "under (default: --model-path as given; its file or folder name is answered to as well)",
    )
    p.add_argument(
        "--worker-address",
        default=None,
        help="URL others reach this worker at (default http://HOST:PORT; set it when binding 0.0.0.0)",
    )
    p.add_argument(
        "--controller-address", type=flags.csv, default=[DEFAULT_CONTROLLER], help="controller URL(s), comma-separated"
    )
    p.add_argument("--no-register", action="store_true", help="do not register with a controller")
    flags.add_secret_arg(p)
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="on SIGTERM the worker leaves its controllers and answers new requests 503; running ones get this "
        f"many seconds (default {DEFAULT_TIMEOUT_S:g})",
    )
    add_engine_args(p)
    p.add_argument(
        "--limit-worker-concurrency",
        type=int,
        default=DEFAULT_MAX_QUEUED,
        help=f"requests running + queued before the worker answers 429 (default {DEFAULT_MAX_QUEUED})",
    )
    p.add_argument(
        "--heartbeat-interval",
        type=float,
        default=HEARTBEAT_INTERVAL_S,
        help=f"seconds (default {HEARTBEAT_INTERVAL_S:g})",
    )
    p.add_argument(
        "--conv-template",
        default=None,
        choices=sorted(TEMPLATES),
        help="the FastChat conversation template FastChat API servers prompt this model with (default: mapped from "
        "the model's chat template where FastChat has its format, e.g. ChatML)",
    )
    add_multi_args(p)
    flags.add_fastchat_ignored(
        p,
        "--num-gpus",
        "--gpus",
        "--max-gpu-memory",
        "--stream-interval",
        "--seed",
        "--load-8bit",
        "--cpu-offloading",
        "--embed-in-truncate",
        "--debug",
    )


def add_multi_args(p: argparse.ArgumentParser) -> None:
    """Several models on one worker, each loaded on demand in its own process (lmfleet.worker.multi). Any of these
    flags, or --model-path given twice, makes a multi-model worker."""
    g = p.add_argument_group("several models")
    g.add_argument("--models-dir", default=None, help="serve every .gguf file and model folder in this folder")
    g.add_argument(
        "--models-config",
        default=None,
        help="an INI file naming each model: [NAME] with path, and optionally engine, pin, keep-alive and engine "
        "options (README: 'Several models on one worker')",
    )
    g.add_argument(
        "--max-loaded-models",
        type=int,
        default=None,
        help=f"models loaded at once; loading one more unloads the least recently used idle one (default "
        f"{catalog.DEFAULT_MAX_LOADED})",
    )
    g.add_argument(
        "--memory-budget",
        default=None,
        help="resident memory the models' processes may hold together, e.g. 6GiB (default "
        f"{catalog.DEFAULT_BUDGET_FRACTION * 100:.0f}%% of the machine's memory)",
    )
    g.add_argument(
        "--keep-alive",
        default=None,
        help="how long a model stays loaded once idle: seconds or a duration (30s, 5m, 1h); -1: forever "
        f"(default {catalog.DEFAULT_KEEP_ALIVE_S / 60:g}m; a model's keep-alive and a request's keep_alive win)",
    )
    g.add_argument("--pin", action="append", default=[], metavar="NAME", help="keep this model loaded (repeatable)")
    g.add_argument(
        "--load-timeout",
        type=float,
        default=catalog.DEFAULT_LOAD_TIMEOUT_S,
        help="seconds a request waits for its model to load before a 503 model_loading (default "
        f"{catalog.DEFAULT_LOAD_TIMEOUT_S:g})",
    )


def multi_model(args: argparse.Namespace) -> bool:
    """Whether the flags ask for a multi-model worker."""
    many = len(args.model_path or []) > 1
    return (
        many
        or any(
            v not in (None, [])
            for v in (args.models_dir, args.models_config, args.max_loaded_models, args.memory_budget, args.keep_alive)
        )
        or bool(args.pin)
    )


def engine_settings(args: argparse.Namespace, engine: str) -> BatchSettings:
    """The settings of engine `engine` (a key of lmfleet.engine.registry.ENGINES) from the engine flags it takes."""
    values = {
        "max_num_seqs": 1 if args.deterministic else args.max_num_seqs,
        "max_batch_tokens": args.max_batch_tokens,
        "max_model_len": args.max_model_len,
        "prefix_cache": args.prefix_cache and not args.deterministic,
        "prefix_cache_host_bytes": args.prefix_cache_host_bytes,
        "n_threads": args.threads,
        "flash_attn": args.flash_attn,
        "spec_type": args.spec_type,
        "draft_model_path": args.draft_model_path,
        "spec_draft_n_max": args.spec_draft_n_max,
        "spec_draft_n_min": args.spec_draft_n_min,
        "spec_ngram_size_n": args.spec_ngram_size_n,
        "spec_ngram_min_n": args.spec_ngram_min_n,
        "spec_max_running": args.spec_max_running,
        "spec_verify_cost": args.spec_verify_cost,
        "dtype": args.dtype,
        "device": args.device,
        "matryoshka": args.matryoshka,
    }
    cls = registry.ENGINES[engine].settings
    names = {f.name for f in dataclasses.fields(cls)}
    settings: BatchSettings = cls(**{k: v for k, v in values.items() if k in names})
    return settings


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken installation is a missing one
        return False


def _missing(entry: registry.EngineEntry, package: str) -> SystemExit:
    return SystemExit(
        f"lmfleet worker: the {entry.name} engine needs the {package!r} package: pip install 'lmfleet[{entry.extra}]'"
    )


def settings(args: argparse.Namespace) -> WorkerSettings:
    """The worker's settings, the model located, its engine chosen and the engine's extra found first: a path that
    names nothing loadable or an engine that is not installed is one line (SystemExit) before anything loads."""
    if not args.model_path:
        raise SystemExit("lmfleet worker: give --model-path (or --models-dir, --models-config)")
    try:
        source = registry.locate(args.model_path[0])
        entry = registry.choose(source, args.engine)
        engine = engine_settings(args, entry.name)
    except ValueError as exc:
        raise SystemExit(f"lmfleet worker: {exc}") from None
    if not _installed(entry.requires):
        raise _missing(entry, entry.requires)
    try:
        from lmfleet.worker.app import WorkerSettings
    except ModuleNotFoundError as exc:  # llguidance, which every generating engine's extra installs
        if exc.name is None or exc.name.partition(".")[0] == "lmfleet":
            raise
        raise _missing(entry, exc.name) from None
    return WorkerSettings(
        model_path=args.model_path[0],
        model_names=args.model_names,
        worker_address=args.worker_address or f"http://{args.host}:{args.port}",
        controller_addresses=[] if args.no_register else args.controller_address,
        engine=entry.name,
        engine_settings=engine,
        max_queued=args.limit_worker_concurrency,
        heartbeat_interval_s=args.heartbeat_interval,
        registration_secret=flags.registration_secret(args),
        drain_timeout_s=args.drain_timeout,
        tool_parser=args.tool_parser,
        reasoning_parser=args.reasoning_parser,
        conv_template=args.conv_template,
    )


def multi_settings(args: argparse.Namespace) -> MultiWorkerSettings:
    """A multi-model worker's settings: every model located and its engine chosen, each engine's extra found, the
    budget parsed (SystemExit: one line)."""
    if args.model_names:
        raise SystemExit("lmfleet worker: --model-names names one model; name several in --models-config")
    try:
        models = catalog.catalog(args.model_path or [], args.models_dir, args.models_config, args.engine, args.pin)
        memory = catalog.parse_size(args.memory_budget) if args.memory_budget else catalog.default_memory_budget()
        keep_alive = duration_seconds(args.keep_alive)
    except ValueError as exc:
        raise SystemExit(f"lmfleet worker: {exc}") from None
    if not models:
        raise SystemExit("lmfleet worker: give --model-path, --models-dir or --models-config")
    if args.max_loaded_models is not None and args.max_loaded_models < 1:
        raise SystemExit("lmfleet worker: --max-loaded-models must be at least 1")
    for entry in {registry.ENGINES[m.engine] for m in models}:
        if not _installed(entry.requires):
            raise _missing(entry, entry.requires)
    from lmfleet.worker.multi import MultiWorkerSettings

    options = {
        "max_num_seqs": args.max_num_seqs,
        "max_batch_tokens": args.max_batch_tokens,
        "max_model_len": args.max_model_len,
        "threads": args.threads,
        "device": args.device,
        "dtype": args.dtype,
        "tool_parser": args.tool_parser,
        "reasoning_parser": args.reasoning_parser,
        "conv_template": args.conv_template,
        "limit_worker_concurrency": args.limit_worker_concurrency,
        "flash_attn": args.flash_attn,
        "matryoshka": args.matryoshka,
    }
    return MultiWorkerSettings(
        models=models,
        worker_address=args.worker_address or f"http://{args.host}:{args.port}",
        budget=catalog.Budget(
            max_loaded=args.max_loaded_models or catalog.DEFAULT_MAX_LOADED,
            memory_bytes=memory,
            keep_alive_s=keep_alive if keep_alive is not None else catalog.DEFAULT_KEEP_ALIVE_S,
            load_timeout_s=args.load_timeout,
        ),
        controller_addresses=[] if args.no_register else args.controller_address,
        options=options,
        child_log=["--log-level", args.log_level, "--log-format", args.log_format],
        heartbeat_interval_s=args.heartbeat_interval,
        registration_secret=flags.registration_secret(args),
        drain_timeout_s=args.drain_timeout,
    )
