#!/usr/bin/env bash
# `docker run` benchmark (run as root): how long the stock docker CLI user waits from `docker run
# -d` to a container answering on its published port, fabric on a 2-host cluster against moby
# 20.10 on one host in the same run; then how many containers one fabric host holds and what
# each costs in memory.
#
# fabric: two simulated hosts as in benches/provision.sh (benches/cluster-lib.sh: namespaces on a
# bridge, a holder with a private mount namespace and its own /run per host); host 1 runs `fabric
# up` (head, SQLite), host 2 `fabric up --join` with the head's token. An account from `fabric
# account add bench --data HEAD`; its CLI runs in the bridge namespace against the head's Docker
# endpoint (192.168.78.1:2376, TLS). moby 20.10: the private reference daemon of
# specs/moby-reference.md (its own namespace, TLS with openssl certificates, the default bridge),
# its CLI through `ip netns exec` too. Both `docker import` the same busybox rootfs tar
# (busybox-static and its applet links, like tests/util/images.rs) as `busybox`.
#
# 1. Run latency. On each daemon a prober container (`busybox sleep 100000`) starts first; then N
#    containers (DOCKER_RUN_N, default 50), alternating fabric and moby so both see the same
#    machine load, each
#        docker run -d -p 8000 busybox httpd -f -p 8000 -h /etc
#        docker inspect -f '{{…IPAddress}}' ID
#        docker exec prober sh -c 'until timeout 1 wget -q -O- http://IP:8000/hostname; do usleep 20000; done'
#    timed from the start of `docker run -d` to the exit of that one `docker exec` (the same
#    three CLI calls on both daemons, so the inspect's and the exec's own cost are on both
#    sides; the poll gives up after ~1500 tries). It prints p50/p99/max per daemon, the
#    `run -d` call alone, how fabric's containers spread over the two hosts, and one line
#        docker-run fabric p50=…ms p99=…ms moby p50=…ms p99=…ms ratio=…
#    (ratio = fabric p50 / moby p50; below 1 is faster than moby), repeated among the final
#    lines. Then `docker rm -f` of all.
# 2. Density. Host 2's `fabric up` stops and the script waits until the head reads it as not
#    running, so placement has only host 1. Then `docker run -d busybox sleep 100000` one at a
#    time until one fails or DOCKER_DENSITY_MAX (default 200) is reached; after every 25 (and at
#    the end) it waits (up to 120 s) until `docker ps` shows them all running and prints the
#    count, the RSS (VmRSS) of host 1's agent and dataplane, the sums over the `fabric shim`
#    processes, the runc processes below them and the containers' own processes (found by
#    cmdline and parent), the growth of host 1's data dir (du) and MemAvailable's drop since
#    the start (noisy: the machine is shared). Final lines
#        docker-density containers=N per-container-kB=… agent-kB=… dataplane-kB=… shim-kB=… …
#        docker-density gave: … (what failed first, or nothing up to the max)
#    where per-container-kB = (shims + runc + container processes + the agent's and dataplane's
#    growth) / N, and shim-kB/runc-kB/proc-kB are per process. Every CLI call has 120 s at most.
#
# Environment: DOCKER_RUN_N, DOCKER_DENSITY_MAX, FABRIC_BIN (skip the cargo build),
# CARGO_TARGET_DIR, DOCKER_CLI (default /usr/local/bin/docker). Everything it creates
# (namespaces fdr<pid>-*, containers, processes, cgroup directories, a temp dir) is removed on
# exit, also on failure or Ctrl-C.
set -euo pipefail

