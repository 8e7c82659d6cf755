#!/usr/bin/env bash
# Installs and starts what the tests and benchmarks need on a fresh Debian 12 machine, as root.
# Idempotent: every step checks before it acts, so a second run takes seconds.
#
#   scripts/testenv.sh packages    apt packages, Python and Node test clients
#   scripts/testenv.sh docker      start dockerd if it is not running
#   scripts/testenv.sh base-image  localbase:bookworm-slim from debootstrap (no registry needed)
#   scripts/testenv.sh dufs        the dufs binary for the file browser image (cargo install)
#   scripts/testenv.sh bai-venv    a Python 3.13 venv with Backend.AI's own classes
#                                  (backend.ai-common 26.9.6), which tests decode events with
#   scripts/testenv.sh peers       benchmark peers: the Backend.AI storage proxy 26.9.6 (venv)
#                                  and @tus/server (bench/peers)
#   scripts/testenv.sh azurite     Azure's blob storage emulator (npm, in $SA_CACHE/azurite)
#   scripts/testenv.sh grafana-schema  Grafana's dashboard schema types and tsc (npm)
#   scripts/testenv.sh ceph        Debian's Ceph 16 (mon, osd, mds, mgr, ceph-fuse) and attr, for
#                                  the single-node CephFS of tests/e2e/quota/cephfs.rs
#   scripts/testenv.sh manager     a real Backend.AI 26.9.6 cluster's parts for
#                                  tests/manager/stack.sh: PostgreSQL, etcd, Redis (apt) and a
#                                  venv with backend.ai-manager, -client and the storage proxy
#   scripts/testenv.sh vm          a VM for the XFS quota tests (this kernel has no XFS quota):
#                                  QEMU from bookworm-backports, Debian's kernel, virtme-ng
#   scripts/testenv.sh all         all of the above
#
# Env: SA_CACHE (default ~/.cache/storage-agent) keeps the base rootfs tarball and dufs between
# runs; BASE_IMAGE (default localbase:bookworm-slim).
set -euo pipefail

HERE=$(cd "$(dirname "$0")/.." && pwd)
SA_CACHE=${SA_CACHE:-$HOME/.cache/storage-agent}
BASE_IMAGE=${BASE_IMAGE:-localbase:bookworm-slim}
export DEBIAN_FRONTEND=noninteractive
APT=(apt-get -o DPkg::Lock::Timeout=600 -y -qq)
mkdir -p "$SA_CACHE"

log() { printf '[testenv] %s\n' "$*" >&2; }

wait_for() { # wait_for SECONDS CMD...
  local end=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || { log "timeout waiting for: $*"; return 1; }
    sleep 0.2
  done
}

packages() {
  local want=(docker.io debootstrap redis-server sshpass openssh-client openssh-server curl
              btrfs-progs xfsprogs e2fsprogs s3fs nginx-light chromium busybox-static
              python3 nodejs npm iproute2 procps psmisc openssl socat util-linux
              etcd-server etcd-client redis-sentinel rclone)
  local missing=()
  for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt: installing ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    # nodejs/npm may come from elsewhere on this machine (a newer Node); keep what works.
    "${APT[@]}" install --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
      local core=()
      for p in "${missing[@]}"; do
        case $p in nodejs|npm) command -v "${p/nodejs/node}" >/dev/null || core+=("$p") ;; *) core+=("$p") ;; esac
      done
      "${APT[@]}" install --no-install-recommends "${core[@]}" >/dev/null
    }
  fi
  # The distribution's sshd and redis may autostart on their default ports; tests use their own.
  python3 -c 'import tusclient, moto, boto3, azure.storage.blob' 2>/dev/null || {
    log "pip: tuspy, moto, boto3, azure-storage-blob"
    python3 -m pip install -q tuspy 'moto[server]' boto3 azure-storage-blob
  }
  if [ ! -d "$HERE/tests/clients/node_modules/tus-js-client" ]; then
    log "npm: tus-js-client (tests/clients)"
    (cd "$HERE/tests/clients" && npm ci --no-audit --no-fund --silent)
  fi
}

