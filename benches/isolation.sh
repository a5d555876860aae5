#!/usr/bin/env bash
# Attack benchmark: does one hostile container, or one hostile underlay host, hurt another
# tenant? Real namespaces, release binaries, run as root.
#
# Underlay: a bridge namespace U (br0 192.168.79.254/24, Portolan listens there), host A
# (H1, .1) and host B (H2, .2) each running `fabric dataplane`, and a rogue namespace R (.66)
# on the same bridge that is not a fabric host. On host A: a "flooder" container (VNI 1,
# 10.16.0.1/12) and a "victim" container (VNI 2, 10.2.0.1/16, another tenant). On host B:
# 2*N destination containers on VNI 2 (10.2.1.1 ..), all mapped in Portolan.
#
#   1. Pending-lookup flood: the victim pings N-1 destinations it has never resolved (ping -c1
#      -W2: the time includes the ARP round, i.e. the Portolan lookup), once with no load
#      (baseline) and then on N-1 other destinations while the flooder sends ARP requests for
#      ever-new unmapped addresses of its /12 as fast as a python AF_PACKET socket can.
#      Reported: time to first reply p50/max, failures, flood rate, and the drop counters
#      pending_table_full / pending_quota of both vnics (`fabric stats --json`).
#   2. Underlay ARP reflection: R sends VXLAN-encapsulated broadcast ARP requests (VNI 1 for
#      the flooder's address, VNI 2 for the victim's, alternately) to host A's 4789 from one
#      UDP socket bound to R's port 4789 (fabric answers to the source IP on the VXLAN port,
#      whatever the source port) for ARP_SECONDS, and counts the VXLAN ARP replies it gets;
#      host A's underlay_arp_unknown_peer / underlay_arp_rate_limited drops are read too.
#   3. Conntrack flood: the flooder and the victim get a firewall (`fabric fw apply`: both
#      firewall_enabled, no rules, so outbound flows are allowed and tracked); the flooder
#      sends UDP to ever-new ports of a "sink" container on host B (VNI 1) from 8 sockets as
#      fast as python can, for FLOOD_SECONDS, and the sink echoes every datagram (a python
#      AF_PACKET socket swapping the headers), so the flooder's flows are replied, not
#      half-open ones that any table evicts first; meanwhile the victim pings its (already
#      resolved) baseline destinations again, each ping a new flow whose reply needs the
#      state, and 4 TCP connections it opened to host B before the flood sit idle; after
#      the flood the server writes on each (inbound: it passes only if the victim's flow is
#      still tracked). Reported: p50/max, failures, idle connections that got their data,
#      the victim's conntrack_full and firewall_default drops, the flooder's
#      conntrack_full, and the flows tracked at the end.
#
# A counter the binary does not know (an older build) prints as n/a. Output: one line per
# measure, then
#   isolation base_p50_ms=… flood_p50_ms=… … arp_replies=… arp_unknown_peer=…
#
# Environment: FABRIC_BIN / PORTOLAN_BIN (required unless cargo should build them),
# ISO_DESTS (N, default 16; N-1 destinations per set), FLOOD_SECONDS (default 3),
# FLOOD_WARMUP (s of flood before the victim starts, default 0.5), ISO_GAP (s between the
# victim's pings, default 0.1), ARP_SECONDS (default 2). Everything it creates (namespaces
# fiso<pid>-*, processes, a temp dir) is removed on exit, also on failure or Ctrl-C; traffic
# stays inside those namespaces. Runs in about 15 s.
set -euo pipefail

cd "$(dirname "$0")/.."
PFX="fiso$$"
N="${ISO_DESTS:-16}"
WARMUP="${FLOOD_WARMUP:-0.5}"
FLOOD_SECS="${FLOOD_SECONDS:-3}"
GAP="${ISO_GAP:-0.1}"
ARP_SECS="${ARP_SECONDS:-2}"
# shellcheck source=benches/netns-lib.sh
source benches/netns-lib.sh
netns_bench_init isolation.sh ip ping python3

