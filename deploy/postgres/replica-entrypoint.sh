#!/bin/bash
# The streaming replica's entrypoint: the first time (an empty data folder), clone the primary with
# pg_basebackup -R (which writes standby.signal and primary_conninfo), then hand over to the official image's
# entrypoint, which finds the data folder initialized and starts PostgreSQL as a hot standby.
set -euo pipefail
: "${PGDATA:=/var/lib/postgresql/data}"
: "${PRIMARY_HOST:?set PRIMARY_HOST to the address of the primary}"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  mkdir -p "$PGDATA"
  chown postgres:postgres "$PGDATA"
  chmod 700 "$PGDATA"
  export PGPASSWORD="$REPLICATION_PASSWORD"
  until gosu postgres pg_isready --host="$PRIMARY_HOST" --username=replicator --dbname=postgres --quiet; do
    echo "replica: waiting for the primary at $PRIMARY_HOST"
    sleep 1
  done
  echo "replica: cloning $PRIMARY_HOST"
  gosu postgres pg_basebackup --host="$PRIMARY_HOST" --username=replicator --pgdata="$PGDATA" \
    --wal-method=stream --write-recovery-conf --slot="${REPLICATION_SLOT:-replica1}" --checkpoint=fast
  unset PGPASSWORD
fi

exec docker-entrypoint.sh postgres "$@"
