"""The Airflow environment of the tests under tests/airflow: never the user's ~/airflow.

Airflow reads its configuration, and sets up its metadata-DB engine, when ``airflow`` is
first imported, so everything is set here, at import time: pytest imports this file before
the test modules of this directory, and no other code of the test suite imports Airflow.

- ``AIRFLOW_HOME``: a new temporary directory per pytest session, removed at exit;
- the metadata DB: SQLite in that directory (no server, nothing shared between sessions);
- ``dags/`` and ``plugins/`` of this checkout as the DAG and plugin folders;
- no example DAGs; a random JWT secret (the in-process API otherwise makes one and warns).

Every ``AIRFLOW__*`` variable and ``AIRFLOW_CONFIG`` already in the environment are dropped
first, so the user's own Airflow settings cannot leak in. ``[core] unit_test_mode`` is not
set: it swaps the whole configuration for Airflow's own test suite's (LocalExecutor, example
DAGs, Airflow's test DAG folder), which is not what these tests want.

The metadata DB is created on demand by the session fixture ``airflow_db``.

The end-to-end tests that need a real, running Airflow (scripts/local_airflow.py) share one,
``running_airflow``, started once per session: starting one takes 20-60 s and stopping it
10-15 s. What differs between those tests is set per test through the REST API, as an
operator would: the Connections to the test's own database (``airflow_on_demo_db``),
Variables, other Connections. Only the tests of the launcher itself (test_demo.py, ``make
demo``) and of another executor (test_celery_executor.py) start an Airflow of their own.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from demo_airflow import set_connection
from local_airflow import Airflow

from operator_rest import DAG_IDS, end_active_runs, printed_on_failure
from s3tools import bucket, s3_endpoint  # noqa: F401  (the fixtures of every test here that uses S3)

REPO_ROOT = Path(__file__).resolve().parents[2]

if "airflow" in sys.modules:
    raise RuntimeError("Airflow was imported before tests/airflow/conftest.py could set its environment")

AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="nfs-airflow-"))
atexit.register(shutil.rmtree, AIRFLOW_HOME, ignore_errors=True)

for _name in [n for n in os.environ if n.startswith("AIRFLOW__") or n == "AIRFLOW_CONFIG"]:
    del os.environ[_name]

os.environ.update(
    {
        "AIRFLOW_HOME": str(AIRFLOW_HOME),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{AIRFLOW_HOME / 'airflow.db'}",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
    }
)


@pytest.fixture(scope="session")
def airflow_home() -> Path:
    """The session's temporary AIRFLOW_HOME."""
    return AIRFLOW_HOME


@pytest.fixture(scope="session")
def airflow_db(airflow_home: Path) -> Iterator[Path]:
    """The metadata DB, created once per session (what ``airflow db migrate`` does, in process).

    On an empty database ``initdb()`` creates the tables from the ORM models and stamps the
    Alembic head: about 1.5 s, against about 5 s for ``airflow db migrate`` in a subprocess.
    Yields the SQLite file.
    """
    from airflow.utils.db import initdb

    initdb()
    yield airflow_home / "airflow.db"


@pytest.fixture(scope="session")
def api_app(airflow_db: Path):
    """Airflow's API server app, in process, where the plugins' pages are mounted; built once (about 4 s).

    Only the UI's API (``core``), not the execution API. It reads the settings the pages
    depend on (storage, directories, Connections) on each request, so tests may change them.
    """
    from airflow.api_fastapi.app import create_app

    return create_app(apps="core")


@pytest.fixture
def nova_env(demo_db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, airflow_db: Path):
    """The demo database as the ``nova_api_db`` Connection, plans and backups under tmp_path.

    The REST API in these tests lets every request in as admin (SimpleAuthManager).
    """
    auth = demo_db.user + (f":{demo_db.password}" if demo_db.password else "")
    uri = f"mysql://{auth}@{demo_db.host}:{demo_db.port}/{demo_db.database}"
    monkeypatch.setenv("AIRFLOW_CONN_NOVA_API_DB", uri)
    # Nova's [database] connection as a Connection (the demo's cell2 is a template filled from
    # it), not the environment the demo_db fixture sets: the DAGs must use the Connection.
    monkeypatch.setenv("AIRFLOW_CONN_NOVA_DATABASE", uri.rsplit("/", 1)[0] + "/nova")
    monkeypatch.delenv("NOVA_DATABASE_CONNECTION")
    monkeypatch.setenv("NOVA_FLAVOR_SYNC_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "True")
    return demo_db


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that use the shared running Airflow run last in the session, one after another.

    A session fixture is stopped only at the end of the session; run last, it is started when
    the first of them runs and stopped right after the last, instead of running idle (four
    polling processes, on 2 cores) under the other tests: the Celery and demo tests' own
    Airflows, the Galera cluster, the timing-sensitive tests. They do not depend on the order.
    """
    users = [item for item in items if "running_airflow" in getattr(item, "fixturenames", ())]
    if users:
        last = {id(item) for item in users}
        items[:] = [item for item in items if id(item) not in last] + users


@pytest.fixture(scope="session")
def running_airflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Airflow]:
    """One running Airflow (LocalExecutor, SQLite) for the session's end-to-end tests; always stopped.

    Its DAGs are parsed and unpaused, except the nightly drift check (unpaused, it would start
    its latest nightly run at once): a test that runs it unpauses it. Plans and backups go to
    ``operator_rest.data_dir(running_airflow)``, shared by the tests: each finds its own by its
    run's XComs.
    """
    base = tmp_path_factory.mktemp("running-airflow")
    running = Airflow(base / "airflow-home", base / "airflow-logs", env={"NOVA_FLAVOR_SYNC_DIR": str(base / "data")})
    try:
        with printed_on_failure(running):
            running.start(timeout=300)  # minutes on a loaded 2-core machine
            running.rest.wait_for_dags(*DAG_IDS)
            for dag_id in ("nova_flavor_sync", "nova_flavor_restore"):
                running.rest.unpause(dag_id)
        yield running
    finally:
        survivors = running.stop()
        print(f"\nthe shared airflow stopped in {running.timings['stop_s']:.1f} s")
    assert not survivors, f"still running after stop(): {survivors}"


@pytest.fixture
def airflow_on_demo_db(running_airflow: Airflow, demo_db) -> Iterator[Airflow]:
    """The shared running Airflow, its ``nova_api_db`` and ``nova_database`` Connections on this test's ``demo_db``.

    No run of an earlier test is left to hold this one's back (the sync DAG has
    max_active_runs=1), nor one of this test's to touch the next test's database.
    """
    end_active_runs(running_airflow.rest)
    set_connection(running_airflow, demo_db)
    yield running_airflow
    end_active_runs(running_airflow.rest)
