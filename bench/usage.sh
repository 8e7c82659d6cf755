#!/usr/bin/env bash
# /folder/usage and /folder/used-bytes on a 100k-file vfolder vs `du -s` on the same tree,
# with a warm and a cold page cache. Target: ratio (ours / du) <= 1.
source "$(dirname "$0")/lib.sh"
W=$(mktemp -d /var/tmp/sa-bench-usage.XXXX)
trap 'stop_daemon ${DAEMON_PID:-0}; rm -rf "$W"' EXIT
start_daemon "$W"
vfid=$(new_vfolder)
dir=$(vfolder_path "$W" "$vfid")
FILES=${FILES:-100000}
python3 - "$dir" "$FILES" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
per = 1000
for d in range((n + per - 1) // per):
    p = os.path.join(root, f"d{d:04}", "sub")
    os.makedirs(p)
    for i in range(min(per, n - d * per)):
        with open(os.path.join(p, f"f{i:05}"), "wb") as f:
            f.write(b"x" * (i % 4096))
PY
body="{\"volume\":\"vol1\",\"vfid\":\"$vfid\"}"
echo "tree: $FILES files in $(find "$dir" -type d | wc -l) directories"
for cache in warm cold; do
  for what in du usage used-bytes; do
    times=()
    for _ in 1 2 3; do
      [ $cache = cold ] && drop_caches
      [ $cache = warm ] && du -s "$dir" >/dev/null
      t=$(now)
      case $what in
        du) du -s "$dir" >/dev/null ;;
        *) mgr GET "/folder/$what" "$body" >/dev/null ;;
      esac
      times+=("$(elapsed "$t")")
    done
    m=$(printf '%s\n' "${times[@]}" | median)
    printf '%-5s %-11s median %.3fs\n' $cache $what "$m"
    eval "T_${cache}_${what//-/_}=$m"
  done
  printf '%-5s ratio usage/du = %s  used-bytes/du = %s\n' $cache \
    "$(ratio "$(eval echo \$T_${cache}_usage)" "$(eval echo \$T_${cache}_du)")" \
    "$(ratio "$(eval echo \$T_${cache}_used_bytes)" "$(eval echo \$T_${cache}_du)")"
done
echo "usage answer: $(mgr GET /folder/usage "$body")  du -s -B1: $(du -s -B1 "$dir" | cut -f1)  used-bytes: $(mgr GET /folder/used-bytes "$body")"
