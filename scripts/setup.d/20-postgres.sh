# shellcheck shell=bash
# PostgreSQL for portolan's store tests (sourced by scripts/test.sh, as root).
# Installs Debian's server if missing, starts a cluster, creates a password role reachable over
# TCP on 127.0.0.1, and exports PORTOLAN_TEST_PG (an admin URL; tests create and drop their own
# databases through it). Without root it only exports the URL if a server already answers.
PORTOLAN_PG_USER=portolan_test
PORTOLAN_PG_PASS=portolan_test
PORTOLAN_PG_PORT="${PORTOLAN_PG_PORT:-5432}"

portolan_pg_setup() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "20-postgres: not root; not installing or starting PostgreSQL"
    return 0
  fi
  if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    echo "20-postgres: installing postgresql from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
  fi
  local ver
  ver="$(ls /usr/lib/postgresql | sort -V | tail -1)"
  if ! pg_lsclusters -h | awk -v v="$ver" '$1==v && $2=="main"' | grep -q .; then
    pg_createcluster "$ver" main --port "$PORTOLAN_PG_PORT" >/dev/null
  fi
  if ! pg_lsclusters -h | awk -v v="$ver" '$1==v && $2=="main" && $4=="online"' | grep -q .; then
    pg_ctlcluster "$ver" main start
  fi
  local port
  port="$(pg_lsclusters -h | awk -v v="$ver" '$1==v && $2=="main" {print $3}')"
  PORTOLAN_PG_PORT="$port"
  for _ in $(seq 1 30); do
    if su postgres -c "psql -p $port -Atqc 'select 1'" >/dev/null 2>&1; then break; fi
    sleep 1
  done
  # A superuser-ish role that may create databases; password auth over TCP (md5/scram is the
  # Debian default for host 127.0.0.1/32 lines in pg_hba.conf).
  su postgres -c "psql -p $port -v ON_ERROR_STOP=1 -Atq" <<SQL
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$PORTOLAN_PG_USER') THEN
    CREATE ROLE $PORTOLAN_PG_USER LOGIN CREATEDB PASSWORD '$PORTOLAN_PG_PASS';
  ELSE
    ALTER ROLE $PORTOLAN_PG_USER LOGIN CREATEDB PASSWORD '$PORTOLAN_PG_PASS';
  END IF;
END
\$\$;
SQL
  # Enough connections for parallel test processes (each test opens a small pool).
  local maxconn
  maxconn="$(su postgres -c "psql -p $port -Atqc 'show max_connections'")"
  if [ "${maxconn:-0}" -lt 300 ]; then
    su postgres -c "psql -p $port -Atqc 'alter system set max_connections = 300'" >/dev/null
    pg_ctlcluster "$ver" main restart
    for _ in $(seq 1 30); do
      if su postgres -c "psql -p $port -Atqc 'select 1'" >/dev/null 2>&1; then break; fi
      sleep 1
    done
  fi
}

portolan_pg_setup
if PGPASSWORD="$PORTOLAN_PG_PASS" psql -h 127.0.0.1 -p "$PORTOLAN_PG_PORT" -U "$PORTOLAN_PG_USER" -d postgres -Atqc 'select 1' >/dev/null 2>&1; then
  export PORTOLAN_TEST_PG="postgres://$PORTOLAN_PG_USER:$PORTOLAN_PG_PASS@127.0.0.1:$PORTOLAN_PG_PORT/postgres"
  echo "20-postgres: PORTOLAN_TEST_PG=$PORTOLAN_TEST_PG"
else
  echo "20-postgres: PostgreSQL is not reachable on 127.0.0.1:$PORTOLAN_PG_PORT; PG tests will skip (or fail under CI=true)"
fi
unset -f portolan_pg_setup
