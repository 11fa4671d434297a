#!/usr/bin/env bash
# Runs every test of the workspace, in debug builds, on a fresh machine.
# Needs only cargo today; the AWS tests (moto's server from PyPI) add their install step here.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "test: cargo is required (https://rustup.rs)" >&2; exit 1; }
cargo test --workspace --all-targets
cargo test --workspace --doc
