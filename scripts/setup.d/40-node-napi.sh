# shellcheck shell=bash
# Node.js and Triton's NAPI client (npm `sdc-clients`, pinned in tests/node-napi/package-lock.json)
# for tests/control_napi_client.rs. Sourced by scripts/test.sh (as root on a clean machine, CI=true
# in CI). Under CI a failure here fails the run; elsewhere it only warns, and the test says why it
# skipped.

_fabric_node_napi() {
  local dir="${FABRIC_REPO:-$PWD}/tests/node-napi"
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
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) || return 1
  echo "sdc-clients $(node "$dir/napi.js" --version) ready in $dir"
}

if [ "${CI:-}" = "true" ]; then
  _fabric_node_napi
else
  _fabric_node_napi || echo "warning: sdc-clients not set up; tests/control_napi_client.rs will skip"
fi
unset -f _fabric_node_napi
