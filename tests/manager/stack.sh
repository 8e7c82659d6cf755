#!/usr/bin/env bash
# A real Backend.AI 26.9.6 cluster on loopback for tests/e2e/backendai_manager.rs: PostgreSQL,
# etcd and Redis of its own, the manager with upstream's example fixtures, the Python storage
# proxy 26.9.6 (registered as proxy "pyproxy") and storage-agent (proxy "sa"), each proxy's
# manager API behind relay.py, which logs every exchange as JSON lines.
#
#   stack.sh up      start everything (idempotent: what runs is left running)
#   stack.sh swap    stop the Python proxy; start storage-agent in its place, from the Python
#                    proxy's own storage-proxy.toml (same ports, secrets, volume, etcd)
#   stack.sh down    stop everything by recorded PID
#
# Env: E2E_DIR (scratch directory, required), SA_BIN (the storage-agent binary, required for
# up/swap), VENV (default $SA_CACHE/mgr-venv: backend.ai-manager, backend.ai-client and
# backend-ai-storage-proxy 26.9.6; scripts/testenv.sh manager makes it).
# Every wait is bounded; a failure prints the log that explains it and exits non-zero.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${E2E_DIR:?set E2E_DIR to a scratch directory}"
SA_CACHE=${SA_CACHE:-$HOME/.cache/storage-agent}
VENV=${VENV:-$SA_CACHE/mgr-venv}
PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
L="$E2E_DIR/logs"

# Ports: none of the services' defaults, so a system Redis or etcd may run too.
export PG_PORT=15432 ETCD_PORT=12379 ETCD_PEER_PORT=12380 REDIS_PORT=16379
export MGR_PORT=18081 MGR_INTERNAL_PORT=18082
export PY_CLIENT_PORT=17021 PY_MGR_PORT=17022 PY_INTERNAL_PORT=17023 PY_RELAY_PORT=17122
export SA_CLIENT_PORT=18021 SA_MGR_PORT=18022 SA_INTERNAL_PORT=18023 SA_RELAY_PORT=18122
export ETCD_NS=local
export PY_SECRET_MGR=py-manager-secret SA_SECRET_MGR=sa-manager-secret
export PY_JWT=py-jwt-secret-0123456789abcdef0123 SA_JWT=sa-jwt-secret-0123456789abcdef0123
export E2E_DIR

log() { printf '[stack] %s\n' "$*" >&2; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
need() { command -v "$1" >/dev/null || { log "$1 is missing: $2"; exit 3; }; }

wait_for() { # wait_for SECONDS WHAT CMD...
  local end=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $end ]; then log "timeout ($1 s) waiting for $what"; return 1; fi
    sleep 0.3
  done
}

preflight() {
  need etcd "apt-get install etcd-server (or scripts/testenv.sh manager)"
  need redis-server "apt-get install redis-server"
  need envsubst "apt-get install gettext-base"
  need jq "apt-get install jq"
  [ -x "$PGBIN/postgres" ] || { log "PostgreSQL is missing: apt-get install postgresql (or scripts/testenv.sh manager)"; exit 3; }
  [ -x "$VENV/bin/backend.ai" ] || { log "no manager venv at $VENV: scripts/testenv.sh manager"; exit 3; }
}