cd "$(dirname "$0")/.."
N="${DOCKER_RUN_N:-50}"
DMAX="${DOCKER_DENSITY_MAX:-200}"
STEP=25
PFX="fdr$$"
DOCKER_CLI="${DOCKER_CLI:-/usr/local/bin/docker}"
export PORTOLAN_BIN="${PORTOLAN_BIN:-/bin/true}" # netns-lib builds it otherwise; unused here
# shellcheck source=benches/netns-lib.sh
source benches/netns-lib.sh
# shellcheck source=benches/moby-lib.sh
source benches/moby-lib.sh
# shellcheck source=benches/cluster-lib.sh
source benches/cluster-lib.sh
netns_bench_init docker_run.sh ip nsenter unshare openssl dockerd busybox curl jq runc "$DOCKER_CLI"
cluster_init "$PFX" 2
# runc mounts each rootfs as the account's unprivileged uid (user namespace): the path to the
# hosts' data dirs must be searchable by others (mktemp makes it 0700).
chmod 0755 "$TMP"
MOBY_NS="$PFX-moby"
CGROUP="fabric-bench-run-$$"
FAB_UP=""  # set once the fabric CLI works (the cleanup then removes its containers)
FAB_IDS="" # every fabric container ID made here (the cleanup checks their cgroups)
MOBY_UP="" # the same for moby

say() { echo "== $*" >&2; }
vm_of() { local i=$1; echo "${i:0:8}-${i:8:4}-${i:12:4}-${i:16:4}-${i:20:12}"; } # container ID → VM UUID
# The cgroups of what this script ran: moby's parent, and fabric's /fabric/<vm> (bundle.rs).
our_cgroups() {
  local id
  echo "/sys/fs/cgroup/pids/$CGROUP"
  for id in $FAB_IDS; do echo "/sys/fs/cgroup/pids/fabric/$(vm_of "$id")"; done
}
dump_logs() {
  tail -n 15 "$TMP"/h*/up.log "$TMP"/h*/logs/*.log "$TMP/moby/dockerd.log" \
    "$TMP"/h*/containers/*/shim.log "$TMP"/h*/containers/*/log >&2 2>/dev/null || true
}

# --- cleanup -----------------------------------------------------------------------------------
# The namespaces of everything this script made, as /proc/PID/ns/* links name them: the bridge,
# the hosts, each host's VM namespaces (in its holder's /run/netns), the hosts' mount namespaces
# and moby's network namespace. Collected before the namespaces are deleted.
ns_ids() {
  local f i
  for f in "/run/netns/$U" "/run/netns/$MOBY_NS"; do
    [ -e "$f" ] && echo "net:[$(stat -L -c %i "$f")]"
  done
  for ((i = 1; i < ${#H[@]}; i++)); do
    [ -e "/run/netns/${H[i]}" ] && echo "net:[$(stat -L -c %i "/run/netns/${H[i]}")]"
    [ -n "${HOLDER[i]}" ] || continue
    readlink "/proc/${HOLDER[i]}/ns/mnt" 2>/dev/null || true
    for f in "/proc/${HOLDER[i]}/root/run/netns"/*; do
      [ -e "$f" ] && echo "net:[$(stat -L -c %i "$f")]"
    done
  done
  return 0
}

# Every process (but this shell and the holders) in one of the namespaces named on stdin, or in
# one of our cgroups (the containers).
leftover_pids() {
  local -A ids=() skip=()
  local id p n m c
  while read -r id; do ids[$id]=1; done
  skip[$$]=1
  for p in "${HOLDERS[@]-}"; do [ -n "$p" ] && skip[$p]=1; done
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    [ -z "${skip[$p]-}" ] || continue
    n=$(readlink "/proc/$p/ns/net" 2>/dev/null) || continue
    m=$(readlink "/proc/$p/ns/mnt" 2>/dev/null) || continue
    if [ -n "${ids[$n]-}" ] || [ -n "${ids[$m]-}" ]; then echo "$p"; fi
  done
  our_cgroups | while read -r c; do
    if [ -d "$c" ]; then find "$c" -name cgroup.procs -exec cat {} + 2>/dev/null || true; fi
  done
}

bench_cleanup() {
  set +e
  trap "" PIPE
  local ids i r c g k
  # Containers first, through their daemons, while everything still runs (bounded).
  if [ -n "$FAB_UP" ]; then
    # shellcheck disable=SC2046
    timeout 120 "${FAB[@]}" rm -f $(timeout 20 "${FAB[@]}" ps -aq) >/dev/null 2>&1
  fi
  if [ -n "$MOBY_UP" ]; then
    # shellcheck disable=SC2046
    timeout 60 "${MOBY[@]}" rm -f $(timeout 20 "${MOBY[@]}" ps -aq) >/dev/null 2>&1
  fi
  # What runc still knows on each host (state under the host's data directory).
  for ((i = 1; i < ${#H[@]}; i++)); do
    [ -n "${HOLDER[i]}" ] || continue
    while read -r r; do
      for c in $(timeout 10 nsenter --target "${HOLDER[i]}" --net --mount -- runc --root "$r" list -q 2>/dev/null); do
        timeout 10 nsenter --target "${HOLDER[i]}" --net --mount -- runc --root "$r" delete --force "$c" >/dev/null 2>&1
      done
    done < <(find "$TMP/h$i" -maxdepth 3 -type d -name runc 2>/dev/null)
  done
  ids=$(ns_ids)
  cleanup # netns-lib: TERM, then KILL, everything in PIDS; deletes the namespaces
  for k in 1 2 3 4 5 6 7 8 9 10; do
    r=$(leftover_pids <<<"$ids")
    [ -n "$r" ] || break
    # shellcheck disable=SC2086
    kill -KILL $r 2>/dev/null
    sleep 0.2
  done
  kill -KILL "${HOLDERS[@]}" 2>/dev/null
  for g in $(our_cgroups); do
    for c in /sys/fs/cgroup/*/"${g#/sys/fs/cgroup/pids/}"; do
      [ -d "$c" ] && find "$c" -depth -type d -exec rmdir {} \; 2>/dev/null
    done
  done
  rm -rf "$TMP"
}
trap bench_cleanup EXIT

