# shellcheck shell=bash
# Simulated hosts for the cluster benchmarks (provision.sh, revocation.sh), sourced after
# netns-lib.sh, as tests/util/cluster.rs builds them: an underlay bridge namespace $U
# (192.168.78.254/24) and, for each host i of H/HIP (index 0 unused), a namespace on the bridge
# plus a holder process with a private mount namespace and its own /run (so each agent has its
# own /run/netns). Sets HOLDER[i] and appends to HOLDERS (kill those last).
#
# cluster_init PFX N sets the globals (U, H, HIP, HOLDER, HOLDERS, API, OP) for N hosts and the
# EXIT trap; api/server_running/vm_running talk to the head's https API as the operator whose
# credentials `fabric cert admin --out "$OP"` wrote.

cluster_init() { # cluster_init PFX N
  local pfx=$1 n=$2 i
  U="$pfx-u"
  H=("")
  HIP=("")
  HOLDER=("")
  for ((i = 1; i <= n; i++)); do
    H+=("$pfx-h$i")
    HIP+=("192.168.78.$i")
    HOLDER+=("")
  done
  HOLDERS=() # killed after everything else (netns-lib's cleanup stops PIDS first)
  API="https://192.168.78.1:8080"
  OP="$TMP/operator" # the operator's ca.pem, cert.pem, key.pem (`fabric cert admin`)
  trap 'trap "" PIPE; cleanup; kill -KILL "${HOLDERS[@]}" 2>/dev/null; rm -rf "$TMP"' EXIT
}

api() { # api METHOD PATH [JSON]: the control plane's answer to the operator (fails on HTTP errors)
  local args=(-sS --fail-with-body --cacert "$OP/ca.pem" --cert "$OP/cert.pem" --key "$OP/key.pem"
    -X "$1" "$API$2")
  [ $# -ge 3 ] && args+=(-H 'Content-Type: application/json' -d "$3")
  ip netns exec "$U" curl "${args[@]}"
}

server_running() { [ "$(api GET "/servers/$1" | jq -r .status)" = running ]; }
vm_running() { [ "$(api GET "/vms/$1" | jq -r .state)" = running ]; }

now_ms() { local t="${EPOCHREALTIME/./}"; echo $((t / 1000)); }

cluster_underlay() {
  addns "$U"
  ip -n "$U" link add br0 address 02:00:c0:a8:4e:fe type bridge
  ip -n "$U" addr add 192.168.78.254/24 dev br0
  ip -n "$U" link set br0 up
  local i
  for ((i = 1; i < ${#H[@]}; i++)); do
    addns "${H[i]}"
    ip -n "$U" link add "vh$i" type veth peer name u0 netns "${H[i]}"
    ip -n "$U" link set "vh$i" master br0 up
    ip -n "${H[i]}" addr add "${HIP[i]}/24" dev u0
    ip -n "${H[i]}" link set u0 up
    mkdir -p "$TMP/holder$i"
    # The holder: the host's network namespace, a private mount namespace, its own /run.
    nsenter --net="/run/netns/${H[i]}" -- unshare --mount --propagation private -- \
      sh -c "mount -t tmpfs -o mode=0755 fabric-host-run /run && mkdir -p /run/netns && touch $TMP/holder$i/ready && exec sleep infinity" &
    HOLDER[i]=$!
    HOLDERS+=($!)
    disown "$!" # no "Killed" line at exit
    wait_for 10 test -e "$TMP/holder$i/ready"
  done
}

in_host() { # in_host I CMD...: CMD inside host I (network + mount namespace)
  local i=$1
  shift
  nsenter --target "${HOLDER[i]}" --net --mount -- "$@"
}
