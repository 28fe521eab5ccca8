#!/bin/bash
# Run once by the official postgres image when it creates the primary's data (docker-entrypoint-initdb.d):
# the databases of the project (a URL names a database that must exist), and what the streaming replica needs:
# a replication role, its physical slot, and a pg_hba line for replication connections (the image's own
# "host all all all scram-sha-256" does not cover them).
set -euo pipefail

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
     -v password="$REPLICATION_PASSWORD" -v slot="${REPLICATION_SLOT:-replica1}" <<'SQL'
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD :'password';
SELECT pg_create_physical_replication_slot(:'slot');
SQL

for database in ${GATEHOUSE_DATABASE_NAMES:-shop}; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -c "CREATE DATABASE \"$database\""
done

echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
