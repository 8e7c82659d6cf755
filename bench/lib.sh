#!/usr/bin/env bash
# Shared helpers for the benchmarks: start the release daemon on free ports, call its APIs,
# read its peak RSS, time things. Source it; needs root (drop_caches, mounts, Docker).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SA_BIN=${SA_BIN:-$ROOT/target/release/storage-agent}
BENCH_BIN=${BENCH_BIN:-$ROOT/target/release/examples/bench}
MANAGER_SECRET=bench-manager-secret-0123456789
RPC_SECRET=bench-rpc-secret-0123456789
export SA_CACHE=${SA_CACHE:-$HOME/.cache/storage-agent}

now() { date +%s.%N; }
elapsed() { echo "$(now) - $1" | bc -l; }
mbps() { echo "scale=1; $1 / $2 / 1000000" | bc -l; }
ratio() { echo "scale=3; $1 / $2" | bc -l; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# start_daemon DIR [extra TOML]: writes DIR/storage-agent.toml, starts the daemon, sets
# MANAGER, CLIENT, INTERNAL, RPC (host:port) and DAEMON_PID.
start_daemon() {
  local dir=$1 extra=${2:-}
  mkdir -p "$dir/vol1" "$dir/state"
  cat >"$dir/storage-agent.toml" <<TOML
[storage-proxy]
node-id = "bench-$(basename "$dir")-$$"
secret = "bench-jwt-secret-0123456789"
session-expire = "1d"
max-upload-size = "100g"
[storage-agent]
state-dir = "$dir/state"
log-level = "warn"
[api.client]
service-addr = "127.0.0.1:0"
[api.manager]
service-addr = "127.0.0.1:0"
internal-addr = "127.0.0.1:0"
secret = "$MANAGER_SECRET"
[volume.vol1]
backend = "vfs"
path = "$dir/vol1"
$extra
TOML
  "$SA_BIN" serve --config "$dir/storage-agent.toml" >"$dir/out" 2>"$dir/err" &
  DAEMON_PID=$!
  for _ in $(seq 1 200); do grep -q '^ready' "$dir/out" 2>/dev/null && break; sleep 0.05; done
  grep -q '^ready' "$dir/out" || { cat "$dir/err" >&2; return 1; }
  MANAGER=$(awk '/api=manager/{sub("addr=","",$3); print $3}' "$dir/out")
  CLIENT=$(awk '/api=client/{sub("addr=","",$3); print $3}' "$dir/out")
  INTERNAL=$(awk '/api=internal/{sub("addr=","",$3); print $3}' "$dir/out")
  RPC=$(awk '/api=rpc/{sub("addr=","",$3); print $3}' "$dir/out")
}

# agent_toml LO HI: the [agent] and [agent.rpc] sections for a session-hosting daemon whose
# containers publish on 127.0.0.1:LO-HI.
agent_toml() {
  cat <<TOML
[agent]
enabled = true
base-image = "${BASE_IMAGE:-localbase:bookworm-slim}"
public-addr = "127.0.0.1"
port-range = "$1-$2"
kernel-uid = 2301
kernel-gid = 2301
[agent.rpc]
service-addr = "127.0.0.1:0"
secret = "$RPC_SECRET"
TOML
}

stop_daemon() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# mgr METHOD PATH JSON
mgr() {
  curl -fsS -X "$1" -H "X-BackendAI-Storage-Auth-Token: $MANAGER_SECRET" \
    -H 'Content-Type: application/json' -d "$3" "http://$MANAGER$2"
}

new_vfolder() { # prints the vfid; $1 = user uuid (optional)
  local user=${1:-$(cat /proc/sys/kernel/random/uuid)}
  local vfid="user:$user/$(cat /proc/sys/kernel/random/uuid | tr -d -)"
  mgr POST /folder/create "{\"volume\":\"vol1\",\"vfid\":\"$vfid\"}" >/dev/null
  echo "$vfid"
}

vfolder_path() { # DIR VFID
  local qs=${2#*:}; qs=${qs%%/*}; qs=${qs//-/}
  local f=${2##*/}; f=${f//-/}
  echo "$1/vol1/$qs/${f:0:2}/${f:2:2}/${f:4}"
}

token() { mgr POST "$1" "$2" | python3 -c 'import sys,json; print(json.load(sys.stdin)["token"])'; }

peak_reset() { echo 5 > "/proc/$1/clear_refs"; }
peak_kib() { awk '/VmHWM/{print $2}' "/proc/$1/status"; }
