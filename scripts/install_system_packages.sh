#!/usr/bin/env bash
# The programs the test suite runs beside lmfleet, and the Debian package that ships each. tests/test_install.py
# reads this table: a test that starts a program missing here fails, so a fresh machine (CI's, a newcomer's) has
# everything the suite runs.
#   etcd      etcd-server  the etcd registry's tests start real etcd members on loopback and in network namespaces
#   etcdctl   etcd-client  they set up users and TLS with it
#   openssl   openssl      they make throwaway certificates with it
#   chromium  chromium     the web page and /docs are tested in a real browser (Playwright drives Debian's Chromium)
#   ip        iproute2     `ip netns`: the multi-host drills put each part on its own network namespace
# Installs whatever is missing with apt-get (as root, or through sudo); does nothing when all are present.
set -euo pipefail
PROGRAMS=(etcd:etcd-server etcdctl:etcd-client openssl:openssl chromium:chromium ip:iproute2)
need=()
for entry in "${PROGRAMS[@]}"; do
    command -v "${entry%%:*}" >/dev/null || need+=("${entry#*:}")
done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then sudo=(); elif command -v sudo >/dev/null; then sudo=(sudo); else
    echo "missing system packages: ${need[*]} (install them with apt-get as root)" >&2
    exit 1
fi
echo "installing system packages: ${need[*]}"
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
