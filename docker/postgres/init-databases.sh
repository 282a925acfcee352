#!/bin/bash
# Runs once, when the PostgreSQL volume is empty: one database and one owner per service.
# Passwords come from the container's environment (docker/.env), never from this file.
set -euo pipefail

create_db() {
    local user="$1" password="$2" db="$3"
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
        --set=user="$user" --set=password="$password" --set=db="$db" <<'SQL'
CREATE ROLE :"user" LOGIN PASSWORD :'password';
CREATE DATABASE :"db" OWNER :"user";
SQL
}

create_db airflow "${AIRFLOW_DB_PASSWORD:?}" airflow
create_db mlflow "${MLFLOW_DB_PASSWORD:?}" mlflow
