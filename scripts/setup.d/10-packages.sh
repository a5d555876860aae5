# shellcheck shell=bash
# Tools the network-namespace tests (tests/netns_*.rs) and benches/e2e.sh run: ip and bridge
# (iproute2), ping (iputils-ping), iperf3 and ethtool. Sourced by scripts/test.sh; as root it
# apt-installs whichever are missing. Without root it only says what is missing (the netns
# tests then skip, or fail under CI=true).
fabric_netns_packages() {
  local missing=() pair cmd pkg
  for pair in ip:iproute2 bridge:iproute2 ping:iputils-ping iperf3:iperf3 ethtool:ethtool; do
    cmd="${pair%%:*}"
    pkg="${pair#*:}"
    if ! command -v "$cmd" >/dev/null 2>&1; then
      case " ${missing[*]-} " in
        *" $pkg "*) ;;
        *) missing+=("$pkg") ;;
      esac
    fi
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    echo "10-packages: iproute2, iputils-ping, iperf3, ethtool present"
    return 0
  fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "10-packages: not root; missing ${missing[*]} (netns tests will skip)"
    return 0
  fi
  echo "10-packages: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
fabric_netns_packages
