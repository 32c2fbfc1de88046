"""What a multi-model worker can serve: the models (name, path, engine, options, pin, keep-alive) and its budget.

Owns `ModelSpec`, `Budget`, reading the three ways to name models: repeated `--model-path` (each named by its file
name without `.gguf`, or its folder's name), `--models-dir` (each `.gguf` file and each model folder in it, named
the same way) and `--models-config`, an INI file with one section per model, as llama-server's `--models-preset`
(the `[*]` section applies to every model, keys are the flags' names without the dashes):

    [*]
    keep-alive = 10m                       # optional, for every model: idle time before unloading (-1: never)
    threads = 4

    [smollm2]                              # the name clients ask for
    path = /models/SmolLM2-135M-Instruct.Q4_1.gguf     (or `model = ...`, as llama-server spells it)
    engine = llamacpp                      # optional: auto from the path
    pin = true                             # optional: loaded at start and never unloaded
    max-num-seqs = 4                       # optional: any engine option of `lmfleet worker` (OPTIONS, SWITCHES)

Also owns the default byte budget (a fraction of the machine's memory, /proc/meminfo) and the command line of a
model's own one-model worker (`child_argv`): the options the worker was given, then the model's own.

Does not own: loading, unloading and the budget's enforcement (lmfleet.worker.supervisor), the flags themselves
(lmfleet.worker.flags).
"""

from __future__ import annotations

import configparser
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from lmfleet.engine import registry
from lmfleet.protocol.worker import duration_seconds

DEFAULT_MAX_LOADED = 3  # as Ollama's default per GPU (OLLAMA_MAX_LOADED_MODELS), and for CPU
DEFAULT_KEEP_ALIVE_S = 300.0  # as Ollama's default: 5 minutes
DEFAULT_BUDGET_FRACTION = 0.75  # of MemTotal, when no --memory-budget is given
DEFAULT_LOAD_TIMEOUT_S = 300.0  # how long a request waits for its model to load before a 503 model_loading

# The engine options a model may set (config keys), as the flags of its one-model worker. A bool option is a switch:
# True adds the flag, False its negation where there is one.
OPTIONS: dict[str, str] = {
    "max_num_seqs": "--max-num-seqs",
    "max_batch_tokens": "--max-batch-tokens",
    "max_model_len": "--max-model-len",
    "threads": "--threads",
    "device": "--device",
    "dtype": "--dtype",
    "tool_parser": "--tool-parser",
    "reasoning_parser": "--reasoning-parser",
    "conv_template": "--conv-template",
    "limit_worker_concurrency": "--limit-worker-concurrency",
}
SWITCHES: dict[str, tuple[str | None, str | None]] = {  # option: (flag when True, flag when False)
    "flash_attn": (None, "--no-flash-attn"),
    "matryoshka": ("--matryoshka", None),
}
_SPEC_KEYS = {"path", "engine", "pin", "keep_alive"}  # and `model`, llama-server's name for `path`
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class ModelSpec:
    """One model the worker can serve."""

    name: str
    path: str
    engine: str = registry.AUTO
    options: dict[str, Any] = field(default_factory=dict)  # keys of OPTIONS or SWITCHES
    pinned: bool = False
    keep_alive_s: float | None = None  # None: the worker's --keep-alive; negative: forever


@dataclass(frozen=True)
class Budget:
    max_loaded: int = DEFAULT_MAX_LOADED
    memory_bytes: int = 0  # what the models' processes may hold together (resident memory)
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S  # a model's default idle time before it is unloaded; <0: never
    load_timeout_s: float = DEFAULT_LOAD_TIMEOUT_S


def default_name(path: str) -> str:
    """A model's name from its path: the file name without `.gguf`, or the folder's name."""
    p = PurePath(path.rstrip("/"))
    return p.stem if p.suffix.lower() == ".gguf" else (p.name or path)


def parse_size(text: str) -> int:
    """Bytes from "8GiB", "8G", "512M", "1.5g" or a plain number of bytes (binary units: K = 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (e.g. 8GiB, 512M, or bytes)")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2).lower() or "_"))


def memory_total() -> int:
    """The machine's memory in bytes (MemTotal), or 0 where /proc/meminfo is not there."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def default_memory_budget() -> int:
    return int(memory_total() * DEFAULT_BUDGET_FRACTION)


def _options(where: str, section: configparser.SectionProxy) -> dict[str, Any]:
    """A section's engine options (OPTIONS as the strings the model's worker parses; SWITCHES as bools)."""
    options: dict[str, Any] = {}
    for raw in section:
        key = raw.replace("-", "_")
        if key in _SPEC_KEYS or key == "model":
            continue
        if key in SWITCHES:
            try:
                options[key] = section.getboolean(raw)
            except ValueError:
                raise ValueError(f"{where}: {raw} must be true or false") from None
        elif key in OPTIONS:
            options[key] = section[raw]
        else:
            known = ", ".join(sorted(k.replace("_", "-") for k in [*_SPEC_KEYS, *OPTIONS, *SWITCHES]))
            raise ValueError(f"{where}: unknown key {raw} (known: {known})")
    return options


