#!/usr/bin/env bash
# The main job: Keel's demo on the embedded sled store against a local AWS emulator.
# Installs moto's server (from PyPI) when it is missing, builds the `keel` worker and the demo
# driver, then: starts moto and the fault proxy (lag, throttling, lost responses), starts
# `keel worker`, provisions a Greengrass core with 5 client devices and a fleet of 20 devices,
# SIGKILLs the worker midway, restarts it, shows every run finishing once, runs a core whose
# deployment fails late and is compensated, prints the history and stats tables, and checks
# through the AWS API that every resource exists exactly once and the failed core left
# nothing. Extra arguments go to the driver (e.g. --clients 2 --fleet 5; see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "demo: cargo is required (https://rustup.rs)" >&2; exit 1; }
python=${KEEL_MOTO_PYTHON:-python3}
command -v "$python" >/dev/null || { echo "demo: $python is required (Python 3 with pip)" >&2; exit 1; }
if ! "$python" -c 'import moto.server, flask, flask_cors' 2>/dev/null; then
  echo "demo: installing moto's server from PyPI" >&2
  "$python" -m pip install --quiet 'moto[server]==5.2.1'
fi
echo "demo: building keel and the demo driver" >&2
cargo build --quiet -p keel-worker -p keel-testkit --bins
exec target/debug/keel-demo --keel target/debug/keel "$@"
