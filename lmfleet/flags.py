"""Flag helpers every part's flags share: where a process binds and logs, the fleet's secrets, comma lists, byte
sizes, and the FastChat flags accepted and ignored.

Owns reading secrets from a flag, the environment (LMFLEET_API_KEYS, LMFLEET_REGISTRATION_SECRET) or a file, so
they need not appear in `ps`; and reporting the ignored FastChat flags a command line gave (`warn_ignored`).

Does not own: any part's own flags or settings (lmfleet.controller.flags, lmfleet.worker.flags, lmfleet.api.flags),
dispatching a command (lmfleet.cli). Imports nothing of any part, so building a parser loads no app.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path

logger = logging.getLogger("lmfleet")


def csv(value: str) -> list[str]:
    """A comma-separated flag value as its non-empty, stripped parts."""
    return [v.strip() for v in value.split(",") if v.strip()]


_SIZE_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
_SIZE_UNITS |= {"ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def byte_size(value: str) -> int:
    """A size flag's value in bytes: a number with an optional unit, e.g. `2GiB`, `512MiB`, `1.5GB`, `4096`
    (K, M, G, T: powers of 1000; Ki, Mi, Gi, Ti: of 1024; the `B` and the case optional)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", value.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {value!r} (e.g. 2GiB, 512MiB, 4096)")
    return int(float(match[1]) * _SIZE_UNITS[match[2] or ""])


def add_log_args(p: argparse.ArgumentParser) -> None:
    from lmfleet.server import LOG_FORMATS

    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--log-format", default="text", choices=LOG_FORMATS, help="json: one object per line, for log shippers"
    )


def add_listen_args(p: argparse.ArgumentParser, port: int) -> None:
    """--host, --port and the log flags of a process that serves HTTP."""
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=port)
    add_log_args(p)


def add_secret_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--registration-secret",
        default=None,
        help="shared secret workers present to the controller (default: $LMFLEET_REGISTRATION_SECRET)",
    )


def registration_secret(args: argparse.Namespace) -> str | None:
    return args.registration_secret or os.environ.get("LMFLEET_REGISTRATION_SECRET") or None


def api_keys(args: argparse.Namespace) -> list[str] | None:
    """The API server's keys: --api-keys, then $LMFLEET_API_KEYS, then --api-key-file's lines; None when none."""
    keys: list[str] = []
    if args.api_keys:
        keys += csv(args.api_keys)
    if os.environ.get("LMFLEET_API_KEYS"):
        keys += csv(os.environ["LMFLEET_API_KEYS"])
    if args.api_key_file:
        keys += [ln.strip() for ln in Path(args.api_key_file).read_text().splitlines() if ln.strip()]
    return keys or None


def admin_keys(args: argparse.Namespace) -> list[str] | None:
    """The API server's admin keys: --admin-keys, then $LMFLEET_ADMIN_KEYS; None when none."""
    keys = csv(args.admin_keys) if args.admin_keys else []
    if os.environ.get("LMFLEET_ADMIN_KEYS"):
        keys += csv(os.environ["LMFLEET_ADMIN_KEYS"])
    return keys or None


_FASTCHAT_SWITCHES = {"--load-8bit", "--cpu-offloading", "--embed-in-truncate", "--debug", "--allow-credentials"}


def add_fastchat_ignored(p: argparse.ArgumentParser, *flags: str) -> None:
    """FastChat flags with no lmfleet meaning: accepted, so a FastChat command line still starts, and reported
    once at start-up (`warn_ignored`)."""
    g = p.add_argument_group("FastChat flags accepted and ignored")
    for flag in flags:
        dest = "ignored_" + flag.lstrip("-").replace("-", "_")
        if flag in _FASTCHAT_SWITCHES:
            g.add_argument(flag, dest=dest, action="store_true", help=argparse.SUPPRESS)
        else:
            g.add_argument(flag, dest=dest, default=None, help=argparse.SUPPRESS)


def warn_ignored(args: argparse.Namespace) -> None:
    for name, value in vars(args).items():
        if name.startswith("ignored_") and value not in (None, False):
            flag = "--" + name.removeprefix("ignored_").replace("_", "-")
            logger.warning("%s is a FastChat flag lmfleet ignores", flag)
