#!/usr/bin/env bash
# The whole test suite. Installs and starts what the tests need first (when root), then runs
# every test. Each file in scripts/setup.d/ prepares one component's needs (packages, services,
# Node peers) and exports what the tests read.
set -euo pipefail
cd "$(dirname "$0")/.."
export FABRIC_REPO="$PWD"
for f in scripts/setup.d/*.sh; do
  [ -e "$f" ] || continue
  echo "== setup: $f"
  # shellcheck disable=SC1090
  source "$f"
done
# Prints cargo test's output as it comes and, at the end, the wall time of each test binary
# (from its "Running" line to the next), slowest first.
timed() {
  local line name="" t0=0 now
  local -a rows=()
  while IFS= read -r line; do
    printf '%s\n' "$line"
    if [[ $line =~ ^[[:space:]]+(Running|Doc-tests)[[:space:]]+(.*)$ ]]; then
      now=${EPOCHREALTIME/./}
      [ -n "$name" ] && rows+=("$(((now - t0) / 1000)) $name")
      # "unittests src/lib.rs (target/debug/deps/fabric-0123abcd)" -> "unittests src/lib.rs (fabric)"
      name=${BASH_REMATCH[2]}
      name=${name/target\/debug\/deps\//}
      [[ $name =~ ^(.*)-[0-9a-f]+\)$ ]] && name="${BASH_REMATCH[1]})"
      t0=$now
    fi
  done
  now=${EPOCHREALTIME/./}
  [ -n "$name" ] && rows+=("$(((now - t0) / 1000)) $name")
  [ "${#rows[@]}" -gt 0 ] || return 0
  echo "== time per test binary (ms)"
  printf '%s\n' "${rows[@]}" | sort -rn | while read -r ms what; do
    printf '%8d  %s\n' "$ms" "$what"
  done
}
echo "== cargo test (workspace): build"
cargo test --workspace --all-targets --no-run
echo "== cargo test (workspace)"
set +e
cargo test --workspace --all-targets --no-fail-fast 2>&1 | timed
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -ne 0 ]; then
  echo "== cargo test failed (exit $rc)"
  exit "$rc"
fi
echo "== fuzz targets compile"
if [ -f fuzz/Cargo.toml ]; then
  cargo check --manifest-path fuzz/Cargo.toml
fi
echo "== all tests passed"
