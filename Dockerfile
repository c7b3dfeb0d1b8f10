# The Airflow image that docker-compose.yaml runs: the official image plus this project's engine.
# Build: docker compose build (or: docker build -t nova-flavor-sync-airflow .)

# The official image of the Airflow version pyproject.toml pins, on the Python the lock was made
# for (tests/deploy/test_compose.py checks both). It already holds Airflow, its constraints, and
# the default providers (mysql, standard, fab, celery, postgres...) with mysqlclient built.
FROM apache/airflow:3.3.2-python3.11

# pip runs as the image's airflow user, as the image's docs require (never as root).
USER airflow

# The providers and the driver exactly as requirements.lock pins them (the versions the tests
# ran with), by hash and without resolving anything: scripts/install_lock.py --only installs
# these pins --no-deps --require-hashes, then runs pip check and checks their versions, so a
# new release on the index changes nothing and a missing requirement fails the build. What
# they require beyond these (Airflow itself, the common providers, mysqlclient, the other MySQL
# drivers) is the image's own; tests/deploy lists it. setuptools (the lock's) builds the engine
# below. PyMySQL and orjson are the engine's dependencies (the mysql provider needs PyMySQL too).
COPY --chown=airflow:0 requirements.lock /tmp/nova-flavor-sync/
COPY --chown=airflow:0 scripts/install_lock.py scripts/check_lock.py /tmp/nova-flavor-sync/scripts/
RUN PIP_NO_CACHE_DIR=1 python /tmp/nova-flavor-sync/scripts/install_lock.py --only \
        setuptools,apache-airflow-providers-mysql,apache-airflow-providers-standard,PyMySQL,orjson

# Only what building the package needs: its metadata and its source (the engine, and the demo
# schema and data it ships as package data). dags/ and plugins/ are mounted by the compose file.
COPY --chown=airflow:0 pyproject.toml /tmp/nova-flavor-sync/
COPY --chown=airflow:0 include/ /tmp/nova-flavor-sync/include/

# The engine (nova_flavor_sync and the nova-flavor-sync command) as an ordinary, non-editable
# install: --no-deps, its dependencies were installed above; built with the setuptools installed
# above (--no-build-isolation, or pip would fetch one from the index). pip check: nothing broke.
RUN pip install --no-cache-dir --no-deps --no-build-isolation --check-build-dependencies /tmp/nova-flavor-sync \
    && pip check && rm -rf /tmp/nova-flavor-sync

# Where the DAGs keep plans and backups (NOVA_FLAVOR_SYNC_DIR in the compose file). Made here,
# private to the airflow user, so a new named volume mounted on it starts with that owner and mode.
RUN mkdir -m 0700 /opt/airflow/nova-flavor-sync
