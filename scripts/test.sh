#!/usr/bin/env bash
# The test command (README, .ci/run): installs and starts everything the tests need on a fresh
# machine, then lint, build, every test, and a smoke run of the README's daemon command.
# Prints how long each phase took. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
export SA_CACHE=${SA_CACHE:-$HOME/.cache/storage-agent}

declare -a PHASES=()
phase() { # phase NAME CMD...
  local name=$1; shift
  local start=$SECONDS
  echo "=== phase: $name"
  if "$@"; then
    PHASES+=("$(printf '%-10s %5ds  ok' "$name" $((SECONDS - start)))")
  else
    local rc=$?
    PHASES+=("$(printf '%-10s %5ds  FAILED' "$name" $((SECONDS - start)))")
    summary
    exit $rc
  fi
}
summary() {
  echo "=== phase timings"
  printf '  %s\n' "${PHASES[@]}"
  echo "  total      ${SECONDS}s"
}

smoke() {
  # The README's run command on the embedded default: no config, no Redis.
  local dir; dir=$(mktemp -d)
  local bin=$PWD/target/debug/storage-agent
  (cd "$dir" && exec "$bin" serve >"$dir/out" 2>"$dir/err") &
  local pid=$!
  for _ in $(seq 1 100); do grep -q '^ready' "$dir/out" 2>/dev/null && break; sleep 0.1; done
  grep -q '^ready' "$dir/out" || { cat "$dir/err"; return 1; }
  curl -fsS http://127.0.0.1:6022/status | grep -q '"status":"ok"'
  curl -fsS http://127.0.0.1:16023/readyz >/dev/null
  test -d "$dir/data/local" && test -f "$dir/state/secrets.toml"
  kill -TERM $pid
  wait $pid
  rm -rf "$dir"
}

install() {
  # `cargo install --path .` (README): the installed binary runs and accepts the embedded
  # default. The debug profile and this target dir, so it reuses what the build phase compiled.
  local root; root=$(mktemp -d)
  CARGO_TARGET_DIR=$PWD/target cargo install --quiet --locked --debug --path . --root "$root"
  "$root/bin/storage-agent" --version
  (cd "$root" && bin/storage-agent config check)
  rm -rf "$root"
}

phase packages  scripts/testenv.sh packages
phase docker    scripts/testenv.sh docker
phase image     scripts/testenv.sh base-image
phase dufs      scripts/testenv.sh dufs
phase bai-venv  scripts/testenv.sh bai-venv
phase azurite   scripts/testenv.sh azurite
phase grafana   scripts/testenv.sh grafana-schema
phase manager   scripts/testenv.sh manager
phase vm        scripts/testenv.sh vm
phase ceph      scripts/testenv.sh ceph
phase fmt       cargo fmt --all -- --check
phase clippy    cargo clippy --all-targets --locked -- -D warnings
phase build     cargo build --all-targets --locked
# The real manager's cluster (PostgreSQL, etcd, Redis, manager, both proxies) runs alone in its
# own phase: on 2 cores it would starve the other tests' deadlines, and its time shows apart.
phase test      cargo test --locked -- --test-threads="${TEST_THREADS:-4}" --skip backendai_manager --skip cephfs
phase mgr-e2e   cargo test --locked --test e2e backendai_manager
# Each CephFS test boots its own single-node cluster (mon, mgr, OSD, MDS, ceph-fuse): they run
# apart, one at a time, so their clusters never compete for the 2 cores.
phase cephfs    cargo test --locked --test e2e cephfs -- --test-threads=1
phase bench     ./bench/run.sh --smoke
# Two nodes under mixed load while every fault of the soak happens once (about 5 minutes).
phase soak      python3 bench/soak/soak.py --smoke --sa-bin target/debug/storage-agent
phase smoke     smoke
phase install   install
summary
