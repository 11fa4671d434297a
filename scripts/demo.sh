#!/usr/bin/env bash
# The main job: run Keel's demo on the embedded sled store.
# Today this is the minimal saga example (engine core and saga). The AWS demo against moto's
# server (Greengrass core, fleet, SIGKILL and restart) replaces it when the step library and
# the worker land; see the open issues.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "demo: cargo is required (https://rustup.rs)" >&2; exit 1; }
data=$(mktemp -d "${TMPDIR:-/tmp}/keel-demo.XXXXXX")
trap 'rm -rf "$data"' EXIT
echo "== first run: one trip completes, one is compensated"
cargo run --quiet --example minimal_saga -- "$data"
echo "== second run on the same data directory: answered from the journal, no step runs again"
cargo run --quiet --example minimal_saga -- "$data"