moby_start # T (client certificates in $T/client), D (the daemon directory)

# The CLIs, as commands (for `timeout`) and as functions.
MOBY=(ip netns exec "$MOBY_NS" env DOCKER_HOST=tcp://127.0.0.1:23760 DOCKER_TLS_VERIFY=1
  DOCKER_CERT_PATH="$T/client" DOCKER_CONFIG="$TMP/cfg-moby" "$DOCKER_CLI")
FAB=(ip netns exec "$U" env DOCKER_HOST="tcp://${HIP[1]}:2376" DOCKER_TLS_VERIFY=1
  DOCKER_CERT_PATH="$TMP/bench" DOCKER_CONFIG="$TMP/cfg-fabric" "$DOCKER_CLI")
# No call may hang the benchmark: 120 s each at most (the same `timeout` on both sides).
moby() { timeout 120 "${MOBY[@]}" "$@"; }
fab() { timeout 120 "${FAB[@]}" "$@"; }

# --- fabric: two hosts from `fabric up` and `fabric up --join` ---------------------------------
UP=("" "" "") # UP[i]: host i's `fabric up` pid
start_up() { # start_up I ARGS...: `fabric up ARGS` in host I, in the background, in PIDS
  # nsenter execs (no fork), so $! is fabric up itself and SIGTERM reaches it.
  local i=$1
  shift
  mkdir -p "$TMP/h$i"
  nsenter --target "${HOLDER[i]}" --net --mount -- "$FABRIC_BIN" up "$@" >"$TMP/h$i/up.log" 2>&1 &
  PIDS+=($!)
  UP[i]=$!
}
server_down() { ! server_running "$1"; }

cluster_underlay
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
say "fabric: servers ${SRV[1]} (head) and ${SRV[2]} running"
"$FABRIC_BIN" account add bench --data "$TMP/h1" --cert-dir "$TMP/bench" >/dev/null
wait_for 20 fab version
FAB_UP=1
wait_for 20 moby version
MOBY_UP=1

# --- the image: busybox-static and its applet links, imported into both -----------------------
R="$TMP/rootfs"
mkdir -p "$R/bin" "$R/etc" "$R/tmp" "$R/root" "$R/proc" "$R/sys" "$R/dev"
chmod 1777 "$R/tmp"
cp "$(command -v busybox)" "$R/bin/busybox"
for a in $("$R/bin/busybox" --list); do [ "$a" = busybox ] || ln -sf busybox "$R/bin/$a"; done
printf 'root:x:0:\nnogroup:x:65534:\n' >"$R/etc/group"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$R/etc/passwd"
echo busybox >"$R/etc/hostname"
tar -C "$R" --owner=0 --group=0 -cf "$TMP/rootfs.tar" .
fab import "$TMP/rootfs.tar" busybox:latest >/dev/null
moby import "$TMP/rootfs.tar" busybox:latest >/dev/null
say "busybox imported into both"