U="$PFX-u"
R="$PFX-r"
H=("" "$PFX-h1" "$PFX-h2")
HIP=("" 192.168.79.1 192.168.79.2)
RIP=192.168.79.66
UUID=("" 564d1a4c-0000-4000-8000-00000000150a 564d1a4c-0000-4000-8000-00000000150b)
FL="$PFX-fl" FLIP=10.16.0.1 FLPFX=12 FLMAC=02:00:0a:10:00:01 # VNI 1, host A
SK="$PFX-sk" SKIP=10.16.0.2 SKMAC=02:00:0a:10:00:02            # VNI 1, host B
VI="$PFX-vi" VIIP=10.2.0.1 VIMAC=02:00:0a:02:00:01            # VNI 2, host A
DIP=() DMAC=() DNS=()                                         # VNI 2, host B
for ((k = 1; k <= 2 * N; k++)); do
  DIP[k]="10.2.1.$k"
  DMAC[k]="$(printf '02:00:0a:02:01:%02x' "$k")"
  DNS[k]="$PFX-d$k"
done

# --- helpers in python (written to the temp dir) ----------------------------------------------

cat >"$TMP/flood.py" <<'PY'
# flood.py IF MAC IP PREFIXLEN SECONDS OUT: ARP requests for ever-new addresses of IP/PREFIXLEN
import signal, socket, struct, sys, time
ifname, mac, ip, plen, secs, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
src = bytes.fromhex(mac.replace(":", ""))
me = struct.unpack("!I", socket.inet_aton(ip))[0]
net = me & ~((1 << (32 - plen)) - 1) & 0xFFFFFFFF
size = 1 << (32 - plen)
head = b"\xff" * 6 + src + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + src + socket.inet_aton(ip) + b"\x00" * 6
pad = b"\x00" * 18
sent = errs = 0
i = 256  # skip the low addresses (the flooder and friends)
t0 = time.time()
end = t0 + secs
while not stop and time.time() < end:
    for _ in range(256):
        i += 1
        if i >= size - 1:
            i = 256
        try:
            s.send(head + struct.pack("!I", net + i) + pad)
            sent += 1
        except OSError:
            errs += 1
el = time.time() - t0
with open(out, "w") as f:
    f.write("%d %d %.3f\n" % (sent, errs, el))
PY

cat >"$TMP/reflect.py" <<'PY'
# reflect.py DST SECONDS VNI:TPA:SPA ...: VXLAN broadcast ARP requests from one UDP socket;
# prints "sent replies reply_bytes"
import socket, struct, sys, time
dst, secs = sys.argv[1], float(sys.argv[2])
sha = bytes.fromhex("02deadbeef01")
pkts = []
for spec in sys.argv[3:]:
    vni, tpa, spa = spec.split(":")
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + sha + socket.inet_aton(spa) + b"\x00" * 6 + socket.inet_aton(tpa)
    pkts.append(struct.pack("!II", 0x08000000, int(vni) << 8) + b"\xff" * 6 + sha + b"\x08\x06" + arp + b"\x00" * 18)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("0.0.0.0", 4789))  # fabric answers to the source's IP on the VXLAN port
s.setblocking(False)
sent = replies = rbytes = 0
def drain():
    global replies, rbytes
    while True:
        try:
            d = s.recv(2048)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            continue
        # VXLAN (8) + Ethernet (14): ARP ethertype and op 2 (reply)
        if len(d) >= 8 + 14 + 8 and d[20:22] == b"\x08\x06" and d[28:30] == b"\x00\x02":
            replies += 1
            rbytes += len(d)
end = time.time() + secs
n = 0
while time.time() < end:
    for _ in range(64):
        try:
            s.sendto(pkts[n % len(pkts)], (dst, 4789))
            sent += 1
            n += 1
        except OSError:
            pass
    drain()
late = time.time() + 0.5
while time.time() < late:
    drain()
    time.sleep(0.01)
print(sent, replies, rbytes)
PY

cat >"$TMP/udpflood.py" <<'PY'
# udpflood.py DST SECONDS OUT: UDP to ever-new (source socket, port) pairs: one new flow each
import signal, socket, sys, time
dst, secs, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(8)]
for s in socks:
    s.setblocking(False)
