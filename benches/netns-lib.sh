# shellcheck shell=bash
# What benches/e2e.sh and benches/isolation.sh share: a root check, the tools they need, the
# release binaries, namespaces and processes that are removed on exit (also on failure or
# Ctrl-C), and a retry helper. Source it after setting PFX (the namespace prefix), then call
#   netns_bench_init NAME TOOL...
# It sets TMP, PIDS, NSS, FABRIC_BIN and PORTOLAN_BIN (building both when either is unset).

netns_bench_init() {
  local name="$1" c
  shift
  if [ "$(id -u)" -ne 0 ]; then
    echo "benches/$name: needs root (network namespaces)" >&2
    exit 1
  fi
  for c in "$@"; do
    command -v "$c" >/dev/null || { echo "benches/$name: $c is missing (scripts/setup.d/10-packages.sh installs it)" >&2; exit 1; }
  done
  TMP="$(mktemp -d "/tmp/${PFX}.XXXXXX")"
  PIDS=()
  NSS=()
  trap 'trap "" PIPE; cleanup; rm -rf "$TMP"' EXIT # PIPE: a closed stdout must not stop the cleanup
  trap 'exit 130' INT TERM
  if [ -z "${FABRIC_BIN:-}" ] || [ -z "${PORTOLAN_BIN:-}" ]; then
    echo "== cargo build --release -p fabric -p portolan" >&2
    cargo build --release -q -p fabric -p portolan
    local td="${CARGO_TARGET_DIR:-target}"
    FABRIC_BIN="${FABRIC_BIN:-$td/release/fabric}"
    PORTOLAN_BIN="${PORTOLAN_BIN:-$td/release/portolan}"
  fi
  FABRIC_BIN="$(realpath "$FABRIC_BIN")"
  PORTOLAN_BIN="$(realpath "$PORTOLAN_BIN")"
}

# Stops every process in PIDS (TERM, up to 5 s, then KILL) and deletes every namespace in NSS,
# newest first.
cleanup() {
  local p n
  for p in "${PIDS[@]-}"; do
    if [ -n "$p" ]; then kill -TERM "$p" 2>/dev/null || true; fi
  done
  for p in "${PIDS[@]-}"; do
    [ -n "$p" ] || continue
    timeout 5 tail --pid="$p" -f /dev/null 2>/dev/null || true
    kill -KILL "$p" 2>/dev/null || true
  done
  PIDS=()
  for ((n = ${#NSS[@]} - 1; n >= 0; n--)); do
    ip netns del "${NSS[n]}" 2>/dev/null || true
  done
  NSS=()
}

addns() { # addns NAME: a namespace with lo up, removed on exit
  ip netns add "$1"
  NSS+=("$1")
  ip -n "$1" link set lo up
}

wait_for() { # wait_for SECONDS CMD...: retries CMD every 0.1 s
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "timed out waiting for: $*" >&2; return 1; }
    sleep 0.1
  done
}