# --- 1. docker run -d → answering on the published port ----------------------------------------
ip_of() { "$1" inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$2"; }
for d in fab moby; do
  id=$("$d" run -d --name prober busybox sleep 1000000) # not 100000: not counted below
  if [ "$d" = fab ]; then FAB_IDS+=" $id"; fi
  if ! wait_for 60 "$d" exec prober true; then
    "$d" ps -a >&2 || true
    "$d" exec prober true || true # its error
    "$d" logs prober >&2 || true
    dump_logs
    exit 1
  fi
done
say "probers answer docker exec; $N containers per daemon"

declare -A RUN_MS TOTAL_MS IDS # [daemon] = "ms ms ..." / "id id ..."
one_run() { # one_run DAEMON K: one timed sample
  local d=$1 k=$2 t0 t1 t2 id ip
  t0=$(now_ms)
  id=$("$d" run -d -p 8000 busybox httpd -f -p 8000 -h /etc)
  t1=$(now_ms)
  IDS[$d]+="$id "
  if [ "$d" = fab ]; then FAB_IDS+=" $id"; fi
  ip=$(ip_of "$d" "$id")
  if [ -z "$ip" ]; then
    echo "benches/docker_run.sh: $d container $k ($id) has no IP address" >&2
    dump_logs
    return 1
  fi
  if ! "$d" exec prober sh -c "n=0; until timeout 1 wget -q -O- http://$ip:8000/hostname >/dev/null 2>&1; do n=\$((n + 1)); [ \$n -lt 1500 ] || exit 1; usleep 20000; done"; then
    echo "benches/docker_run.sh: $d container $k ($id, $ip) never answered on port 8000" >&2
    "$d" logs "$id" 2>&1 | tail -5 >&2
    dump_logs
    return 1
  fi
  t2=$(now_ms)
  RUN_MS[$d]+="$((t1 - t0)) "
  TOTAL_MS[$d]+="$((t2 - t0)) "
}
for ((k = 1; k <= N; k++)); do
  one_run fab "$k"
  one_run moby "$k"
  if ((k % 10 == 0)); then say "$k of $N"; fi
done

stats() { # stats "ms ms ...": p50 p99 max (nearest rank)
  tr ' ' '\n' <<<"$1" | grep . | sort -n | awk '
    { v[NR] = $1 }
    END {
      i50 = int(NR * 0.50 + 0.999999); if (i50 < 1) i50 = 1
      i99 = int(NR * 0.99 + 0.999999); if (i99 < 1) i99 = 1
      print v[i50], v[i99], v[NR]
    }'
}
# Where fabric put them: the VM UUID is the container ID's first 32 hex digits, 8-4-4-4-12.
declare -A ON=()
for id in ${IDS[fab]}; do
  s=$(api GET "/vms/$(vm_of "$id")" | jq -r .server_uuid)
  ON[$s]=$((${ON[$s]-0} + 1))
done
say "fabric's $N containers: $(for i in 1 2; do printf 'h%s=%s ' "$i" "${ON[${SRV[i]}]-0}"; done)"
for d in fab moby; do
  read -r r50 r99 _ < <(stats "${RUN_MS[$d]}")
  read -r a50 a99 amax < <(stats "${TOTAL_MS[$d]}")
  printf '%-6s n=%s answering p50=%sms p99=%sms max=%sms; the run -d call alone p50=%sms p99=%sms\n' \
    "$([ "$d" = fab ] && echo fabric || echo moby)" "$N" "$a50" "$a99" "$amax" "$r50" "$r99"
done
read -r F50 F99 _ < <(stats "${TOTAL_MS[fab]}")
read -r M50 M99 _ < <(stats "${TOTAL_MS[moby]}")
RUN_LINE=$(printf 'docker-run fabric p50=%sms p99=%sms moby p50=%sms p99=%sms ratio=%s' \
  "$F50" "$F99" "$M50" "$M99" "$(awk -v f="$F50" -v m="$M50" 'BEGIN {printf "%.2f", (m > 0 ? f / m : 0)}')")
echo "$RUN_LINE"
# shellcheck disable=SC2086
fab rm -f prober ${IDS[fab]} >/dev/null
# shellcheck disable=SC2086
moby rm -f prober ${IDS[moby]} >/dev/null
say "run containers removed"

# --- 2. density on host 1 ----------------------------------------------------------------------
# The agents tear the removed containers down (their shims end); then host 2 stops.
no_shims_on() { ! pgrep -f -- "shim --dir $TMP/h$1/" >/dev/null; }
for i in 1 2; do wait_for 60 no_shims_on "$i" || say "host $i still has shims after 60 s"; done
kill -TERM "${UP[2]}"
timeout 20 tail --pid="${UP[2]}" -f /dev/null || true
wait_for 60 server_down "${SRV[2]}"
say "host 2 stopped and read as not running: placement has host 1 only"

cmd_of() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null; }
rss_kb() { awk '/^VmRSS:/ {print $2; f = 1} END {if (!f) print 0}' "/proc/$1/status" 2>/dev/null || echo 0; }
mem_avail_kb() { awk '/^MemAvailable:/ {print $2}' /proc/meminfo; }
# fabric's child `SUB` (agent, dataplane) of host 1: its cmdline names the host's data dir.
child_pid() {
  local p
  for p in $(pgrep -P "${UP[1]}"); do
    case "$(cmd_of "$p")" in "$FABRIC_BIN $1 "*) echo "$p" && return 0 ;; esac
  done
  echo 0
}
AGENT=$(child_pid agent)
DATAPLANE=$(child_pid dataplane)
if [ "$AGENT" = 0 ] || [ "$DATAPLANE" = 0 ]; then
  echo "benches/docker_run.sh: no agent or dataplane below host 1's fabric up (pid ${UP[1]})" >&2
  exit 1
