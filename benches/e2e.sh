#!/usr/bin/env bash
# End-to-end benchmark: fabric against the Linux kernel's vxlan driver, between two containers
# on two "hosts" made of network namespaces (run as root).
#
# The same underlay (two host namespaces joined by veth to a bridge namespace, MTU 1500) is
# built twice: once with fabric (Portolan in the bridge namespace, `fabric dataplane` per host,
# TAP vnics from `fabric vnic add`), once with the kernel (per host: bridge + vxlan device,
# VNI 4242, dstport 4789, nolearning, static FDB entries, container on a veth in the bridge).
# Containers have MTU 1450 in both. Measured between the two containers:
#   tcp1  iperf3 TCP, one stream (Mbit/s, receiver side)
#   tcp4  iperf3 TCP, 4 streams (-P 4, Mbit/s, receiver side)
#   pps   iperf3 UDP, 64-byte payloads, unlimited rate (-b 0): datagrams/s received
#   rtt   ping, 200 pings at 10 ms intervals: average RTT (ms; lower is better)
# It prints both, the ratio fabric/kernel for each, and ends with one line
#   ratio tcp1=… tcp4=… pps=… rtt=…
#
# Environment: E2E_SECONDS (per iperf3 run, default 5), FABRIC_BIN / PORTOLAN_BIN (skip the
# cargo build), CARGO_TARGET_DIR (where cargo builds). Everything it creates (namespaces named
# fe2e<pid>-*, processes, a temp dir) is removed on exit, also on failure or Ctrl-C.
set -euo pipefail

cd "$(dirname "$0")/.."
SECS="${E2E_SECONDS:-5}"
PFX="fe2e$$"
VNI=4242
# shellcheck source=benches/netns-lib.sh
source benches/netns-lib.sh
netns_bench_init e2e.sh ip bridge ping iperf3

# The underlay: bridge namespace U (br0 192.168.78.254/24), hosts H1 and H2 (u0 .1 and .2).
U="$PFX-u"
H=("" "$PFX-h1" "$PFX-h2")
HIP=("" 192.168.78.1 192.168.78.2)
C=("" "$PFX-c1" "$PFX-c2")
CIP=("" 10.80.0.1 10.80.0.2)
CMAC=("" 02:00:0a:50:00:01 02:00:0a:50:00:02)
UUID=("" 564d1a4c-0000-4000-8000-0000000e2e01 564d1a4c-0000-4000-8000-0000000e2e02)

underlay() {
  addns "$U"
  ip -n "$U" link add br0 address 02:00:c0:a8:4e:fe type bridge # fixed: not the lowest port MAC
  ip -n "$U" addr add 192.168.78.254/24 dev br0
  ip -n "$U" link set br0 up
  local i
  for i in 1 2; do
    addns "${H[i]}"
    ip -n "$U" link add "vh$i" type veth peer name u0 netns "${H[i]}"
    ip -n "$U" link set "vh$i" master br0 up
    ip -n "${H[i]}" addr add "${HIP[i]}/24" dev u0
    ip -n "${H[i]}" link set u0 up
  done
}

setup_fabric() {
  underlay
  ip netns exec "$U" "$PORTOLAN_BIN" serve --listen 192.168.78.254:1296 --store "sqlite:$TMP/portolan.db" \
    >"$TMP/portolan.log" 2>&1 &
  PIDS+=($!)
  cat >"$TMP/map.json" <<JSON
{"underlay":[{"cn_uuid":"${UUID[1]}","ip":"${HIP[1]}","port":4789},
             {"cn_uuid":"${UUID[2]}","ip":"${HIP[2]}","port":4789}],
 "overlay":[{"vnet_id":$VNI,"ip":"${CIP[1]}","mac":"${CMAC[1]}","cn_uuid":"${UUID[1]}"},
            {"vnet_id":$VNI,"ip":"${CIP[2]}","mac":"${CMAC[2]}","cn_uuid":"${UUID[2]}"}]}
JSON
  "$PORTOLAN_BIN" import --store "sqlite:$TMP/portolan.db" "$TMP/map.json" >/dev/null
  # Start the dataplanes only once Portolan answers: otherwise their clients back off (1, 2,
  # 4, 8 s) and the first lookups can miss the 20 s the measurement waits for.
  wait_for 20 ip netns exec "${H[1]}" "$PORTOLAN_BIN" ping -s 192.168.78.254:1296 --timeout 1
  local i
  for i in 1 2; do
    ip netns exec "${H[i]}" "$FABRIC_BIN" dataplane --underlay "${HIP[i]}" --portolan 192.168.78.254:1296 \
      --cn-uuid "${UUID[i]}" --control "$TMP/h$i.sock" >"$TMP/h$i.log" 2>&1 &
    PIDS+=($!)
  done
  for i in 1 2; do
    wait_for 20 "$FABRIC_BIN" stats --control "$TMP/h$i.sock"
    addns "${C[i]}"
    "$FABRIC_BIN" vnic add --control "$TMP/h$i.sock" --netns "${C[i]}" --name eth0 --vni "$VNI" \
      --mac "${CMAC[i]}" --ip "${CIP[i]}/24" --mtu 1450 >/dev/null
  done
}

