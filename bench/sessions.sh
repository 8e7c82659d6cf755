#!/usr/bin/env bash
# SFTP sessions: time from CreateSession to the first successful sftp login (image cached;
# target p50 < 1.5 s), and throughput of a 1 GiB `sftp put` through a session container vs the
# host's own sshd on loopback (target >= 0.9x). Needs Docker and the base image
# (scripts/testenv.sh docker base-image).
source "$(dirname "$0")/lib.sh"
W=$(mktemp -d /var/tmp/sa-bench-sessions.XXXX)
SSHD_PID=
cleanup() {
  stop_daemon "${DAEMON_PID:-0}"
  [ -n "$SSHD_PID" ] && kill "$SSHD_PID" 2>/dev/null
  docker ps -aq --filter "label=ai.backend.storage-agent.node=bench-$(basename "$W")-$$" | xargs -r docker rm -f >/dev/null
  rm -rf "$W"
}
trap cleanup EXIT
lo=$((33000 + RANDOM % 500))
start_daemon "$W" "$(agent_toml "$lo" $((lo + 50)))"
user=$(cat /proc/sys/kernel/random/uuid)
vfid=$(new_vfolder "$user")
ssh-keygen -q -t ed25519 -N '' -f "$W/key"
N=${N:-20}
"$BENCH_BIN" session-latency --rpc "$RPC" --secret "$RPC_SECRET" --volume vol1 --vfid "$vfid" \
  --user "$user" --pubkey "$W/key.pub" --key "$W/key" --n "$N"

# Throughput: one session, 1 GiB put; then the host's sshd on loopback, same file, same disk.
head -c $((1 << 30)) /dev/urandom >"$W/src.bin"; cat "$W/src.bin" >/dev/null
out=$("$BENCH_BIN" create --rpc "$RPC" --secret "$RPC_SECRET" --volume vol1 --vfid "$vfid" \
  --user "$user" --pubkey "$W/key.pub")
SOPTS=(-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR -i "$W/key")
sess_port=$(echo "$out" | sed -nE 's/.*port=([0-9]+).*/\1/p')
t=$(now); echo "put $W/src.bin data/src.bin" | sftp "${SOPTS[@]}" -P "$sess_port" -b - work@127.0.0.1 >/dev/null; SESS=$(elapsed "$t")

# The host's sshd, as root, into a directory on the same filesystem.
mkdir -p "$W/hostsftp"
ssh-keygen -q -t ed25519 -N '' -f "$W/hostkey"
cp "$W/key.pub" "$W/authorized_keys"
hport=$((lo + 100))
cat >"$W/sshd_config" <<CFG
Port $hport
ListenAddress 127.0.0.1
HostKey $W/hostkey
PidFile $W/sshd.pid
PermitRootLogin prohibit-password
AuthorizedKeysFile $W/authorized_keys
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
CFG
mkdir -p /run/sshd
/usr/sbin/sshd -D -f "$W/sshd_config" & SSHD_PID=$!
sleep 0.5
t=$(now); echo "put $W/src.bin $W/hostsftp/src.bin" | sftp "${SOPTS[@]}" -P "$hport" -b - root@127.0.0.1 >/dev/null; HOST=$(elapsed "$t")
echo "sftp put 1 GiB: session container $(mbps $((1 << 30)) "$SESS") MB/s | host sshd $(mbps $((1 << 30)) "$HOST") MB/s (x$(ratio "$HOST" "$SESS"))"
