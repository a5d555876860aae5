#!/usr/bin/env bash
# Provision-to-ping benchmark: VMs created through the control plane's `POST /vms` until they
# answer ping from a VM on the other server (run as root).
#
# Two simulated hosts, like tests/util/cluster.rs: each a network namespace on a bridge
# (192.168.78.0/24) plus a holder process with a private mount namespace and its own /run, so
# each agent has its own /run/netns. Host 1 runs `fabric up` (head: control plane, Portolan,
# dataplane, agent; SQLite), host 2 `fabric up --join` with the head's join token. The API is
# https only: once the head has made its cluster CA (DIR/pki/cluster-ca.crt), `fabric cert admin`
# writes an operator certificate that every API call uses. One fabric network; one probe VM per
# server; then N VMs (default 100), one at a time, alternating servers. For each VM the time is
# taken from just before its `POST /vms` to the first ping reply it sends back to the probe on
# the other server (ping every 10 ms, so the figure is within ~10 ms). It prints every sample's
# summary and ends with one line
#   provision-to-ping p50=…ms p99=…ms max=…ms n=…
# (goal: p99 < 1000 ms).
#
# Environment: PROVISION_VMS (default 100), FABRIC_BIN / PORTOLAN_BIN (skip the cargo build),
# CARGO_TARGET_DIR. Everything it creates (namespaces fpv<pid>-*, processes, a temp dir) is
# removed on exit, also on failure or Ctrl-C.
set -euo pipefail

cd "$(dirname "$0")/.."
N="${PROVISION_VMS:-100}"
PFX="fpv$$"
OWNER=930896af-bf8c-48d4-885c-6573a94b1853
# shellcheck source=benches/netns-lib.sh
source benches/netns-lib.sh
# shellcheck source=benches/cluster-lib.sh
source benches/cluster-lib.sh
netns_bench_init provision.sh ip nsenter unshare ping curl jq

cluster_init "$PFX" 2

start_up() { # start_up I ARGS...: `fabric up ARGS` in host I, in the background, in PIDS
  # nsenter execs (no fork), so $! is fabric up itself and the cleanup's SIGTERM reaches it.
  local i=$1
  shift
  mkdir -p "$TMP/h$i"
  nsenter --target "${HOLDER[i]}" --net --mount -- "$FABRIC_BIN" up "$@" >"$TMP/h$i/up.log" 2>&1 &
  PIDS+=($!)
}

cluster_underlay
# Once the head has its cluster CA: the operator's certificate and the join token; then the API
# answers the operator and host 2 joins with the token.
start_up 1 --data "$TMP/h1" --underlay "${HIP[1]}"
wait_for 30 test -s "$TMP/h1/pki/cluster-ca.crt"
"$FABRIC_BIN" cert admin --data "$TMP/h1" --out "$OP" >/dev/null
TOKEN="$("$FABRIC_BIN" token --data "$TMP/h1")"
wait_for 30 api GET /ping
start_up 2 --data "$TMP/h2" --underlay "${HIP[2]}" --join "$API" --token "$TOKEN"
SRV=("" "" "")
for i in 1 2; do
  wait_for 10 test -s "$TMP/h$i/server-uuid"
  SRV[i]="$(cat "$TMP/h$i/server-uuid")"
  wait_for 30 server_running "${SRV[i]}"
done
echo "== servers ${SRV[1]} (head) and ${SRV[2]} running" >&2

api POST "/fabrics/$OWNER/vlans" '{"vlan_id": 60}' >/dev/null
NET="$(api POST "/fabrics/$OWNER/vlans/60/networks" \
  '{"name":"bench","subnet":"10.60.0.0/22","gateway":"10.60.0.1","provision_start_ip":"10.60.0.2","provision_end_ip":"10.60.3.250"}' |
  jq -r .uuid)"

# The probes: one VM per server.
PROBE=("" "" "")
for i in 1 2; do
  v="$(api POST /vms "{\"owner_uuid\":\"$OWNER\",\"server_uuid\":\"${SRV[i]}\",\"alias\":\"probe$i\",\"networks\":[{\"uuid\":\"$NET\"}]}")"
  PROBE[i]="$(jq -r .uuid <<<"$v")"
done
for i in 1 2; do wait_for 30 vm_running "${PROBE[i]}"; done
echo "== probes running; provisioning $N VMs" >&2

SAMPLES=()
for ((k = 0; k < N; k++)); do
  on=$((k % 2 + 1))   # the VM's server
  from=$((3 - on))    # the probe that pings it
  t0="$(now_ms)"
  v="$(api POST /vms "{\"owner_uuid\":\"$OWNER\",\"server_uuid\":\"${SRV[on]}\",\"alias\":\"vm$k\",\"networks\":[{\"uuid\":\"$NET\"}]}")"
  ip="$(jq -r '.nics[0].ip' <<<"$v")"
  # One process: a ping every 10 ms until the first reply (or 20 s).
  if ! in_host "$from" ip netns exec "${PROBE[from]}" ping -n -q -c 1 -i 0.01 -w 20 "$ip" >/dev/null; then
    echo "benches/provision.sh: VM $k ($ip on h$on) never answered" >&2
    tail -30 "$TMP"/h*/logs/*.log >&2 || true
    exit 1
  fi
  t1="$(now_ms)"
  SAMPLES+=($((t1 - t0)))
done

read -r P50 P99 MAX < <(printf '%s\n' "${SAMPLES[@]}" | sort -n | awk '
  { v[NR] = $1 }
  END {
    i50 = int(NR * 0.50 + 0.999999); if (i50 < 1) i50 = 1
    i99 = int(NR * 0.99 + 0.999999); if (i99 < 1) i99 = 1
    print v[i50], v[i99], v[NR]
  }')
echo "== load average: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) cores)" >&2
echo "provision-to-ping p50=${P50}ms p99=${P99}ms max=${MAX}ms n=$N"