setup_kernel() {
  underlay
  local i j
  for i in 1 2; do
    j=$((3 - i))
    ip -n "${H[i]}" link add brk type bridge
    ip -n "${H[i]}" link add vx0 type vxlan id "$VNI" dstport 4789 local "${HIP[i]}" dev u0 nolearning
    ip -n "${H[i]}" link set vx0 mtu 1450 master brk up
    ip -n "${H[i]}" link set brk up
    addns "${C[i]}"
    ip -n "${H[i]}" link add k0 type veth peer name eth0 netns "${C[i]}"
    ip -n "${H[i]}" link set k0 mtu 1450 master brk up
    ip -n "${C[i]}" link set eth0 address "${CMAC[i]}" mtu 1450 up
    ip -n "${C[i]}" addr add "${CIP[i]}/24" dev eth0
    ip netns exec "${H[i]}" bridge fdb append "${CMAC[j]}" dev vx0 dst "${HIP[j]}"
    ip netns exec "${H[i]}" bridge fdb append 00:00:00:00:00:00 dev vx0 dst "${HIP[j]}"
  done
}

# measure MODE: fills R_<MODE>_{tcp1,tcp4,pps,rtt}
measure() {
  local mode=$1 out
  wait_for 20 ip netns exec "${C[1]}" ping -c 1 -W 1 "${CIP[2]}"
  ip netns exec "${C[2]}" iperf3 -s -B "${CIP[2]}" >"$TMP/iperf3-s-$mode.log" 2>&1 &
  PIDS+=($!)
  wait_for 10 ip netns exec "${C[1]}" bash -c "echo >/dev/tcp/${CIP[2]}/5201"
  sleep 0.5
  out="$(ip netns exec "${C[1]}" iperf3 -c "${CIP[2]}" -t "$SECS" -f m)"
  printf -v "R_${mode}_tcp1" '%s' "$(awk '/receiver/ {for (i = 1; i < NF; i++) if ($(i+1) == "Mbits/sec") v = $i} END {print v}' <<<"$out")"
  out="$(ip netns exec "${C[1]}" iperf3 -c "${CIP[2]}" -t "$SECS" -f m -P 4)"
  printf -v "R_${mode}_tcp4" '%s' "$(awk '/SUM.*receiver/ {for (i = 1; i < NF; i++) if ($(i+1) == "Mbits/sec") v = $i} END {print v}' <<<"$out")"
  out="$(ip netns exec "${C[1]}" iperf3 -c "${CIP[2]}" -t "$SECS" -u -l 64 -b 0)"
  printf -v "R_${mode}_pps" '%s' "$(awk '/receiver/ {
      for (i = 1; i <= NF; i++) {
        if ($i ~ /^[0-9]+\/[0-9]+$/) { split($i, a, "/"); got = a[2] - a[1] }
        if ($i ~ /^[0-9.]+-[0-9.]+$/) { split($i, t, "-"); dur = t[2] - t[1] }
      }
    } END { if (dur > 0) printf "%.0f", got / dur }' <<<"$out")"
  out="$(ip netns exec "${C[1]}" ping -n -q -c 200 -i 0.01 "${CIP[2]}")"
  printf -v "R_${mode}_rtt" '%s' "$(awk -F'[/ ]' '/^rtt|^round-trip/ {print $8}' <<<"$out")"
  local v
  for v in tcp1 tcp4 pps rtt; do
    local name="R_${mode}_$v"
    if [ -z "${!name}" ]; then
      echo "benches/e2e.sh: could not measure $v in $mode mode" >&2
      [ "$mode" = fabric ] && { tail -20 "$TMP"/h*.log >&2 || true; }
      exit 1
    fi
  done
}

echo "== load average before: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) cores), $SECS s per iperf3 run" >&2
echo "== fabric" >&2
setup_fabric
measure fabric
cleanup
echo "== kernel vxlan" >&2
setup_kernel
measure kernel
cleanup
echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
printf '%-34s %14s %14s %8s\n' "metric" "fabric" "kernel" "ratio"
printf '%-34s %14s %14s %8s\n' "tcp, 1 stream (Mbit/s)" "$R_fabric_tcp1" "$R_kernel_tcp1" "$(ratio "$R_fabric_tcp1" "$R_kernel_tcp1")"
printf '%-34s %14s %14s %8s\n' "tcp, 4 streams (Mbit/s)" "$R_fabric_tcp4" "$R_kernel_tcp4" "$(ratio "$R_fabric_tcp4" "$R_kernel_tcp4")"
printf '%-34s %14s %14s %8s\n' "udp 64 B received (packets/s)" "$R_fabric_pps" "$R_kernel_pps" "$(ratio "$R_fabric_pps" "$R_kernel_pps")"
printf '%-34s %14s %14s %8s\n' "ping rtt avg (ms, lower is better)" "$R_fabric_rtt" "$R_kernel_rtt" "$(ratio "$R_fabric_rtt" "$R_kernel_rtt")"
echo "ratio tcp1=$(ratio "$R_fabric_tcp1" "$R_kernel_tcp1") tcp4=$(ratio "$R_fabric_tcp4" "$R_kernel_tcp4") pps=$(ratio "$R_fabric_pps" "$R_kernel_pps") rtt=$(ratio "$R_fabric_rtt" "$R_kernel_rtt")"