infra() {
  mkdir -p "$E2E_DIR"/{etcd,redis} "$L"
  # PostgreSQL refuses to run as root: the cluster belongs to the "postgres" system user.
  if [ ! -f "$E2E_DIR/pg/PG_VERSION" ]; then
    mkdir -p "$E2E_DIR/pg" && chown postgres: "$E2E_DIR/pg" && chmod 700 "$E2E_DIR/pg"
    runuser -u postgres -- "$PGBIN/initdb" -D "$E2E_DIR/pg" -U postgres --auth=trust -E UTF8 \
      >"$L/initdb.log" 2>&1 || { cat "$L/initdb.log" >&2; return 1; }
  fi
  if ! alive "$E2E_DIR/pg.pid"; then
    touch "$L/postgres.log"; chown postgres: "$L/postgres.log"
    mkdir -p "$E2E_DIR/pgsock"; chown postgres: "$E2E_DIR/pgsock"
    runuser -u postgres -- "$PGBIN/postgres" -D "$E2E_DIR/pg" -p $PG_PORT -c listen_addresses=127.0.0.1 \
      -k "$E2E_DIR/pgsock" -c max_connections=200 -c fsync=off >>"$L/postgres.log" 2>&1 &
    # the PID to stop is the postmaster's own (runuser does not pass signals on)
    wait_for 60 "postmaster.pid" test -s "$E2E_DIR/pg/postmaster.pid"
    head -1 "$E2E_DIR/pg/postmaster.pid" >"$E2E_DIR/pg.pid"
  fi
  if ! alive "$E2E_DIR/etcd.pid"; then
    etcd --name mgr-e2e --data-dir "$E2E_DIR/etcd" \
      --listen-client-urls http://127.0.0.1:$ETCD_PORT --advertise-client-urls http://127.0.0.1:$ETCD_PORT \
      --listen-peer-urls http://127.0.0.1:$ETCD_PEER_PORT --initial-advertise-peer-urls http://127.0.0.1:$ETCD_PEER_PORT \
      --initial-cluster mgr-e2e=http://127.0.0.1:$ETCD_PEER_PORT >"$L/etcd.log" 2>&1 &
    echo $! >"$E2E_DIR/etcd.pid"
  fi
  if ! alive "$E2E_DIR/redis.pid"; then
    redis-server --bind 127.0.0.1 --port $REDIS_PORT --dir "$E2E_DIR/redis" --save '' --appendonly no \
      >"$L/redis.log" 2>&1 &
    echo $! >"$E2E_DIR/redis.pid"
  fi
  wait_for 60 etcd env ETCDCTL_API=3 etcdctl --endpoints=127.0.0.1:$ETCD_PORT endpoint health
  wait_for 60 redis redis-cli -p $REDIS_PORT ping
  wait_for 60 postgres "$PGBIN/pg_isready" -h 127.0.0.1 -p $PG_PORT -U postgres
  local psql=(psql -h 127.0.0.1 -p $PG_PORT -U postgres)
  "${psql[@]}" -tc "SELECT 1 FROM pg_database WHERE datname='backend'" | grep -q 1 \
    || "${psql[@]}" -c "CREATE DATABASE backend" >/dev/null
  "${psql[@]}" -c "ALTER USER postgres PASSWORD 'develove'" >/dev/null
}

# One-time: configs, DB schema, fixtures, etcd config and volumes.
setup() {
  [ -f "$E2E_DIR/setup.done" ] && return
  mkdir -p "$E2E_DIR"/{cfg,ipc-mgr,py/ipc,py/vfs1,sa/state,sa/vfs1,sa-swap}
  # vfs volumes in the v3 layout (as upstream's install-dev.sh makes them)
  echo 3 >"$E2E_DIR/py/vfs1/version.txt"
  echo 3 >"$E2E_DIR/sa/vfs1/version.txt"
  for f in manager.toml alembic.ini etcd.volumes.json etcd.config.json storage-proxy.toml storage-agent.toml; do
    envsubst <"$HERE/configs/$f.in" >"$E2E_DIR/cfg/$f"
  done
  cp "$HERE/fixtures/manager.key" "$HERE/fixtures/manager.key_secret" "$E2E_DIR/cfg/"
  local mgr=("$VENV/bin/backend.ai" mgr -f "$E2E_DIR/cfg/manager.toml")
  (
    cd "$E2E_DIR/cfg"
    "${mgr[@]}" etcd put-json config "$E2E_DIR/cfg/etcd.config.json"
    "${mgr[@]}" etcd put-json volumes "$E2E_DIR/cfg/etcd.volumes.json"
    "${mgr[@]}" schema oneshot -f "$E2E_DIR/cfg/alembic.ini"
    # upstream's example fixtures predate 26.9's RBAC graph tables: four keys go (26.9.6's
    # populate writes the graph nodes itself)
    jq 'del(.association_scopes_entities, .virtual_scopes, .entity_memberships, .scope_bindings)' \
      "$HERE/fixtures/example-users.json" >"$E2E_DIR/cfg/example-users.26.9.json"
    for fx in "$E2E_DIR/cfg/example-users.26.9.json" "$HERE/fixtures/example-keypairs.json" \
              "$HERE/fixtures/example-resource-slot-types.json"; do
      "${mgr[@]}" fixture populate "$fx"
    done
    # 26.9.6 needs a personal project per user and the RBAC graph rows
    "$VENV/bin/python" "$HERE/graph-backfill.py" "postgresql+asyncpg://postgres:develove@127.0.0.1:$PG_PORT/backend"
  ) >"$L/setup.log" 2>&1 || { tail -40 "$L/setup.log" >&2; return 1; }
  # both proxies' volumes allowed everywhere (install-dev.sh does the same for its one volume)
  local perm='["create-vfolder","modify-vfolder","delete-vfolder","mount-in-session","upload-file","download-file","invite-others","set-user-specific-permission"]'
  local hosts="{\"pyproxy:vfs1\": $perm, \"sa:vfs1\": $perm}"
  local psql=(psql -h 127.0.0.1 -p $PG_PORT -U postgres -d backend -v ON_ERROR_STOP=1 -q)
  for t in domains groups keypair_resource_policies; do
    "${psql[@]}" -c "UPDATE $t SET allowed_vfolder_hosts = '$hosts'"
  done
  touch "$E2E_DIR/setup.done"
}