sent = errs = i = 0
t0 = time.time()
end = t0 + secs
while not stop and time.time() < end:
    for _ in range(256):
        i += 1
        try:
            socks[i % 8].sendto(b"x", (dst, (i // 8) % 65535 + 1))
            sent += 1
        except OSError:
            errs += 1
with open(out, "w") as f:
    f.write("%d %d %.3f\n" % (sent, errs, time.time() - t0))
PY

cat >"$TMP/echo.py" <<'PY'
# echo.py IF SECONDS: answer every UDP/IPv4 datagram on IF by swapping MACs, addresses and
# ports (the IP checksum stays right; the UDP checksum is set to 0, "none")
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.bind((sys.argv[1], 0))
s.settimeout(0.2)
end = time.time() + float(sys.argv[2])
while time.time() < end:
    try:
        f, addr = s.recvfrom(2048)
    except socket.timeout:
        continue
    if addr[2] == socket.PACKET_OUTGOING or len(f) < 42 or f[23] != 17:
        continue
    ihl = (f[14] & 15) * 4
    u = 14 + ihl
    try:
        s.send(f[6:12] + f[0:6] + f[12:26] + f[30:34] + f[26:30] + f[34:u]
               + f[u + 2:u + 4] + f[u:u + 2] + f[u + 4:u + 6] + b"\0\0" + f[u + 8:])
    except OSError:
        pass
PY

cat >"$TMP/idle.py" <<'PY'
# idle.py server PORT K GOFILE | client IP PORT K READYFILE GOFILE: K idle TCP connections;
# the server writes on each once GOFILE exists; the client prints how many got it within 3 s
import os, socket, sys, time
if sys.argv[1] == "server":
    port, k, go = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("0.0.0.0", port))
    l.listen(k)
    l.settimeout(60)
    conns = [l.accept()[0] for _ in range(k)]
    while not os.path.exists(go):
        time.sleep(0.05)
    for c in conns:
        c.sendall(b"late\n")
    time.sleep(10)
else:
    ip, port, k, ready, go = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
    conns = [socket.create_connection((ip, port), timeout=5) for _ in range(k)]
    open(ready, "w").close()
    while not os.path.exists(go):
        time.sleep(0.05)
    got = 0
    end = time.time() + 3
    for c in conns:
        c.settimeout(max(0.01, end - time.time()))
        try:
            if c.recv(16):
                got += 1
        except OSError:
            pass
    print(got)
PY

cat >"$TMP/stat.py" <<'PY'
# stat.py WHO NAME < stats.json: WHO is "global" or a vnic's netns; NAME a counter or drop reason
import json, sys
s = json.load(sys.stdin)
who, name = sys.argv[1], sys.argv[2]
if who == "conntrack":
    ct = s.get("conntrack") or {}
    print(ct.get("flows", 0) if name == "flows" else (ct.get("counters") or {}).get(name, "n/a"))
    sys.exit(0)
c = s["global"] if who == "global" else next(v["counters"] for v in s["vnics"] if v["netns"] == who)
print(c[name] if name in c else c.get("drops", {}).get(name, 0))
PY

# counter SOCK WHO NAME: a counter from `fabric stats --json`, n/a if this build lacks it
counter() {
  local known=1
  case "$3" in
    *_*) grep -qa "$3" "$FABRIC_BIN" || known=0 ;;
  esac
  if [ "$known" -eq 0 ]; then
    echo n/a
    return
  fi
  "$FABRIC_BIN" stats --control "$1" --json 2>/dev/null | python3 "$TMP/stat.py" "$2" "$3" 2>/dev/null || echo n/a
}

# --- setup -------------------------------------------------------------------------------------

addns "$U"
ip -n "$U" link add br0 address 02:00:c0:a8:4f:fe type bridge
ip -n "$U" addr add 192.168.79.254/24 dev br0
ip -n "$U" link set br0 up
for i in 1 2; do
  addns "${H[i]}"
  ip -n "$U" link add "vh$i" type veth peer name u0 netns "${H[i]}"
  ip -n "$U" link set "vh$i" master br0 up
  ip -n "${H[i]}" addr add "${HIP[i]}/24" dev u0
  ip -n "${H[i]}" link set u0 up
done
addns "$R"
ip -n "$U" link add vr type veth peer name u0 netns "$R"
ip -n "$U" link set vr master br0 up
ip -n "$R" addr add "$RIP/24" dev u0
ip -n "$R" link set u0 up

ip netns exec "$U" "$PORTOLAN_BIN" serve --listen 192.168.79.254:1296 --store "sqlite:$TMP/portolan.db" \
  >"$TMP/portolan.log" 2>&1 &
PIDS+=($!)
{
  echo "{\"underlay\":[{\"cn_uuid\":\"${UUID[1]}\",\"ip\":\"${HIP[1]}\",\"port\":4789},"
  echo "             {\"cn_uuid\":\"${UUID[2]}\",\"ip\":\"${HIP[2]}\",\"port\":4789}],"
  echo " \"overlay\":[{\"vnet_id\":1,\"ip\":\"$FLIP\",\"mac\":\"$FLMAC\",\"cn_uuid\":\"${UUID[1]}\"},"
  echo "            {\"vnet_id\":1,\"ip\":\"$SKIP\",\"mac\":\"$SKMAC\",\"cn_uuid\":\"${UUID[2]}\"},"
  echo "            {\"vnet_id\":2,\"ip\":\"$VIIP\",\"mac\":\"$VIMAC\",\"cn_uuid\":\"${UUID[1]}\"}"
  for ((k = 1; k <= 2 * N; k++)); do
    echo "           ,{\"vnet_id\":2,\"ip\":\"${DIP[k]}\",\"mac\":\"${DMAC[k]}\",\"cn_uuid\":\"${UUID[2]}\"}"
  done
  echo "]}"
} >"$TMP/map.json"
"$PORTOLAN_BIN" import --store "sqlite:$TMP/portolan.db" "$TMP/map.json" >/dev/null
wait_for 20 ip netns exec "${H[1]}" "$PORTOLAN_BIN" ping -s 192.168.79.254:1296 --timeout 1
for i in 1 2; do
  ip netns exec "${H[i]}" "$FABRIC_BIN" dataplane --underlay "${HIP[i]}" --portolan 192.168.79.254:1296 \
    --cn-uuid "${UUID[i]}" --control "$TMP/h$i.sock" >"$TMP/h$i.log" 2>&1 &
  PIDS+=($!)
done
S1="$TMP/h1.sock" S2="$TMP/h2.sock"
wait_for 20 "$FABRIC_BIN" stats --control "$S1"
wait_for 20 "$FABRIC_BIN" stats --control "$S2"
vnic() { # vnic SOCK NS VNI MAC IP/LEN
  addns "$2"
  "$FABRIC_BIN" vnic add --control "$1" --netns "$2" --name eth0 --vni "$3" --mac "$4" --ip "$5" --mtu 1450 >/dev/null
}
vnic "$S1" "$FL" 1 "$FLMAC" "$FLIP/$FLPFX"
vnic "$S1" "$VI" 2 "$VIMAC" "$VIIP/16"
vnic "$S2" "$SK" 1 "$SKMAC" "$SKIP/$FLPFX"
for ((k = 1; k <= 2 * N; k++)); do
  vnic "$S2" "${DNS[k]}" 2 "${DMAC[k]}" "${DIP[k]}/16"
done
# Warm the victim's path to host B through a destination not measured (10.2.1.<2N> is left
# out of both sets below): the first lookup also opens host A's SVP connection.
wait_for 20 ip netns exec "$VI" ping -n -c1 -W1 "${DIP[2 * N]}"

# first_reply FROM K..: pings each destination once (-c1 -W2); fills LAT (ms) and FAILS
first_reply() {
  local k out t
  LAT=() FAILS=0
  for k in "$@"; do
    if out="$(ip netns exec "$VI" ping -n -c1 -W2 "${DIP[k]}" 2>&1)" &&
      t="$(sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' <<<"$out")" && [ -n "$t" ]; then
      LAT+=("$t")
    else
      FAILS=$((FAILS + 1))
    fi
    sleep "$GAP"
  done
}
pct() { # pct P VALUES...: nearest-rank percentile, n/a if none
  local p=$1
  shift
  [ $# -gt 0 ] || { echo n/a; return; }
  printf '%s\n' "$@" | sort -g | awk -v p="$p" '{ v[NR] = $1 } END { i = int((p * NR + 99) / 100); if (i < 1) i = 1; printf "%.1f", v[i] }'
}

echo "== load average before: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) cores); fabric $FABRIC_BIN" >&2

# --- 1. pending-lookup flood ---------------------------------------------------------------
M=$((N - 1)) # destinations per set (the last one of 2N warmed the path)
base=() flood=()
for ((k = 1; k <= M; k++)); do base+=("$k"); flood+=("$((N + k))"); done
first_reply "${base[@]}"
BASE_P50="$(pct 50 "${LAT[@]-}")" BASE_MAX="$(pct 100 "${LAT[@]-}")" BASE_FAIL=$FAILS
[ ${#LAT[@]} -gt 0 ] || { BASE_P50=n/a BASE_MAX=n/a; }

# The flood lasts FLOOD_SECONDS, or longer if the victim's pings take longer (each is within
# the flood); the cap only bounds the run.
FLOOD_CAP=$((3 * M + FLOOD_SECS + 1))
F_START="$(date +%s%N)"
ip netns exec "$FL" python3 "$TMP/flood.py" eth0 "$FLMAC" "$FLIP" "$FLPFX" "$FLOOD_CAP" "$TMP/flood.out" &
FPID=$!
PIDS+=("$FPID")
sleep "$WARMUP"
first_reply "${flood[@]}"
REST="$(awk -v s="$F_START" -v n="$(date +%s%N)" -v d="$FLOOD_SECS" 'BEGIN { r = d - (n - s) / 1e9; printf "%.2f", (r > 0 ? r : 0) }')"
sleep "$REST"
kill -TERM "$FPID" 2>/dev/null || true
wait "$FPID" 2>/dev/null || true
FLOOD_P50="$(pct 50 "${LAT[@]-}")" FLOOD_MAX="$(pct 100 "${LAT[@]-}")" FLOOD_FAIL=$FAILS
[ ${#LAT[@]} -gt 0 ] || { FLOOD_P50=n/a FLOOD_MAX=n/a; }
read -r F_SENT F_ERRS F_EL <"$TMP/flood.out" || { F_SENT=0 F_ERRS=0 F_EL=1; }
F_PPS="$(awk -v s="$F_SENT" -v e="$F_EL" 'BEGIN { printf "%.0f", s / e }')"
V_FULL="$(counter "$S1" "$VI" pending_table_full)" V_QUOTA="$(counter "$S1" "$VI" pending_quota)"
F_FULL="$(counter "$S1" "$FL" pending_table_full)" F_QUOTA="$(counter "$S1" "$FL" pending_quota)"
LOOKUPS="$(counter "$S1" global vl3_lookups)"
echo "pending-flood: victim first reply (ms) base p50=$BASE_P50 max=$BASE_MAX fail=$BASE_FAIL/$M;" \
  "under flood p50=$FLOOD_P50 max=$FLOOD_MAX fail=$FLOOD_FAIL/$M; flood $F_SENT ARP in ${F_EL}s ($F_PPS/s, $F_ERRS send errors);" \
  "drops victim pending_table_full=$V_FULL pending_quota=$V_QUOTA, flooder pending_table_full=$F_FULL" \
  "pending_quota=$F_QUOTA; host A vl3_lookups=$LOOKUPS"

# --- 2. underlay ARP reflection ----------------------------------------------------------------
A_SENT=n/a A_REPL=n/a A_BYTES=n/a
read -r A_SENT A_REPL A_BYTES < <(ip netns exec "$R" python3 "$TMP/reflect.py" "${HIP[1]}" "$ARP_SECS" \
  "1:$FLIP:10.16.0.200" "2:$VIIP:10.2.0.200") || true
A_UNK="$(counter "$S1" global underlay_arp_unknown_peer)"
A_RATE="$(counter "$S1" global underlay_arp_rate_limited)"
A_ANS="$(counter "$S1" global arp_replied)"
echo "arp-reflection: rogue $RIP sent $A_SENT VXLAN ARP requests in ${ARP_SECS}s, got $A_REPL replies" \
  "($A_BYTES bytes); host A underlay_arp_unknown_peer=$A_UNK underlay_arp_rate_limited=$A_RATE" \
  "arp_replied(all)=$A_ANS"

# --- 3. conntrack flood ---------------------------------------------------------------------
cat >"$TMP/fw.json" <<JSON
{"vms":[{"uuid":"00000000-0000-4000-8000-0000000150f1","owner_uuid":"aaaaaaaa-0000-4000-8000-000000000001",
         "tags":{},"firewall_enabled":true,"ips":[{"vni":1,"ip":"$FLIP"}]},
        {"uuid":"00000000-0000-4000-8000-0000000150f2","owner_uuid":"aaaaaaaa-0000-4000-8000-000000000002",
         "tags":{},"firewall_enabled":true,"ips":[{"vni":2,"ip":"$VIIP"}]}],
 "rules":[]}
JSON
C_P50=n/a C_MAX=n/a C_FAIL=n/a C_PPS=n/a C_VFULL=n/a C_VDEF=n/a C_FFULL=n/a C_FLOWS=n/a C_IDLE=n/a
if "$FABRIC_BIN" fw apply --control "$S1" "$TMP/fw.json" >/dev/null 2>"$TMP/fw.err"; then
  wait_for 10 ip netns exec "$FL" ping -n -c1 -W1 "$SKIP" # resolves the sink before the flood
  ip netns exec "$SK" python3 "$TMP/echo.py" eth0 $((FLOOD_CAP + 5)) >/dev/null 2>&1 &
  PIDS+=($!)
  ip netns exec "${DNS[1]}" python3 "$TMP/idle.py" server 7000 4 "$TMP/go" >/dev/null 2>&1 &
  PIDS+=($!)
  wait_for 5 ip netns exec "${DNS[1]}" bash -c 'ss -ltn | grep -q ":7000 "'
  timeout $((FLOOD_CAP + 20)) ip netns exec "$VI" python3 "$TMP/idle.py" client "${DIP[1]}" 7000 4 \
    "$TMP/ready" "$TMP/go" >"$TMP/idle.out" 2>"$TMP/idle.err" &
  IPID=$!
  PIDS+=("$IPID")
  wait_for 10 test -e "$TMP/ready"
  C_START="$(date +%s%N)"
  ip netns exec "$FL" python3 "$TMP/udpflood.py" "$SKIP" "$FLOOD_CAP" "$TMP/udpflood.out" &
  FPID=$!
  PIDS+=("$FPID")
  sleep "$WARMUP"
  first_reply "${base[@]}"
  REST="$(awk -v s="$C_START" -v n="$(date +%s%N)" -v d="$FLOOD_SECS" 'BEGIN { r = d - (n - s) / 1e9; printf "%.2f", (r > 0 ? r : 0) }')"
  sleep "$REST"
  kill -TERM "$FPID" 2>/dev/null || true
  wait "$FPID" 2>/dev/null || true
  touch "$TMP/go"
  wait "$IPID" 2>/dev/null || true # at most 3 s more (TCP retransmits a few times in that)
  C_IDLE="$(cat "$TMP/idle.out" 2>/dev/null)"
  C_IDLE="${C_IDLE:-0}/4"
  C_P50="$(pct 50 "${LAT[@]-}")" C_MAX="$(pct 100 "${LAT[@]-}")" C_FAIL="$FAILS/$M"
  [ ${#LAT[@]} -gt 0 ] || { C_P50=n/a C_MAX=n/a; }
  read -r C_SENT C_ERRS C_EL <"$TMP/udpflood.out" || { C_SENT=0 C_ERRS=0 C_EL=1; }
  C_PPS="$(awk -v s="$C_SENT" -v e="$C_EL" 'BEGIN { printf "%.0f", s / e }')"
  C_VFULL="$(counter "$S1" "$VI" conntrack_full)" C_VDEF="$(counter "$S1" "$VI" firewall_default)"
  C_FFULL="$(counter "$S1" "$FL" conntrack_full)" C_FLOWS="$(counter "$S1" conntrack flows)"
  echo "conntrack-flood: victim first reply (ms) p50=$C_P50 max=$C_MAX fail=$C_FAIL;" \
    "flood $C_SENT UDP flows in ${C_EL}s ($C_PPS/s, $C_ERRS send errors); victim conntrack_full=$C_VFULL" \
    "firewall_default=$C_VDEF, flooder conntrack_full=$C_FFULL; flows tracked at the end $C_FLOWS;" \
    "idle connections that got data after the flood $C_IDLE"
else
  echo "conntrack-flood: n/a (fw apply failed: $(head -c 200 "$TMP/fw.err"))"
fi

echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
echo "isolation base_p50_ms=$BASE_P50 base_max_ms=$BASE_MAX base_fail=$BASE_FAIL/$M" \
  "flood_p50_ms=$FLOOD_P50 flood_max_ms=$FLOOD_MAX flood_fail=$FLOOD_FAIL/$M flood_pps=$F_PPS" \
  "victim_pending_table_full=$V_FULL victim_pending_quota=$V_QUOTA" \
  "flooder_pending_table_full=$F_FULL flooder_pending_quota=$F_QUOTA" \
  "arp_sent=$A_SENT arp_replies=$A_REPL arp_unknown_peer=$A_UNK arp_rate_limited=$A_RATE" \
  "ct_p50_ms=$C_P50 ct_max_ms=$C_MAX ct_fail=$C_FAIL ct_flood_pps=$C_PPS ct_victim_conntrack_full=$C_VFULL" \
  "ct_victim_firewall_default=$C_VDEF ct_flooder_conntrack_full=$C_FFULL ct_flows=$C_FLOWS ct_idle_ok=$C_IDLE"
