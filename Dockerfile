# The Airflow image that docker-compose.yaml runs: the official image plus this project's engine.
# Build: docker compose build (or: docker build -t nova-flavor-sync-airflow .)

# The official image of the Airflow version pyproject.toml pins, on the Python the lock was made
# for (tests/deploy/test_compose.py checks both). It already holds Airflow, its constraints, and
# the default providers (mysql, standard, fab, celery, postgres...) with mysqlclient built.
FROM apache/airflow:3.3.2-python3.11

# pip runs as the image's airflow user, as the image's docs require (never as root).
USER airflow

# The providers and the driver at exactly the versions requirements.lock pins (the versions the
# tests ran with). The image may hold other versions: pip replaces only those. Naming
# apache-airflow at the image's own version ($AIRFLOW_VERSION, set by the image) stops pip from
# upgrading or downgrading Airflow itself. PyMySQL and orjson are the engine's dependencies
# (the mysql provider depends on PyMySQL too). tests/deploy checks these pins against the lock.
RUN pip install --no-cache-dir \
        "apache-airflow==${AIRFLOW_VERSION}" \
        apache-airflow-providers-mysql==6.7.1 \
        apache-airflow-providers-standard==1.21.0 \
        PyMySQL==1.1.3 \
        orjson==3.13.0

# Only what building the package needs: its metadata and its source (the engine, and the demo
# schema and data it ships as package data). dags/ and plugins/ are mounted by the compose file.
COPY --chown=airflow:0 pyproject.toml /tmp/nova-flavor-sync/
COPY --chown=airflow:0 include/ /tmp/nova-flavor-sync/include/

# The engine (nova_flavor_sync and the nova-flavor-sync command) as an ordinary, non-editable
# install; --no-deps: its dependencies were settled above, so nothing else can move.
RUN pip install --no-cache-dir --no-deps /tmp/nova-flavor-sync && rm -rf /tmp/nova-flavor-sync

# Where the DAGs keep plans and backups (NOVA_FLAVOR_SYNC_DIR in the compose file). Made here,
# private to the airflow user, so a new named volume mounted on it starts with that owner and mode.
RUN mkdir -m 0700 /opt/airflow/nova-flavor-sync