docker_up() {
  if ! docker info >/dev/null 2>&1; then
    log "starting dockerd"
    nohup /usr/sbin/dockerd >"$SA_CACHE/dockerd.log" 2>&1 &
    wait_for 60 docker info || { tail -20 "$SA_CACHE/dockerd.log" >&2; return 1; }
  fi
}

base_image() {
  docker_up
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then return; fi
  local tgz="$SA_CACHE/base-rootfs.tgz"
  if [ ! -s "$tgz" ]; then
    local mirror rootfs="$SA_CACHE/rootfs"
    mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    log "debootstrap bookworm from $mirror (the slow step, cached in $tgz)"
    rm -rf "$rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$SA_CACHE/debootstrap.log" 2>&1 \
      || { tail -20 "$SA_CACHE/debootstrap.log" >&2; return 1; }
    printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
      'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' 'path-exclude /usr/share/locale/*' \
      >"$rootfs/etc/dpkg/dpkg.cfg.d/01-nodoc"
    tar -C "$rootfs" --exclude='./usr/share/doc/*' --exclude='./usr/share/man/*' \
      --exclude='./usr/share/info/*' --exclude='./usr/share/locale/*' \
      --exclude='./var/cache/apt/archives/*.deb' --exclude='./var/cache/apt/*.bin' \
      --exclude='./var/lib/apt/lists/*' -czf "$tgz.tmp" .
    mv "$tgz.tmp" "$tgz"
    rm -rf "$rootfs"
  fi
  log "importing $BASE_IMAGE"
  zcat "$tgz" | docker import - "$BASE_IMAGE" >/dev/null
}

dufs() {
  if [ ! -x "$SA_CACHE/dufs/bin/dufs" ]; then
    log "cargo install dufs (the file browser engine)"
    cargo install -q --locked --root "$SA_CACHE/dufs" dufs
  fi
  echo "$SA_CACHE/dufs/bin/dufs"
}

