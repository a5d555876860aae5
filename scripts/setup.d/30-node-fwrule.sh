# shellcheck shell=bash
# Node.js and the pinned npm package `fwrule` (tests/node/package-lock.json): the reference
# implementation that tests/fwrule_differential.rs compares fabric's fwrule parser against.
# Sourced by scripts/test.sh (as root on a clean machine, CI=true in CI). Under CI a failure here
# fails the run; elsewhere it only warns, and the differential test then says why it skipped.

_fabric_node_fwrule() {
  local dir="${FABRIC_REPO:-$PWD}/tests/node"
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
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) || return 1
  echo "fwrule $(node "$dir/oracle.js" --version) ready in $dir"
}

if [ "${CI:-}" = "true" ]; then
  _fabric_node_fwrule
else
  _fabric_node_fwrule || echo "warning: fwrule oracle not set up; tests/fwrule_differential.rs will skip"
fi
unset -f _fabric_node_fwrule
