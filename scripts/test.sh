#!/usr/bin/env bash
# Runs every test of the workspace, in debug builds, on a fresh machine, and ends with one
# summary line over all test binaries ("tests: N passed, N failed").
# Needs cargo and Python 3 with pip; installs moto's server (the AWS emulator the AWS tests
# run against, from PyPI) when it is missing. The tests start and stop moto themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "test: cargo is required (https://rustup.rs)" >&2; exit 1; }
python=${KEEL_MOTO_PYTHON:-python3}
command -v "$python" >/dev/null || { echo "test: $python is required (Python 3 with pip)" >&2; exit 1; }
if ! "$python" -c 'import moto.server, flask, flask_cors' 2>/dev/null; then
  echo "test: installing moto's server from PyPI" >&2
  "$python" -m pip install --quiet 'moto[server]==5.2.1'
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
status=0
{ cargo test --workspace --all-targets && cargo test --workspace --doc; } 2>&1 | tee "$out" || status=$?
passed=$(grep -Eo '[0-9]+ passed' "$out" | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$out" | awk '{s+=$1} END {print s+0}')
echo "tests: ${passed} passed, ${failed} failed"
exit "$status"
