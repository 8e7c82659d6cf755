#!/usr/bin/env bash
# Builds release binaries and runs every benchmark; results go to bench/results/<timestamp>.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin storage-agent --example bench
mkdir -p bench/results
out=bench/results/$(date -u +%Y%m%dT%H%M%SZ).txt
{
  echo "# $(date -u) $(uname -r) $(nproc) cores"
  for b in usage transfer sessions admission; do
    echo "## $b"
    bash "bench/$b.sh"
  done
} 2>&1 | tee "$out"