http_up() { curl -fsS -o /dev/null "$1"; }

relays() {
  # The manager talks to these (etcd volumes/proxies/<name>/manager_api); each logs what it
  # relays, so a test can read what the manager really sent.
  local name port target
  for spec in "py:$PY_RELAY_PORT:$PY_MGR_PORT:pyproxy" "sa:$SA_RELAY_PORT:$SA_MGR_PORT:sa"; do
    IFS=: read -r name port target proxy <<<"$spec"
    if ! alive "$E2E_DIR/relay-$name.pid"; then
      "$VENV/bin/python" "$HERE/relay.py" --listen "$port" --target "http://127.0.0.1:$target" \
        --log "$L/wire-$proxy.jsonl" --name "$proxy" >"$L/relay-$name.log" 2>&1 &
      echo $! >"$E2E_DIR/relay-$name.pid"
    fi
  done
}

start_py() {
  alive "$E2E_DIR/py.pid" && return
  BACKENDAI_PROMETHEUS_DIR="$E2E_DIR/py/prometheus" \
    "$VENV/bin/backend.ai" storage start-server -f "$E2E_DIR/cfg/storage-proxy.toml" >>"$L/storage-proxy.log" 2>&1 &
  echo $! >"$E2E_DIR/py.pid"
  wait_for 120 "the Python storage proxy" http_up "http://127.0.0.1:$PY_CLIENT_PORT/" \
    || { tail -30 "$L/storage-proxy.log" >&2; return 1; }
}

# start_sa PIDNAME CONFIG CWD LOG
start_sa() {
  alive "$E2E_DIR/$1.pid" && return
  : "${SA_BIN:?set SA_BIN to the storage-agent binary}"
  (cd "$3" && exec "$SA_BIN" serve --config "$2") >>"$4.out" 2>>"$4.log" &
  echo $! >"$E2E_DIR/$1.pid"
  wait_for 60 "storage-agent ($1)" grep -q '^ready' "$4.out" || { tail -30 "$4.log" >&2; return 1; }
}

start_mgr() {
  alive "$E2E_DIR/mgr.pid" && return
  (cd "$E2E_DIR/cfg" && exec "$VENV/bin/backend.ai" mgr start-server -f "$E2E_DIR/cfg/manager.toml") >>"$L/manager.log" 2>&1 &
  echo $! >"$E2E_DIR/mgr.pid"
  wait_for 300 "the manager" http_up "http://127.0.0.1:$MGR_PORT/" || { tail -40 "$L/manager.log" >&2; return 1; }
}

stop() { # stop NAME... (by recorded PID; PostgreSQL gets SIGINT, a fast shutdown)
  local n pid
  for n in "$@"; do
    local f="$E2E_DIR/$n.pid"
    if alive "$f"; then
      pid=$(cat "$f")
      if [ "$n" = pg ]; then kill -INT "$pid"; else kill -TERM "$pid"; fi
      for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$f"
  done
}

case "${1:-}" in
  up)
    preflight; infra; setup; relays
    # the proxies before the manager: `vfolder list-hosts` fails while a registered proxy is down
    start_py
    start_sa sa "$E2E_DIR/cfg/storage-agent.toml" "$E2E_DIR/sa" "$L/storage-agent"
    start_mgr
    log "up: manager :$MGR_PORT, pyproxy :$PY_CLIENT_PORT/$PY_MGR_PORT, sa :$SA_CLIENT_PORT/$SA_MGR_PORT"
    ;;
  swap)
    stop py
    # The Python proxy's own file, unmodified; the state goes to the working directory.
    start_sa sa-swap "$E2E_DIR/cfg/storage-proxy.toml" "$E2E_DIR/sa-swap" "$L/storage-agent-swap"
    log "swapped: storage-agent serves pyproxy from $E2E_DIR/cfg/storage-proxy.toml"
    ;;
  down)
    stop mgr sa sa-swap py relay-py relay-sa redis etcd pg
    ;;
  *) echo "usage: $0 {up|swap|down}" >&2; exit 2 ;;
esac