# Backend.AI 26.9 needs Python >= 3.13; these machines have it under pyenv.
python313() {
  local cand
  for cand in python3.13 "$(pyenv root 2>/dev/null)"/versions/3.13*/bin/python /root/.pyenv/versions/3.13*/bin/python; do
    if [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 \
       && "$cand" -c 'import sys; assert sys.version_info >= (3, 13)' 2>/dev/null; then
      echo "$cand"; return
    fi
  done
  log "Python 3.13 not found (pyenv install 3.13)"; return 1
}

# make_venv DIR PYPI-PACKAGE CHECK-IMPORT
make_venv() {
  local venv=$1 pkg=$2 check=$3 py
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import $check" 2>/dev/null; then
    return
  fi
  py=$(python313)
  log "venv $venv: $pkg ($py)"
  rm -rf "$venv"
  "$py" -m venv "$venv"
  # shellcheck disable=SC2086 # several packages, space-separated
  "$venv/bin/pip" install -q $pkg
}

# Backend.AI's classes decode our events; prometheus_client parses /metrics; grpcio-reflection
# lists our gRPC services the v1alpha way.
bai_venv() {
  make_venv "$SA_CACHE/bai-venv" 'backend.ai-common==26.9.6 grpcio-reflection prometheus-client openapi-spec-validator' \
    'ai.backend.common, redis, grpc_reflection, prometheus_client, openapi_spec_validator'
}

peers() {
  make_venv "$SA_CACHE/peer-venv" 'backend-ai-storage-proxy==26.9.6' 'ai.backend.storage'
  if [ ! -d "$HERE/bench/peers/node_modules/@tus/server" ]; then
    log "npm: @tus/server (bench/peers)"
    (cd "$HERE/bench/peers" && npm ci --no-audit --no-fund --silent)
  fi
}

azurite() {
  if [ ! -x "$SA_CACHE/azurite/node_modules/.bin/azurite-blob" ]; then
    log "npm: azurite (Azure blob storage emulator)"
    mkdir -p "$SA_CACHE/azurite"
    (cd "$SA_CACHE/azurite" && npm install --no-audit --no-fund --silent azurite@3.35.0)
  fi
}

# tests/e2e/dashboard.rs type-checks docs/grafana-dashboard.json against Grafana's own dashboard
# schema (@grafana/schema's TypeScript types, generated from its CUE) with tsc.
grafana_schema() {
  if [ ! -x "$SA_CACHE/grafana-schema/node_modules/.bin/tsc" ] \
    || [ ! -d "$SA_CACHE/grafana-schema/node_modules/@grafana/schema" ]; then
    log "npm: @grafana/schema and typescript (the dashboard's schema check)"
    mkdir -p "$SA_CACHE/grafana-schema"
    (cd "$SA_CACHE/grafana-schema" && npm install --no-audit --no-fund --silent @grafana/schema@13.2.3 typescript@5.6.3)
  fi
}

# tests/e2e/quota/cephfs.rs boots single-node Ceph clusters (scripts/ceph-single-node.sh):
# Debian's Ceph 16 daemons, ceph-fuse (this kernel has no ceph module) and getfattr.
ceph_packages() {
  local want=(ceph-mon ceph-osd ceph-mds ceph-mgr ceph-fuse ceph-common attr) missing=()
  for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt: ${missing[*]} (a single-node CephFS for the cephfs tests; about 2 minutes)"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    "${APT[@]}" install --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# tests/e2e/backendai_manager.rs runs the real manager (tests/manager/stack.sh, which starts
# its own PostgreSQL, etcd and Redis on private ports: none of the system services are used).
manager() {
  local want=(postgresql jq gettext-base etcd-server etcd-client redis-server) missing=()
  for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt: ${missing[*]} (the manager's database, config store and cache)"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    "${APT[@]}" install --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # the distribution's PostgreSQL cluster may autostart on 5432; stack.sh runs its own on 15432
  make_venv "$SA_CACHE/mgr-venv" \
    'backend.ai-manager==26.9.6 backend.ai-client==26.9.6 backend-ai-storage-proxy==26.9.6 requests' \
    'ai.backend.manager, ai.backend.client, ai.backend.storage, requests'
}

# XFS project quota needs a kernel built with it; the tests boot Debian's own under QEMU with
# virtme-ng (software emulation: KVM guests do not run on these machines). TESTENV-VM.md.
vm() {
  local need=()
  command -v qemu-system-x86_64 >/dev/null || need+=(qemu)
  dpkg-query -W -f='${Status}' linux-image-amd64 2>/dev/null | grep -q "install ok installed" || need+=(kernel)
  if [ ${#need[@]} -gt 0 ]; then
    if ! grep -qs bookworm-backports /etc/apt/sources.list.d/*; then
      local mirror
      mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
      printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "${mirror:-http://deb.debian.org/debian}" > /etc/apt/sources.list.d/bookworm-backports.sources
    fi
    log "apt: QEMU (bookworm-backports) and Debian's kernel for the XFS quota VM"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    # bookworm's own qemu-system-x86 would remove the machine's qemu-utils 10.0 (backports).
    "${APT[@]}" install --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null
    "${APT[@]}" install --no-install-recommends linux-image-amd64 busybox-static xfsprogs >/dev/null
  fi
  if [ ! -x "$SA_CACHE/vng/bin/vng" ]; then
    log "pip: virtme-ng (runs a command in a VM that sees this machine's files)"
    python3 -m venv "$SA_CACHE/vng"
    "$SA_CACHE/vng/bin/pip" install -q 'virtme-ng==1.42'
  fi
}

case "${1:-all}" in
  packages) packages ;;
  docker) docker_up ;;
  base-image) base_image ;;
  dufs) dufs ;;
  bai-venv) bai_venv ;;
  peers) peers ;;
  vm) vm ;;
  azurite) azurite ;;
  grafana-schema) grafana_schema ;;
  ceph) ceph_packages ;;
  manager) manager ;;
  all) packages; docker_up; base_image; dufs >/dev/null; bai_venv; peers; azurite; grafana_schema; manager; ceph_packages; vm ;;
  *) echo "usage: $0 {packages|docker|base-image|dufs|bai-venv|peers|azurite|grafana-schema|manager|ceph|vm|all}" >&2; exit 2 ;;
esac
