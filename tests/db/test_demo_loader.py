"""The demo loader replays the real Nova dumps faithfully into a new database."""

from __future__ import annotations

import json

import pytest

from dbtools import connect, db_params, new_database_name, table_hash
from nova_flavor_sync.demo import create_demo_cloud, create_nova_api_database, drop_database, load_sample_specs

pytestmark = pytest.mark.db


def count(params, sql: str) -> int:
    with connect(params) as conn, conn.cursor() as cur:
        cur.execute(sql, (params.database,) if "%s" in sql else None)
        return cur.fetchone()[0]


@pytest.fixture
def loaded(server_kwargs):
    """A database made by the loader itself (not the fixtures' copy), with the demo data."""
    name = new_database_name()
    create_nova_api_database(server_kwargs, name, with_demo_data=True)
    yield db_params(server_kwargs, name)
    drop_database(server_kwargs, name)


def test_the_schema_has_the_32_nova_api_tables_and_no_rows(nova_db):
    tables = "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = %s"
    assert count(nova_db, tables) == 32
    assert count(nova_db, "SELECT COUNT(*) FROM request_specs") == 0


def test_the_demo_data_loads_every_row_and_every_spec_byte(loaded):
    assert count(loaded, "SELECT COUNT(*) FROM flavors") == 22
    assert count(loaded, "SELECT COUNT(*) FROM flavor_extra_specs") == 156
    with connect(loaded) as conn, conn.cursor() as cur:
        cur.execute("SELECT spec FROM request_specs")
        specs = [spec for (spec,) in cur.fetchall()]
    assert len(specs) == 1500
    # Nova writes json.dumps() output; a byte changed by loading would break the round trip.
    assert all(json.dumps(json.loads(spec)) == spec for spec in specs)


def test_the_fixtures_copy_equals_a_real_load(loaded, demo_db):
    for table in ("request_specs", "flavors", "flavor_extra_specs", "flavor_projects"):
        assert table_hash(demo_db, table, columns="*") == table_hash(loaded, table, columns="*")


def test_an_existing_database_is_refused_unless_replaced(server_kwargs, nova_db):
    with pytest.raises(ValueError, match=f"database '{nova_db.database}' already exists"):
        create_nova_api_database(server_kwargs, nova_db.database, with_demo_data=False)
    assert count(nova_db, "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = %s") == 32

    with connect(nova_db) as conn, conn.cursor() as cur:
        cur.execute("DROP TABLE request_specs")
    create_nova_api_database(server_kwargs, nova_db.database, with_demo_data=False, replace=True)
    assert count(nova_db, "SELECT COUNT(*) FROM request_specs") == 0


@pytest.mark.parametrize(
    "name",
    ["", "nova-api", "x; DROP DATABASE mysql", "a`b", "x" * 65, "nova\n"],
    ids=["empty", "dash", "injection", "backtick", "too-long", "trailing-newline"],
)
def test_a_name_that_is_not_a_plain_identifier_is_refused(server_kwargs, name):
    with pytest.raises(ValueError, match="bad database name"):
        create_nova_api_database(server_kwargs, name, with_demo_data=False)


def test_the_sample_has_19_rows_with_real_specs():
    rows = load_sample_specs()
    assert len(rows) == 19
    assert all(json.dumps(json.loads(r["spec"])) == r["spec"] for r in rows)


@pytest.fixture
def cloud(server_kwargs):
    """The whole demo cloud made by the loader: the API database and its three cells."""
    name = new_database_name()
    cells = create_demo_cloud(server_kwargs, name)
    yield db_params(server_kwargs, name), cells
    for database in [name, *cells.values()]:
        drop_database(server_kwargs, database)


def test_the_demo_cloud_has_three_cells_mapped_to_their_databases(cloud, server_kwargs):
    api, cells = cloud
    assert cells == {cell: f"{api.database}_{cell}" for cell in ("cell0", "cell1", "cell2")}
    instances = {cell: count(db_params(server_kwargs, database), "SELECT COUNT(*) FROM instances")
                 for cell, database in cells.items()}
    assert instances == {"cell0": 30, "cell1": 884, "cell2": 576}
    with connect(api) as conn, conn.cursor() as cur:
        cur.execute("SELECT name, database_connection FROM cell_mappings ORDER BY id")
        urls = dict(cur.fetchall())
    host = f"{server_kwargs['host']}:{server_kwargs['port']}"
    assert urls["cell0"] == f"mysql+pymysql://{server_kwargs['user']}:@{host}/{cells['cell0']}?charset=utf8"
    assert urls["cell1"] == f"mysql+pymysql://{server_kwargs['user']}:@{host}/{cells['cell1']}?charset=utf8"
    # cell2 stays a template, filled from [database] connection as Nova does; only its database moved
    assert urls["cell2"] == "{scheme}://{username}:{password}@{hostname}:{port}/" + cells["cell2"] + "?charset=utf8"
    # every instance_extra.flavor byte as Nova wrote it
    with connect(db_params(server_kwargs, cells["cell1"])) as conn, conn.cursor() as cur:
        cur.execute("SELECT flavor FROM instance_extra")
        flavors = [text for (text,) in cur.fetchall()]
    assert len(flavors) == 884 and all(json.dumps(json.loads(text)) == text for text in flavors)
