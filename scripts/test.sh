#!/usr/bin/env bash
# Runs every test of the workspace, in debug builds, on a fresh machine, and ends with one
# summary line over all test binaries ("tests: N passed, N failed").
# Needs only cargo today; the AWS tests (moto's server from PyPI) add their install step here.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "test: cargo is required (https://rustup.rs)" >&2; exit 1; }
out=$(mktemp)
trap 'rm -f "$out"' EXIT
status=0
{ cargo test --workspace --all-targets && cargo test --workspace --doc; } 2>&1 | tee "$out" || status=$?
passed=$(grep -Eo '[0-9]+ passed' "$out" | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$out" | awk '{s+=$1} END {print s+0}')
echo "tests: ${passed} passed, ${failed} failed"
exit "$status"
