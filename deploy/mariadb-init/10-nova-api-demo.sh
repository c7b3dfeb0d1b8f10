# Loads the demo nova_api into the `mariadb` service of docker-compose.yaml (profile "demo").
#
# The official mariadb image's entrypoint sources this file (it is not executable) once, on the
# first start with an empty data volume, after it has created MARIADB_USER; sourcing gives it
# the entrypoint's docker_process_sql, which runs SQL from stdin as root over the local socket.
# The demo files are mounted outside /docker-entrypoint-initdb.d, so the entrypoint does not
# load them on its own, in name order and into no database: here the schema loads first.
#
# The same steps as `python -m nova_flavor_sync.demo` (create_nova_api_database): the database
# with Nova's default character set, the real Nova 34 schema, then the demo cloud.
# tests/deploy/test_compose.py runs this file against the local MariaDB.

nova_demo_database="${NOVA_DEMO_DATABASE:-nova_api}"
nova_demo_dir="${NOVA_DEMO_DIR:-/nova-flavor-sync-demo}"

echo "nova-flavor-sync: creating database ${nova_demo_database} for ${MARIADB_USER:?MARIADB_USER must be set}"
docker_process_sql <<SQL
CREATE DATABASE \`${nova_demo_database}\` CHARACTER SET utf8mb3 COLLATE utf8mb3_general_ci;
GRANT ALL PRIVILEGES ON \`${nova_demo_database}\`.* TO '${MARIADB_USER}'@'%';
SQL

echo "nova-flavor-sync: loading ${nova_demo_dir}/nova_api_schema.sql"
docker_process_sql --database="${nova_demo_database}" <"${nova_demo_dir}/nova_api_schema.sql"

echo "nova-flavor-sync: loading ${nova_demo_dir}/nova_api_demo_data.sql.gz"
gunzip -c "${nova_demo_dir}/nova_api_demo_data.sql.gz" | docker_process_sql --database="${nova_demo_database}"

echo "nova-flavor-sync: demo nova_api ready: $(
    docker_process_sql --database="${nova_demo_database}" --skip-column-names \
        <<<'SELECT CONCAT(COUNT(*), " request specs") FROM request_specs'
)"
