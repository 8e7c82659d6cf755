#!/usr/bin/env bash
# Loads a file browser session page in headless Chromium (Debian's `chromium` package) and saves
# a screenshot, to prove a real browser renders it over HTTPS.
#
#   scripts/screenshot.sh URL USER PASSWORD CA_PEM OUT_PNG
#
# The certificate is pinned, not ignored: the script checks that the served certificate chains
# to CA_PEM, then tells Chromium to trust exactly that key (--ignore-certificate-errors-spki-list).
# Needs root (unshare --net), socat, openssl and chromium.
set -euo pipefail
url=$1 user=$2 password=$3 ca=$4 out=$5
hostport=$(printf '%s' "$url" | sed -E 's#^https://([^/]+)/?.*#\1#')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One handshake, read to the end: an awk that stopped early would SIGPIPE s_client, and with
# pipefail that failed the script now and then without a word.
echo | openssl s_client -connect "$hostport" -showcerts >"$work/chain.txt" 2>"$work/s_client.log" \
  || { cat "$work/s_client.log" >&2; exit 1; }
awk '/BEGIN CERT/{n++} n==1{print} /END CERT/{if (n==1) n++}' "$work/chain.txt" >"$work/leaf.pem"
awk '/BEGIN CERT/{n++} n>=2{print}' "$work/chain.txt" >"$work/intermediates.pem"
test -s "$work/leaf.pem" || { echo "no certificate served at $hostport" >&2; exit 1; }
untrusted=()
[ -s "$work/intermediates.pem" ] && untrusted=(-untrusted "$work/intermediates.pem")
openssl verify -CAfile "$ca" "${untrusted[@]}" "$work/leaf.pem" >"$work/verify.log" 2>&1 \
  || { cat "$work/verify.log" >&2; exit 1; }
spki=$(openssl x509 -in "$work/leaf.pem" -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64)

# Basic-auth credentials in the URL of the top-level navigation.
authed=$(printf '%s' "$url" | sed -E "s#^https://#https://${user}:${password}@#")
port=${hostport##*:}

# Chromium aborts every request in flight when a network interface comes or goes
# (net::ERR_NETWORK_CHANGED; a JavaScript file lost that way leaves a blank page), and Docker adds
# and removes a veth for every container. So Chromium runs in a network namespace of its own,
# where nothing changes: it resolves every name to its own loopback, and a socat pair carries the
# connection over a Unix socket to the real HOST:PORT. The TLS name and certificate are untouched.
socat UNIX-LISTEN:"$work/fwd.sock",fork TCP:"$hostport" 2>"$work/socat.log" &
fwd=$!
trap 'kill "$fwd" 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 50); do [ -S "$work/fwd.sock" ] && break; sleep 0.1; done

export work port spki authed out
timeout 90 unshare --net bash -c '
  set -eu
  ip link set lo up
  socat TCP-LISTEN:"$port",bind=127.0.0.1,reuseaddr,fork UNIX-CONNECT:"$work/fwd.sock" &
  inner=$!
  trap "kill $inner 2>/dev/null" EXIT
  for _ in $(seq 1 50); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
  timeout 60 chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --host-resolver-rules="MAP * 127.0.0.1" \
    --user-data-dir="$work/profile" --ignore-certificate-errors-spki-list="$spki" \
    --window-size=1280,800 --virtual-time-budget=3000 --screenshot="$out" "$authed"
' >"$work/chromium.log" 2>&1 \
  || { rc=$?; echo "chromium failed (exit $rc); its log:"; cat "$work/chromium.log" "$work/socat.log"; exit 1; } >&2
if [ ! -s "$out" ]; then
  { echo "chromium exited without writing $out; its log:"; cat "$work/chromium.log" "$work/socat.log"; } >&2
  exit 1
fi
echo "screenshot: $out"