fi
# One pass over /proc: sets SHIM_N/SHIM_KB (host 1's `fabric shim` processes: their cmdline names
# its data dir), RUNC_N/RUNC_KB (runc processes below them: `runc run` stays in the foreground)
# and CT_N/CT_KB (the containers' own processes: the rest below the shims, and any `sleep 100000`).
measure() {
  local f k v p q a d
  local -A par=() rss=() shim=()
  SHIM_N=0 SHIM_KB=0 RUNC_N=0 RUNC_KB=0 CT_N=0 CT_KB=0
  while IFS=: read -r f k v; do # /proc/PID/status:PPid:<tab>N
    p=${f#/proc/}
    p=${p%/status}
    v=${v//[!0-9]/}
    if [ "$k" = PPid ]; then par[$p]=$v; else rss[$p]=$v; fi
  done < <(grep -H -E '^(PPid|VmRSS):' /proc/[0-9]*/status 2>/dev/null)
  for p in "${!par[@]}"; do
    a=()
    mapfile -d "" -t a 2>/dev/null <"/proc/$p/cmdline" || continue
    if [ "${a[0]-}" = "$FABRIC_BIN" ] && [ "${a[1]-}" = shim ] && [[ "${a[*]}" == *"$TMP/h1/"* ]]; then
      shim[$p]=1
      SHIM_N=$((SHIM_N + 1)) SHIM_KB=$((SHIM_KB + ${rss[$p]-0}))
    fi
  done
  for p in "${!par[@]}"; do
    [ -z "${shim[$p]-}" ] || continue
    d=0 q=${par[$p]} # below a shim (a few levels at most)?
    for _ in 1 2 3 4; do
      if [ -n "${shim[$q]-}" ]; then d=1 && break; fi
      q=${par[$q]-1}
      [ "$q" -gt 1 ] || break
    done
    a=()
    mapfile -d "" -t a 2>/dev/null <"/proc/$p/cmdline" || continue
    if [ "$d" = 1 ] && [ "${a[0]##*/}" = runc ]; then
      RUNC_N=$((RUNC_N + 1)) RUNC_KB=$((RUNC_KB + ${rss[$p]-0}))
    elif [ "$d" = 1 ] || [ "${a[*]}" = "sleep 100000" ]; then
      CT_N=$((CT_N + 1)) CT_KB=$((CT_KB + ${rss[$p]-0}))
    fi
  done
}
running_count() { fab ps -q | grep -c . || true; }

disk_kb() { du -sk "$TMP/h1" 2>/dev/null | cut -f1; } # host 1's data dir (rootfs copies, logs, …)
MEM0=$(mem_avail_kb)
DISK0=$(disk_kb)
AGENT0=$(rss_kb "$AGENT")
DP0=$(rss_kb "$DATAPLANE")
say "density: agent ${AGENT0} kB, dataplane ${DP0} kB, MemAvailable ${MEM0} kB at the start"
GAVE=""
COUNT=0
T_STEP=$SECONDS
report_step() { # waits (bounded) until COUNT containers run, then prints one line
  local t0=$SECONDS up
  up=$(running_count)
  while [ "$up" -lt "$COUNT" ] && [ $((SECONDS - t0)) -lt 120 ]; do
    sleep 1
    up=$(running_count)
  done
  measure
  printf 'density n=%s (%ss) running=%s agent-kB=%s dataplane-kB=%s shims=%s/%skB runc=%s/%skB container-procs=%s/%skB disk-growth-kB=%s memavail-drop-kB=%s\n' \
    "$COUNT" "$((SECONDS - T_STEP))" "$up" "$(rss_kb "$AGENT")" "$(rss_kb "$DATAPLANE")" "$SHIM_N" "$SHIM_KB" "$RUNC_N" "$RUNC_KB" "$CT_N" "$CT_KB" \
    "$(($(disk_kb) - DISK0))" "$((MEM0 - $(mem_avail_kb)))"
  T_STEP=$SECONDS
  if [ "$up" -lt "$COUNT" ] && [ -z "$GAVE" ]; then
    GAVE="only $up of $COUNT containers running 120 s after the last docker run"
  fi
}
while [ "$COUNT" -lt "$DMAX" ]; do
  if ! err=$(fab run -d busybox sleep 100000 2>&1 >"$TMP/id"); then
    GAVE="docker run #$((COUNT + 1)) failed: $(tail -1 <<<"$err")"
    break
  fi
  FAB_IDS+=" $(cat "$TMP/id")"
  COUNT=$((COUNT + 1))
  if ((COUNT % STEP == 0)); then
    report_step
    [ -z "$GAVE" ] || break
  fi
done
if ((COUNT == 0 || COUNT % STEP != 0)); then report_step; fi # else the last step just reported
ONH1=$(api GET "/vms?server_uuid=${SRV[1]}" | jq 'length')
A1=$(rss_kb "$AGENT")
P1=$(rss_kb "$DATAPLANE")
PER=$(((SHIM_KB + RUNC_KB + CT_KB + A1 - AGENT0 + P1 - DP0) / (COUNT > 0 ? COUNT : 1)))
echo "== load average: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) cores); VMs on host 1: $ONH1" >&2
echo "$RUN_LINE"
echo "docker-density containers=$COUNT per-container-kB=$PER agent-kB=$A1 dataplane-kB=$P1 shim-kB=$((SHIM_KB / (SHIM_N > 0 ? SHIM_N : 1))) runc-kB=$((RUNC_KB / (RUNC_N > 0 ? RUNC_N : 1))) proc-kB=$((CT_KB / (CT_N > 0 ? CT_N : 1))) memavail-per-container-kB=$(((MEM0 - $(mem_avail_kb)) / (COUNT > 0 ? COUNT : 1)))"
if [ -n "$GAVE" ]; then
  echo "docker-density gave: $GAVE"
else
  echo "docker-density gave: nothing up to DOCKER_DENSITY_MAX=$DMAX"
fi
