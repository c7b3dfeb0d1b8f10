"""Fixtures for tests that use the real MariaDB (never mocked).

Every test gets its own database, ``nfs_test_<hex>``, with the real nova_api schema, dropped
afterwards even when the test fails. The demo data is loaded from its dump once per session
into a template database and copied into each test's fresh schema with INSERT ... SELECT,
which is several times faster than replaying the dump.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pymysql
import pytest

from dbtools import (
    DemoCloud,
    copy_database,
    copy_rows,
    create_secret_account,
    db_params,
    drop_account,
    new_database_name,
    nova_database_connection,
    server_kwargs_from_env,
    tables_with_rows,
)
from nova_flavor_sync.db import CELL_REQUIRED_COLUMNS
from nova_flavor_sync.dburl import DbParams
from nova_flavor_sync.demo import (
    DEMO_CELLS,
    cell_database_name,
    create_demo_cloud,
    create_nova_api_database,
    drop_database,
    point_cell_mappings,
)

_DB_FIXTURES = {"server_kwargs", "nova_db", "demo_db", "other_demo_db", "secret_account", "demo_cloud"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the database ``db``, so ``-m "not db"`` runs without one.

    And give each test its ``xdist_group``: ``make test`` runs the suite in two processes
    (pytest-xdist, ``--dist loadgroup``), and a group runs whole in one of them. A test file
    is a group (its module fixtures, a Galera cluster say, start once); so are the tests that
    share one running Airflow (``running_airflow``), whatever their file.
    """
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if _DB_FIXTURES.intersection(fixtures):
            item.add_marker(pytest.mark.db)
        if item.get_closest_marker("xdist_group") is None:
            group = "running_airflow" if "running_airflow" in fixtures else item.nodeid.split("::")[0]
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def server_kwargs() -> dict[str, Any]:
    """PyMySQL keyword arguments for the test server (NFS_TEST_DB_* env), checked once."""
    kwargs = server_kwargs_from_env()
    try:
        pymysql.connect(**kwargs, connect_timeout=5).close()
    except pymysql.MySQLError as exc:
        pytest.fail(
            f"MariaDB at {kwargs['host']}:{kwargs['port']} (user {kwargs['user']!r}) does not "
            f"answer: {exc}. Run `make db-up`, or set NFS_TEST_DB_HOST/PORT/USER/PASSWORD.",
            pytrace=False,
        )
    return kwargs


@contextmanager
def _fresh_database(server_kwargs: dict[str, Any], *, demo_data: bool = False) -> Iterator[str]:
    name = new_database_name()
    create_nova_api_database(server_kwargs, name, with_demo_data=demo_data)
    try:
        yield name
    finally:
        drop_database(server_kwargs, name)


@pytest.fixture(scope="session")
def _demo_template(_cloud_template: str, server_kwargs: dict[str, Any]) -> tuple[str, list[str]]:
    """The demo cloud's API database, loaded once: (database name, tables that hold rows)."""
    return _cloud_template, tables_with_rows(server_kwargs, _cloud_template)


@pytest.fixture
def nova_db(server_kwargs: dict[str, Any]) -> Iterator[DbParams]:
    """A fresh database with the real nova_api schema and empty tables."""
    with _fresh_database(server_kwargs) as name:
        yield db_params(server_kwargs, name)


def _demo_copy(server_kwargs, template) -> Iterator[DbParams]:
    """A fresh copy of the demo cloud: its API database, and its cells next to it, mapped to them."""
    source, tables = template
    with _fresh_database(server_kwargs) as name:
        cells = {cell: cell_database_name(name, cell) for cell in DEMO_CELLS}
        try:
            copy_rows(server_kwargs, source, name, tables)
            for cell, database in cells.items():
                # Only the cell tables the tool reads (made LIKE the real ones): 2 tables, not 111,
                # keeps a test's cloud quick to make and to drop. test_demo_loader loads whole cells.
                copy_database(server_kwargs, cell_database_name(source, cell), database, CELL_TABLES)
            point_cell_mappings(server_kwargs, name, cells)
            yield db_params(server_kwargs, name)
        finally:
            for database in cells.values():
                drop_database(server_kwargs, database)


@pytest.fixture
def demo_db(server_kwargs: dict[str, Any], _demo_template, monkeypatch: pytest.MonkeyPatch) -> Iterator[DbParams]:
    """A fresh copy of the demo cloud (22 flavors, 1,500 specs, three cells): its API database.

    Its cell_mappings point at the cells made for this test (``<name>_cell0`` to ``_cell2``);
    cell2's is a template, filled from ``[database] connection`` as Nova fills it: the test's
    environment gives that as NOVA_DATABASE_CONNECTION (the CLI reads it), as an operator would.
    """
    monkeypatch.setenv("NOVA_DATABASE_CONNECTION", nova_database_connection(server_kwargs))
    yield from _demo_copy(server_kwargs, _demo_template)


@pytest.fixture
def other_demo_db(server_kwargs: dict[str, Any], _demo_template) -> Iterator[DbParams]:
    """A second, independent copy of the demo cloud (e.g. for "foreign backup" tests)."""
    yield from _demo_copy(server_kwargs, _demo_template)


@pytest.fixture
def secret_account(demo_db: DbParams) -> Iterator[tuple[str, str]]:
    """A user with password ``dbtools.SECRET`` for the demo database only: (user, URL)."""
    user, url = create_secret_account(demo_db)
    try:
        yield user, url
    finally:
        drop_account(demo_db, user)


CELL_TABLES = sorted(CELL_REQUIRED_COLUMNS)


@pytest.fixture(scope="session")
def _cloud_template(server_kwargs: dict[str, Any]) -> Iterator[str]:
    """The whole demo cloud, loaded once by the loader itself: the template API database's name."""
    name = new_database_name()
    create_demo_cloud(server_kwargs, name)
    try:
        yield name
    finally:
        for database in [name, *(cell_database_name(name, cell) for cell in DEMO_CELLS)]:
            drop_database(server_kwargs, database)


@pytest.fixture
def demo_cloud(server_kwargs: dict[str, Any], _demo_template) -> Iterator[DemoCloud]:
    """Like ``demo_db``, with the cells' databases too."""
    for api in _demo_copy(server_kwargs, _demo_template):
        yield DemoCloud(api, {cell: db_params(server_kwargs, cell_database_name(api.database, cell))
                              for cell in DEMO_CELLS})
