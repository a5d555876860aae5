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
echo "== cargo test (workspace)"
cargo test --workspace --all-targets --no-fail-fast
echo "== fuzz targets compile"
if [ -f fuzz/Cargo.toml ]; then
  cargo check --manifest-path fuzz/Cargo.toml
fi
echo "== all tests passed"
