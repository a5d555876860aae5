# shellcheck shell=bash
# Node.js and the pinned npm packages the tests use as reference peers:
# - tests/node: Joyent's `fwrule` (package-lock.json), the oracle tests/fwrule_differential.rs
#   compares fabric's fwrule parser against;
# - tests/node-napi: Triton's NAPI client (`sdc-clients`), for tests/control_napi_client.rs.
# Sourced by scripts/test.sh (as root on a clean machine, CI=true in CI). Under CI a failure here
# fails the run; elsewhere it only warns, and the tests concerned say why they skip.

_fabric_node() {
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
      echo "installing nodejs and npm with apt"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null || return 1
    else
      echo "node/npm are missing and cannot be installed here (needs root and apt-get)"
      return 1
    fi
  fi
  echo "node $(node --version), npm $(npm --version)"
}

# _fabric_npm_ci DIR SCRIPT NAME: install DIR's pinned packages, then ask SCRIPT for its version.
_fabric_npm_ci() {
  (cd "$1" && npm ci --no-audit --no-fund --loglevel=error) || return 1
  echo "$3 $(node "$1/$2" --version) ready in $1"
}

_fabric_node_all() {
  local repo="${FABRIC_REPO:-$PWD}"
  _fabric_node || return 1
  _fabric_npm_ci "$repo/tests/node" oracle.js fwrule || return 1
  _fabric_npm_ci "$repo/tests/node-napi" napi.js sdc-clients || return 1
}

if [ "${CI:-}" = "true" ]; then
  _fabric_node_all
else
  _fabric_node_all || echo "warning: Node reference peers not set up; tests/fwrule_differential.rs and tests/control_napi_client.rs will skip"
fi
unset -f _fabric_node _fabric_npm_ci _fabric_node_all
