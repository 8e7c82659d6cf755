#!/usr/bin/env bash
# The cross-node admission check: the Lua check-and-add over lease-scored sets on a real
# redis-server, driven from 3 simulated nodes (own connections each); admissions/s and p99.
# Then the whole refusal path end to end: CreateSession calls for a user at the limit on 3 real
# daemons sharing that Redis (needs Docker for the one session that fills the limit).
source "$(dirname "$0")/lib.sh"
W=$(mktemp -d /var/tmp/sa-bench-admission.XXXX)
REDIS_PID=
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do stop_daemon "$p"; done
  [ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null
  for n in a b c; do
    docker ps -aq --filter "label=ai.backend.storage-agent.node=bench-$n-$$" | xargs -r docker rm -f >/dev/null
  done
  rm -rf "$W"
}
trap cleanup EXIT
RPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no >/dev/null & REDIS_PID=$!
for _ in $(seq 1 50); do redis-cli -p "$RPORT" ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
"$BENCH_BIN" admission --redis "127.0.0.1:$RPORT" --nodes 3 --users 200 --ops "${OPS:-30000}" --concurrency "${CONC:-24}"

user=$(cat /proc/sys/kernel/random/uuid)
ssh-keygen -q -t ed25519 -N '' -f "$W/key"
rpcs=(); vfids=()
i=0
for n in a b c; do
  lo=$((34000 + RANDOM % 500 + i * 600)); i=$((i + 1))
  mkdir -p "$W/$n"
  start_daemon "$W/$n" "$(agent_toml "$lo" $((lo + 20)))
[redis]
addr = \"127.0.0.1:$RPORT\""
  PIDS+=("$DAEMON_PID"); rpcs+=("$RPC"); vfids+=("$(new_vfolder "$user")")
done
# Fill the user's limit (1) with one session on the first node; every later call is refused.
"$BENCH_BIN" create --rpc "${rpcs[0]}" --secret "$RPC_SECRET" --volume vol1 --vfid "${vfids[0]}" \
  --user "$user" --pubkey "$W/key.pub" >/dev/null
"$BENCH_BIN" refusals --rpc "$(IFS=,; echo "${rpcs[*]}")" --secret "$RPC_SECRET" --volume vol1 \
  --vfids "$(IFS=,; echo "${vfids[*]}")" --user "$user" --pubkey "$W/key.pub" --n "${REFUSALS:-1500}"
