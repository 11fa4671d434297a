#!/usr/bin/env bash
# Runs every test of the workspace, in debug builds, on a fresh machine, and ends with one
# summary line over all test binaries ("tests: N passed, N failed").
# Needs cargo and Python 3 with pip; installs moto's server (the AWS emulator the AWS tests
# run against, from PyPI) when it is missing. The tests start and stop moto themselves.
# Starts a throwaway PostgreSQL cluster (Debian's postgresql, installed when missing) for the
# tests of the PostgreSQL store, and stops it at the end; KEEL_TEST_POSTGRES_URL names an
# existing database to use instead. Installs Debian's chromium and chromium-driver when missing,
# for the web console's browser tests, and Debian's openssh-server for the SFTP tests.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "test: cargo is required (https://rustup.rs)" >&2; exit 1; }
python=${KEEL_MOTO_PYTHON:-python3}
command -v "$python" >/dev/null || { echo "test: $python is required (Python 3 with pip)" >&2; exit 1; }
if ! "$python" -c 'import moto.server, flask, flask_cors' 2>/dev/null; then
  echo "test: installing moto's server from PyPI" >&2
  "$python" -m pip install --quiet 'moto[server]==5.2.1'
fi
# The console's browser tests drive Debian's chromium through chromedriver.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "test: chromium and chromedriver are missing and only root can install them (apt-get install chromium chromium-driver)" >&2
    exit 1
  fi
  echo "test: installing chromium and chromium-driver (Debian) for the console's browser tests" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } >&2
fi
# The SFTP tests start Debian's OpenSSH server on a loopback port with throwaway keys.
if [ ! -x /usr/sbin/sshd ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "test: sshd is missing and only root can install it (apt-get install openssh-server)" >&2
    exit 1
  fi
  echo "test: installing openssh-server (Debian) for the SFTP tests" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server; } >&2
fi
# tests/store_syncs.rs counts the store's syncs with strace.
if ! command -v strace >/dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "test: strace is missing and only root can install it (apt-get install strace)" >&2
    exit 1
  fi
  echo "test: installing strace (Debian) for the store's sync count" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends strace; } >&2
fi
out=$(mktemp)
pg_dir=""
cleanup() {
  rm -f "$out" "$out.aws"
  if [ -n "$pg_dir" ]; then scripts/postgres-stop "$pg_dir/cluster"; rm -rf "$pg_dir"; fi
}
trap cleanup EXIT
if [ -z "${KEEL_TEST_POSTGRES_URL:-}" ]; then
  pg_dir=$(mktemp -d /tmp/keel-test-pg.XXXXXX)
  chmod 0755 "$pg_dir" # the cluster's unprivileged owner passes through it
  KEEL_TEST_POSTGRES_URL=$(scripts/postgres-start "$pg_dir/cluster") \
    || { echo "test: PostgreSQL could not be started for the tests (see above)" >&2; exit 1; }
  export KEEL_TEST_POSTGRES_URL
fi
# Two lanes at once: the AWS-heavy packages' test binaries (keel-steps, keel-workflows,
# keel-testkit) beside
# all the others. Most tests wait on moto, timers, fsync or child processes, so one lane per
# core halves the wall time. Each lane selects with --workspace and --test, so features unify
# as in one build: nothing is built twice. The build comes first, alone.
lanes=$(cargo metadata --no-deps --format-version 1 | "$python" -c '
import json, sys
aws = {"keel-steps", "keel-workflows", "keel-testkit"}
# Moved to even the lanes (measured: about 11.5 min of tests each): the EC2 steps (2.5 min,
# mostly their crash test) run in the other lane, and the demo (25 s, moto) in the AWS lane.
other_lane = {"ec2_steps"}
aws_lane = {"demo"}
tests = [(p["name"], t["name"]) for p in json.load(sys.stdin)["packages"]
         for t in p["targets"] if "test" in t["kind"]]
b = sorted({t for p, t in tests if (p in aws and t not in other_lane) or t in aws_lane})
a = sorted({t for p, t in tests if t not in b})
print(" ".join("--test " + t for t in a))
print(" ".join("--test " + t for t in b))')
lane_a=$(sed -n 1p <<<"$lanes")
lane_b=$(sed -n 2p <<<"$lanes")
lane_b_out="$out.aws"
status=0
cargo test --workspace --all-targets --no-run 2>&1 | tee "$out" || status=$?
if [ "$status" = 0 ]; then
  # shellcheck disable=SC2086 # the lanes are lists of arguments
  cargo test --workspace --no-fail-fast $lane_b >"$lane_b_out" 2>&1 &
  lane_b_pid=$!
  # shellcheck disable=SC2086
  cargo test --workspace --no-fail-fast --lib --bins --examples $lane_a 2>&1 | tee -a "$out" || status=$?
  wait "$lane_b_pid" || status=$?
  echo "test: the AWS lane (keel-steps, keel-workflows, keel-testkit), run beside the above:"
  tee -a "$out" <"$lane_b_out"
  cargo test --workspace --doc 2>&1 | tee -a "$out" || status=$?
fi
passed=$(grep -Eo '[0-9]+ passed' "$out" | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$out" | awk '{s+=$1} END {print s+0}')
echo "tests: ${passed} passed, ${failed} failed"
exit "$status"
