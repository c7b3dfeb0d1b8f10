# Loads the demo cloud into the `mariadb` service of docker-compose.yaml (profile "demo"):
# its nova_api and its three cell databases, with cell_mappings pointing at them.
#
# The official mariadb image's entrypoint sources this file (it is not executable) once, on the
# first start with an empty data volume, after it has created MARIADB_USER; sourcing gives it
# the entrypoint's docker_process_sql, which runs SQL from stdin as root over the local socket.
# The demo files are mounted outside /docker-entrypoint-initdb.d, so the entrypoint does not
# load them on its own, in name order and into no database: here each schema loads first.
#
# The same steps as `python -m nova_flavor_sync.demo` (create_demo_cloud): each database with
# Nova's default character set, the real Nova 34 schemas, the demo cloud's rows; the cells are
# <nova_api>_cell0 to _cell2, and a plain cell_mappings URL gets this server as the Airflow
# containers reach it (NOVA_DEMO_HOST:NOVA_DEMO_PORT) with MARIADB_USER's password, while the
# template (cell2's) keeps its {placeholders}, filled from the nova_database Connection as Nova
# fills it from [database] connection. tests/deploy/test_compose.py runs this file against the
# local MariaDB.

nova_demo_database="${NOVA_DEMO_DATABASE:-nova_api}"
nova_demo_dir="${NOVA_DEMO_DIR:-/nova-flavor-sync-demo}"
nova_demo_host="${NOVA_DEMO_HOST:-mariadb}"
nova_demo_port="${NOVA_DEMO_PORT:-3306}"

nova_demo_create() {  # database name
    echo "nova-flavor-sync: creating database $1 for ${MARIADB_USER:?MARIADB_USER must be set}"
    docker_process_sql <<SQL
CREATE DATABASE \`$1\` CHARACTER SET utf8mb3 COLLATE utf8mb3_general_ci;
GRANT ALL PRIVILEGES ON \`$1\`.* TO '${MARIADB_USER}'@'%';
SQL
}

nova_demo_create "${nova_demo_database}"
echo "nova-flavor-sync: loading ${nova_demo_dir}/nova_api_schema.sql"
docker_process_sql --database="${nova_demo_database}" <"${nova_demo_dir}/nova_api_schema.sql"
echo "nova-flavor-sync: loading ${nova_demo_dir}/nova_api_demo_data.sql.gz"
gunzip -c "${nova_demo_dir}/nova_api_demo_data.sql.gz" | docker_process_sql --database="${nova_demo_database}"

for nova_demo_cell in cell0 cell1 cell2; do
    nova_demo_create "${nova_demo_database}_${nova_demo_cell}"
    echo "nova-flavor-sync: loading nova_cell_schema.sql and nova_${nova_demo_cell}_demo_data.sql.gz"
    docker_process_sql --database="${nova_demo_database}_${nova_demo_cell}" <"${nova_demo_dir}/nova_cell_schema.sql"
    gunzip -c "${nova_demo_dir}/nova_${nova_demo_cell}_demo_data.sql.gz" \
        | docker_process_sql --database="${nova_demo_database}_${nova_demo_cell}"
done

# The dump's mappings name nova_cell0..2 on 127.0.0.1 (Nova's defaults): point them here.
echo "nova-flavor-sync: pointing cell_mappings at ${nova_demo_host}:${nova_demo_port}"
docker_process_sql --database="${nova_demo_database}" <<SQL
UPDATE cell_mappings SET database_connection = IF(
    database_connection LIKE '%{%',
    REPLACE(database_connection, CONCAT('/nova_', name, '?'), CONCAT('/${nova_demo_database}_', name, '?')),
    CONCAT('mysql+pymysql://${MARIADB_USER}:${MARIADB_PASSWORD:?MARIADB_PASSWORD must be set}@',
           '${nova_demo_host}:${nova_demo_port}/${nova_demo_database}_', name, '?charset=utf8'));
SQL

echo "nova-flavor-sync: demo cloud ready: $(
    docker_process_sql --database="${nova_demo_database}" --skip-column-names \
        <<<'SELECT CONCAT(COUNT(*), " request specs") FROM request_specs'
), $(
    docker_process_sql --database="${nova_demo_database}_cell1" --skip-column-names \
        <<<'SELECT CONCAT(COUNT(*), " instance copies in cell1") FROM instance_extra'
)"
