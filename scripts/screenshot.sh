#!/usr/bin/env bash
# Loads a file browser session page in headless Chromium (Debian's `chromium` package) and saves
# a screenshot, to prove a real browser renders it over HTTPS.
#
#   scripts/screenshot.sh URL USER PASSWORD CA_PEM OUT_PNG
#
# The certificate is pinned, not ignored: the script checks that the served certificate chains
# to CA_PEM, then tells Chromium to trust exactly that key (--ignore-certificate-errors-spki-list).
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
# Chromium aborts a page load with net::ERR_NETWORK_CHANGED whenever an interface comes or goes,
# and Docker adds and removes veth pairs for every container that parallel tests start. Such a
# load is tried again; any other failure ends the script at once.
for attempt in 1 2 3 4 5; do
  rm -f "$out"
  rc=0
  timeout 60 chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$work/profile" --ignore-certificate-errors-spki-list="$spki" \
    --window-size=1280,800 --virtual-time-budget=3000 --screenshot="$out" "$authed" \
    >"$work/chromium.log" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ] && [ -s "$out" ]; then
    break
  fi
  if grep -q 'ERR_NETWORK_CHANGED' "$work/chromium.log" && [ "$attempt" -lt 5 ]; then
    echo "attempt $attempt: the page load met a network change (a container came or went); again"
    sleep 1
    continue
  fi
  if [ "$rc" -ne 0 ]; then
    { echo "chromium failed (exit $rc, attempt $attempt); its log:"; cat "$work/chromium.log"; } >&2
  else
    { echo "chromium exited without writing $out (attempt $attempt); its log:"; cat "$work/chromium.log"; } >&2
  fi
  exit 1
done
echo "screenshot: $out"
