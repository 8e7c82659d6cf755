#!/usr/bin/env bash
# Upload: 1 GiB in one PATCH and in 16 MiB PATCHes vs `dd ... conv=fsync` on the same disk.
# Download: 1 GiB vs nginx with sendfile on loopback. Peak RSS of the daemon for 10 GiB each
# way (VmHWM). Targets: upload >= 0.9x dd, download >= 0.95x nginx, RSS < 64 MiB.
source "$(dirname "$0")/lib.sh"
W=$(mktemp -d /var/tmp/sa-bench-transfer.XXXX)
NGINX_PID=
trap 'stop_daemon ${DAEMON_PID:-0}; [ -n "$NGINX_PID" ] && kill $NGINX_PID 2>/dev/null; rm -rf "$W"' EXIT
start_daemon "$W"
SIZE=$((1 << 30))
src=$W/src.bin
head -c $SIZE /dev/urandom >"$src"
cat "$src" >/dev/null   # in the page cache: the sender is not the bottleneck
RUNS=${RUNS:-3}

vfid=$(new_vfolder)
dst=$(vfolder_path "$W" "$vfid")
dd_runs=(); one_runs=(); chunk_runs=()
for r in $(seq 1 $RUNS); do
  rm -f "$dst/dd.bin"; sync
  t=$(now); dd if="$src" of="$dst/dd.bin" bs=16M conv=fsync status=none; s=$(elapsed "$t")
  dd_runs+=("$(mbps $SIZE "$s")")
  for mode in one chunk; do
    chunk=0; [ $mode = chunk ] && chunk=$((16 << 20))
    rm -f "$dst/up.bin"; sync
    tok=$(token /folder/file/upload "{\"volume\":\"vol1\",\"vfid\":\"$vfid\",\"relpath\":\"up.bin\",\"size\":$SIZE}")
    out=$("$BENCH_BIN" upload --url "http://$CLIENT/upload?token=$tok" --file "$src" --chunk $chunk)
    v=$(echo "$out" | sed -E 's/.*MBps=([0-9.]+).*/\1/')
    if [ $mode = one ]; then one_runs+=("$v"); else chunk_runs+=("$v"); fi
  done
  cmp -s "$src" "$dst/up.bin" || { echo "upload corrupted" >&2; exit 1; }
done
DD=$(printf '%s\n' "${dd_runs[@]}" | median)
ONE=$(printf '%s\n' "${one_runs[@]}" | median)
CHUNK=$(printf '%s\n' "${chunk_runs[@]}" | median)
echo "upload 1 GiB: dd conv=fsync ${DD} MB/s | one PATCH ${ONE} MB/s (x$(ratio "$ONE" "$DD")) | 16 MiB PATCHes ${CHUNK} MB/s (x$(ratio "$CHUNK" "$DD"))"

# Download vs nginx (sendfile on, tcp_nopush off), same file, loopback, curl to /dev/null.
cp "$src" "$dst/dl.bin"; cat "$dst/dl.bin" >/dev/null
NPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$W/nginx"
cat >"$W/nginx/nginx.conf" <<NGINX
user root;
worker_processes 1;
daemon off;
pid $W/nginx/pid;
error_log $W/nginx/error.log;
events { worker_connections 64; }
http {
  access_log off;
  sendfile on;
  tcp_nopush off;
  server { listen 127.0.0.1:$NPORT; root $dst; }
}
NGINX
nginx -c "$W/nginx/nginx.conf" & NGINX_PID=$!
sleep 0.5
dtok=$(token /folder/file/download "{\"volume\":\"vol1\",\"vfid\":\"$vfid\",\"relpath\":\"dl.bin\"}")
ng=(); ours=()
for r in $(seq 1 $RUNS); do
  ng+=("$(curl -s -o /dev/null -w '%{speed_download}' "http://127.0.0.1:$NPORT/dl.bin")")
  ours+=("$(curl -s -o /dev/null -w '%{speed_download}' "http://$CLIENT/download?token=$dtok")")
done
NG=$(printf '%s\n' "${ng[@]}" | median); OURS=$(printf '%s\n' "${ours[@]}" | median)
echo "download 1 GiB: nginx sendfile $(mbps "$NG" 1) MB/s | storage-agent $(mbps "$OURS" 1) MB/s (x$(ratio "$OURS" "$NG"))"

# Peak RSS for 10 GiB each way (sparse source: no disk read; the destination is written).
BIG=$((10 << 30))
rm -f "$dst/up.bin" "$dst/dd.bin" "$src"
truncate -s $BIG "$W/big.bin"
tok=$(token /folder/file/upload "{\"volume\":\"vol1\",\"vfid\":\"$vfid\",\"relpath\":\"big.bin\",\"size\":$BIG}")
peak_reset "$DAEMON_PID"
t=$(now)
curl -fsS -X PATCH -H 'Content-Type: application/offset+octet-stream' -H 'Upload-Offset: 0' -H 'Expect:' \
  -T "$W/big.bin" "http://$CLIENT/upload?token=$tok" >/dev/null
UP_S=$(elapsed "$t"); UP_RSS=$(peak_kib "$DAEMON_PID")
peak_reset "$DAEMON_PID"
dtok=$(token /folder/file/download "{\"volume\":\"vol1\",\"vfid\":\"$vfid\",\"relpath\":\"big.bin\"}")
t=$(now)
curl -fsS -o /dev/null "http://$CLIENT/download?token=$dtok"
DOWN_S=$(elapsed "$t"); DOWN_RSS=$(peak_kib "$DAEMON_PID")
echo "10 GiB upload: $(mbps $BIG "$UP_S") MB/s, peak RSS $((UP_RSS / 1024)) MiB | 10 GiB download: $(mbps $BIG "$DOWN_S") MB/s, peak RSS $((DOWN_RSS / 1024)) MiB"
