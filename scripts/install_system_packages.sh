#!/usr/bin/env bash
# The system packages the test suite runs beside lmfleet (Debian names):
#   etcd-server  the etcd registry's tests start real etcd members on loopback and in network namespaces
#   chromium     the web page and /docs are tested in a real browser (Playwright drives Debian's Chromium)
#   iproute2     `ip netns`: the multi-host drills put each part on its own network namespace
# Installs whatever is missing with apt-get (as root, or through sudo); does nothing when all are present.
set -euo pipefail
need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v chromium >/dev/null || need+=(chromium)
command -v ip >/dev/null || need+=(iproute2)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then sudo=(); elif command -v sudo >/dev/null; then sudo=(sudo); else
    echo "missing system packages: ${need[*]} (install them with apt-get as root)" >&2
    exit 1
fi
echo "installing system packages: ${need[*]}"
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