def from_config(path: Path, engine: str = registry.AUTO) -> list[ModelSpec]:
    """The models of a `--models-config` INI file (module docstring). A relative `path` is read from the file's
    folder."""
    parser = configparser.ConfigParser(default_section="*", interpolation=None)
    try:
        with path.open() as f:
            parser.read_file(f)
    except (OSError, configparser.Error) as exc:
        raise ValueError(f"cannot read models config {path}: {exc}") from None
    if not parser.sections():
        raise ValueError(f"{path}: no models (one [NAME] section per model, with path = ...)")
    specs = []
    for name in parser.sections():
        section = parser[name]
        where = f"{path} [{name}]"
        given = section.get("path") or section.get("model")
        if not given:
            raise ValueError(f"{where}: needs path = ...")
        model_path = Path(given).expanduser()
        if not model_path.is_absolute() and (path.parent / model_path).exists():
            model_path = path.parent / model_path
        try:
            pinned = section.getboolean("pin", fallback=False)
            keep_alive = duration_seconds(section.get("keep-alive") or section.get("keep_alive"))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        specs.append(
            ModelSpec(
                name=name,
                path=str(model_path),
                engine=section.get("engine", engine),
                options=_options(where, section),
                pinned=pinned,
                keep_alive_s=keep_alive,
            )
        )
    return specs


def from_dir(folder: Path, engine: str = registry.AUTO) -> list[ModelSpec]:
    """Every `.gguf` file and every model folder (a Hugging Face or sentence-transformers folder) in `folder`."""
    if not folder.is_dir():
        raise ValueError(f"--models-dir {folder}: not a folder")
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.suffix.lower() == ".gguf" and entry.is_file():
            found.append(entry)
        elif entry.is_dir() and any((entry / f).exists() for f in ("config.json", "modules.json")):
            found.append(entry)
    if not found:
        raise ValueError(f"--models-dir {folder}: no .gguf file or model folder in it")
    return [ModelSpec(name=default_name(str(p)), path=str(p), engine=engine) for p in found]


def catalog(
    paths: list[str], models_dir: str | None, config: str | None, engine: str, pins: list[str]
) -> list[ModelSpec]:
    """Every model from the three sources, each located and its engine chosen (ValueError: one line naming what
    is wrong); `pins` names models to pin."""
    specs = [ModelSpec(name=default_name(p), path=p, engine=engine) for p in paths]
    if models_dir:
        specs += from_dir(Path(models_dir), engine)
    if config:
        specs += from_config(Path(config), engine)
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"two models are named {', '.join(twice)}: name them in --models-config")
    unknown = sorted(set(pins) - set(names))
    if unknown:
        raise ValueError(f"--pin {', '.join(unknown)}: no such model (models: {', '.join(names)})")
    located = []
    for s in specs:
        entry = registry.choose(registry.locate(s.path), s.engine)
        located.append(ModelSpec(s.name, s.path, entry.name, s.options, s.pinned or s.name in pins, s.keep_alive_s))
    return located


def estimate_bytes(spec: ModelSpec) -> int:
    """A first guess at a model's process's resident memory before it ever loaded: its weights on disk plus a
    Python process with its engine's libraries (measured: ~150 MiB for llama.cpp, ~400 MiB for torch)."""
    p = Path(spec.path)
    if p.is_file():
        weights = p.stat().st_size
    elif p.is_dir():
        weights = sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and f.suffix != ".md")
    else:
        weights = 0  # a hub id: known once loaded
    overhead = 150 << 20 if spec.engine == "llamacpp" else 400 << 20
    return weights + overhead


def child_argv(spec: ModelSpec, shared: dict[str, Any], port: int, log: list[str]) -> list[str]:
    """The command of `spec`'s one-model worker on 127.0.0.1:`port`: the worker's own engine options (`shared`,
    keys of OPTIONS and SWITCHES), then the model's."""
    argv = [sys.executable, "-m", "lmfleet.worker", "--model-path", spec.path, "--model-names", spec.name]
    argv += ["--engine", spec.engine, "--host", "127.0.0.1", "--port", str(port), "--no-register", *log]
    options = {**shared, **spec.options}
    for key, flag in OPTIONS.items():
        if options.get(key) is not None:
            argv += [flag, str(options[key])]
    for key, (on, off) in SWITCHES.items():
        chosen = on if options.get(key) else off if key in options else None
        if chosen:
            argv.append(chosen)
    return argv


def rss_bytes(pid: int) -> int:
    """A process's resident memory (VmRSS), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
