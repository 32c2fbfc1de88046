"""`lmfleet controller`'s flags, and the `ControllerSettings` they make (lmfleet.controller.app).

Owns the controller's flags (`add_args`) and turning them into its settings (`settings`), the etcd registry's
included (`--registry etcd://...`, whose client is imported only when that flag is given). Each default is read
from the settings it belongs to. FastChat's controller flag names are kept.

Does not own: the flags every part shares (lmfleet.flags), the settings themselves and their validation
(lmfleet.controller.app, lmfleet.controller.etcd), running the process (lmfleet.cli).
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from lmfleet import flags
from lmfleet.controller.app import ControllerSettings
from lmfleet.dispatch import DEFAULT_POLICY, POLICIES

if TYPE_CHECKING:
    from lmfleet.controller.etcd import EtcdSettings

PORT = 21001  # FastChat's controller port


def add_args(p: argparse.ArgumentParser) -> None:
    flags.add_listen_args(p, PORT)
    p.add_argument(
        "--dispatch-method",
        default=DEFAULT_POLICY,
        choices=sorted(POLICIES),
        help=f"how a worker is picked per request (default {DEFAULT_POLICY})",
    )
    expiry = ControllerSettings().heartbeat_expiry_s
    p.add_argument(
        "--heartbeat-expiration",
        type=float,
        default=expiry,
        help=f"seconds without a heartbeat before a worker is dropped (default {expiry:g})",
    )
    flags.add_secret_arg(p)
    fastchat_expiry = ControllerSettings().fastchat_heartbeat_expiry_s
    p.add_argument(
        "--fastchat-heartbeat-expiration",
        type=float,
        default=fastchat_expiry,
        help="seconds without a heartbeat before a FastChat model worker (one that beats every 45 s) is dropped "
        f"(default {fastchat_expiry:g}, FastChat's)",
    )
    p.add_argument(
        "--allowed-worker-networks",
        type=flags.csv,
        default=None,
        help="comma-separated CIDRs workers may register from, e.g. 10.0.0.0/8,127.0.0.0/8",
    )
    g = p.add_argument_group("the fleet in etcd (several controllers serve one fleet)")
    g.add_argument(
        "--registry",
        default=None,
        metavar="etcd://HOST:PORT[,HOST:PORT...]",
        help="keep the fleet's registrations in etcd (default: in this process's memory)",
    )
    g.add_argument("--etcd-prefix", default=None, help="key prefix of the fleet's workers (default /lmfleet/workers/)")
    g.add_argument("--etcd-user", default=None, help="etcd user (default: $LMFLEET_ETCD_USER)")
    g.add_argument(
        "--etcd-password", default=None, help="etcd password (default: $LMFLEET_ETCD_PASSWORD, which stays out of ps)"
    )
    g.add_argument("--etcd-ca-file", default=None, help="TLS: CA certificate(s) that signed etcd's certificate")
    g.add_argument("--etcd-cert-file", default=None, help="TLS: this controller's client certificate")
    g.add_argument("--etcd-key-file", default=None, help="TLS: the client certificate's key")


def etcd_settings(args: argparse.Namespace) -> EtcdSettings | None:
    """The etcd registry's settings, or None (no --registry: the in-memory registry). SystemExit, one line, when
    the etcd extra is missing or the flags do not make a valid registry."""
    if not args.registry:
        return None
    try:
        from lmfleet.controller.etcd import EtcdSettings
    except ImportError as exc:
        hint = "pip install 'lmfleet[etcd]'"
        raise SystemExit(f"lmfleet controller: --registry needs the etcd extra ({hint}): {exc}") from None
    given = {
        "prefix": args.etcd_prefix,
        "user": args.etcd_user or os.environ.get("LMFLEET_ETCD_USER") or None,
        "password": args.etcd_password or os.environ.get("LMFLEET_ETCD_PASSWORD") or None,
        "ca_file": args.etcd_ca_file,
        "cert_file": args.etcd_cert_file,
        "key_file": args.etcd_key_file,
    }
    try:
        return EtcdSettings.from_url(args.registry, **{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        raise SystemExit(f"lmfleet controller: {exc}") from None


def settings(args: argparse.Namespace) -> ControllerSettings:
    return ControllerSettings(
        dispatch_policy=args.dispatch_method,
        heartbeat_expiry_s=args.heartbeat_expiration,
        fastchat_heartbeat_expiry_s=args.fastchat_heartbeat_expiration,
        registration_secret=flags.registration_secret(args),
        allowed_worker_networks=args.allowed_worker_networks,
        etcd=etcd_settings(args),
    )
