#!/usr/bin/env bash
# Docker API benchmark: what the stock docker CLI user waits for, fabric against moby 20.10 in
# the same run (run as root).
#
# moby 20.10 (Debian's docker.io, scripts/setup.d/40-docker.sh) runs as the private reference
# daemon of specs/moby-reference.md (its own network namespace, a private mount namespace,
# TLS with openssl certificates on 127.0.0.1:23760). fabric runs `fabric control --data DIR
# --docker-listen 127.0.0.1:23761` (release build, SQLite) in a namespace of its own, with an
# account from `fabric account add`; both CLIs run through `ip netns exec`. For each, N rounds (DOCKER_BENCH_ROUNDS, default 20) of the stock CLI:
#   version       docker version
#   net-create    docker network create --subnet 10.77.<i>.0/24 b<i>
#   net-ls        docker network ls
#   net-inspect   docker network inspect b<i>
#   net-rm        docker network rm b<i>
#   import        docker import rootfs.tar (a busybox rootfs, ~2 MB) im:<i>
#   rmi           docker rmi im:<i>
# Each CLI call is timed end to end (process start to exit: the CLI's own start-up and TLS
# handshake included, as a user sees it). The script ends with one line per operation
#   docker-api OP fabric p50=…ms moby p50=…ms ratio=…
# (ratio = fabric p50 / moby p50; below 1 is faster than moby).
#
# Environment: DOCKER_BENCH_ROUNDS, FABRIC_BIN (skip the cargo build), CARGO_TARGET_DIR,
# DOCKER_CLI (default /usr/local/bin/docker). Everything it creates (namespaces fdb<pid>-*,
# processes, a temp dir, cgroup directories) is removed on exit, also on failure or Ctrl-C.
set -euo pipefail

cd "$(dirname "$0")/.."
N="${DOCKER_BENCH_ROUNDS:-20}"
PFX="fdb$$"
DOCKER_CLI="${DOCKER_CLI:-/usr/local/bin/docker}"
export PORTOLAN_BIN="${PORTOLAN_BIN:-/bin/true}" # netns-lib builds it otherwise; unused here
# shellcheck source=benches/netns-lib.sh
source benches/netns-lib.sh
# shellcheck source=benches/moby-lib.sh
source benches/moby-lib.sh
netns_bench_init docker_api.sh ip nsenter unshare openssl dockerd busybox "$DOCKER_CLI"
MOBY_NS="$PFX-moby"
CGROUP="fabric-bench-$$"
moby_cleanup() {
  local d
  cleanup
  for d in /sys/fs/cgroup/*/"$CGROUP"; do rmdir "$d" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap 'trap "" PIPE; moby_cleanup' EXIT

moby_start # T (client certificates in $T/client), D (the daemon directory)

# --- fabric ------------------------------------------------------------------------------------
# In a namespace of its own too, so both CLIs pay the same `ip netns exec`.
FAB_NS="$PFX-fab"
addns "$FAB_NS"
H="$TMP/head"
mkdir -p "$H"
ip netns exec "$FAB_NS" "$FABRIC_BIN" control --data "$H" --listen 127.0.0.1:23762 --docker-listen 127.0.0.1:23761 \
  --store "sqlite:$H/fabric.db" 2>"$TMP/fabric.log" &
PIDS+=($!)
wait_for 20 test -S "$H/control.sock"
"$FABRIC_BIN" account add alice --data "$H" --cert-dir "$TMP/alice" >/dev/null

moby() { ip netns exec "$MOBY_NS" env DOCKER_HOST=tcp://127.0.0.1:23760 DOCKER_TLS_VERIFY=1 \
  DOCKER_CERT_PATH="$T/client" DOCKER_CONFIG="$TMP/cfg-moby" "$DOCKER_CLI" "$@"; }
fab() { ip netns exec "$FAB_NS" env DOCKER_HOST=tcp://127.0.0.1:23761 DOCKER_TLS_VERIFY=1 DOCKER_CERT_PATH="$TMP/alice" \
  DOCKER_CONFIG="$TMP/cfg-fabric" "$DOCKER_CLI" "$@"; }
wait_for 20 moby version
wait_for 20 fab version

# The image: busybox-static and its applet links.
R="$TMP/rootfs"
mkdir -p "$R/bin" "$R/etc" "$R/tmp"
cp "$(command -v busybox)" "$R/bin/busybox"
for a in $("$R/bin/busybox" --list); do ln -sf busybox "$R/bin/$a"; done
tar -C "$R" -cf "$TMP/rootfs.tar" .

declare -A MS # MS[target op] = "ms ms ms ..."
timed() { # timed TARGET OP CMD...: runs CMD (quiet), adds its wall time
  local t0 t1
  t0=${EPOCHREALTIME/./}
  "${@:3}" >/dev/null
  t1=${EPOCHREALTIME/./}
  MS["$1 $2"]+="$(((t1 - t0) / 1000)) "
}
p50() { tr ' ' '\n' <<<"$1" | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

for target in moby fab; do
  for ((i = 1; i <= N; i++)); do
    timed "$target" version "$target" version
    timed "$target" net-create "$target" network create --subnet "10.77.$i.0/24" "b$i"
    timed "$target" net-ls "$target" network ls
    timed "$target" net-inspect "$target" network inspect "b$i"
    timed "$target" net-rm "$target" network rm "b$i"
    timed "$target" import "$target" import "$TMP/rootfs.tar" "im:$i"
    timed "$target" rmi "$target" rmi "im:$i"
  done
  echo "$target: $N rounds done" >&2
done
for op in version net-create net-ls net-inspect net-rm import rmi; do
  f=$(p50 "${MS[fab $op]}")
  m=$(p50 "${MS[moby $op]}")
  printf 'docker-api %-11s fabric p50=%sms moby p50=%sms ratio=%s\n' "$op" "$f" "$m" \
    "$(awk -v f="$f" -v m="$m" 'BEGIN {printf "%.2f", (m > 0 ? f / m : 0)}')"
done
