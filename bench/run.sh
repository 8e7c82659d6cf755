#!/usr/bin/env bash
# One command for every benchmark: storage-agent against its peers (the Backend.AI Python
# storage proxy, @tus/server, nginx, the host's sshd) and ceilings (dd, raw syscalls), on
# loopback. Builds the release binaries, installs the peers (scripts/testenv.sh peers), runs
# bench/bench.py, and writes bench/RESULTS.md. Run as root after scripts/testenv.sh all.
#
#   ./bench/run.sh            the full run (3 rounds, 1 GiB transfers, 100k files; < 30 min)
#   ./bench/run.sh --smoke    every scenario once at tiny sizes with debug binaries (CI): keeps
#                             the script working; its tables go to bench/results/
#   ./bench/run.sh --soak [--minutes 60]
#                             the soak under faults (bench/soak/soak.py): bench/SOAK.md and
#                             bench/SOAK.svg; scripts/test.sh runs its 3-minute smoke
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--soak" ]; then
  shift
  cargo build --release --locked --bin storage-agent
  exec python3 bench/soak/soak.py "$@"
fi
if [ "${1:-}" = "--smoke" ]; then
  cargo build --locked --bin storage-agent --example bench
  bins=(--sa-bin target/debug/storage-agent --bench-bin target/debug/examples/bench)
else
  cargo build --release --locked --bin storage-agent --example bench
  bins=()
fi
scripts/testenv.sh peers
python3 bench/bench.py "${bins[@]}" "$@"
if [ "${1:-}" != "--smoke" ]; then
  # The cross-node limiter has no peer: its own numbers, appended to the results.
  { echo; echo "## Cross-node admission (bench/admission.sh, same run)"; echo; echo '```';
    bash bench/admission.sh 2>&1; echo '```'; } >> bench/RESULTS.md
fi
