#!/usr/bin/env bash
# Runs the whole test suite against SQLite and a local PostgreSQL 15 that this script starts.
set -uo pipefail
cd "$(dirname "$0")/.."

start_postgres() {
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null 2>&1 || return 1
  fi
  local version
  version=$(pg_lsclusters --no-header 2>/dev/null | awk 'NR==1{print $1}')
  if [ -z "$version" ]; then
    version=$(ls /usr/lib/postgresql | sort -n | tail -1)
    pg_createcluster "$version" main >/dev/null || return 1
  fi
  pg_ctlcluster "$version" main start 2>/dev/null || pg_lsclusters | grep -q online || return 1
  local port
  port=$(pg_lsclusters --no-header | awk 'NR==1{print $3}')
  su postgres -c "psql -p $port -qtAc \"SELECT 1 FROM pg_roles WHERE rolname='registry'\"" | grep -q 1 \
    || su postgres -c "psql -p $port -qc \"CREATE ROLE registry LOGIN PASSWORD 'registry' SUPERUSER\"" >/dev/null
  # One database per run, so two test runs on one machine never empty each other's tables.
  TEST_DB="registry_test_$$"
  PG_PORT="$port"
  su postgres -c "createdb -p $port -O registry $TEST_DB" || return 1
  trap 'su postgres -c "dropdb -p $PG_PORT --if-exists $TEST_DB" >/dev/null 2>&1' EXIT
  export REGISTRY_TEST_POSTGRES_URL="postgresql+psycopg://registry:registry@127.0.0.1:$port/$TEST_DB"
}

# The browser tests (tests/test_web.py) drive Debian's chromium through its chromedriver.
install_chromium() {
  if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    return 0
  fi
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
    || return 1
  command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1
}

if ! install_chromium; then
  echo "warning: could not install chromium + chromium-driver; the browser tests will fail under CI, skip otherwise" >&2
fi

if start_postgres; then
  echo "PostgreSQL ready: $REGISTRY_TEST_POSTGRES_URL"
else
  echo "error: could not start PostgreSQL; the storage tests need it" >&2
  exit 1
fi

# The S3 storage tests (tests/test_blob_stores.py) talk to moto's S3 API server, a real process.
start_s3() {
  local port
  port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  python -m moto.server -H 127.0.0.1 -p "$port" >/tmp/moto-$$.log 2>&1 &
  S3_PID=$!
  export REGISTRY_TEST_S3_ENDPOINT="http://127.0.0.1:$port"
  for _ in $(seq 1 100); do
    python -c "import urllib.request; urllib.request.urlopen('$REGISTRY_TEST_S3_ENDPOINT/moto-api/')" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  return 1
}
if start_s3; then
  echo "S3 API (moto) ready: $REGISTRY_TEST_S3_ENDPOINT"
  trap 'kill $S3_PID 2>/dev/null; su postgres -c "dropdb -p $PG_PORT --if-exists $TEST_DB" >/dev/null 2>&1' EXIT
else
  echo "error: could not start the S3 API server (moto); the S3 storage tests need it" >&2
  exit 1
fi

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
python -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$status"
