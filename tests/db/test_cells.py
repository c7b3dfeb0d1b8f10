"""Finding and opening every cell of the demo cloud, as Nova maps them (cell2 through a template URL)."""

from __future__ import annotations

import dataclasses

import pytest

from dbtools import SECRET, connect
from nova_flavor_sync.cells import CELL0_UUID, locate_cells, open_cells, parse_cell_urls, read_cell_mappings
from nova_flavor_sync.db import NovaApiDb
from nova_flavor_sync.dburl import read_nova_conf_cell_url
from nova_flavor_sync.errors import ConfigError, DatabaseUnavailableError, SchemaError, UsageError


def url_of(params, database=None) -> str:
    auth = params.user + ":" + (params.password or "")
    return f"mysql+pymysql://{auth}@{params.host}:{params.port}/{database or params.database}?charset=utf8"


def mappings_of(cloud):
    with NovaApiDb(cloud.api) as api:
        return read_cell_mappings(api)


def test_every_cell_is_found_and_the_template_is_filled_from_database_connection(demo_cloud, tmp_path):
    # nova.conf of a Nova service: [database] connection is its own cell's database.
    conf = tmp_path / "nova.conf"
    conf.write_text(f"[api_database]\nconnection = {url_of(demo_cloud.api)}\n"
                    f"[database]\nconnection = {url_of(demo_cloud.cells['cell1'])}\n")
    mappings = mappings_of(demo_cloud)
    assert [(m.name, m.is_cell0) for m in mappings] == [("cell0", True), ("cell1", False), ("cell2", False)]
    assert mappings[0].uuid == CELL0_UUID

    cells = locate_cells(mappings, template_url=read_nova_conf_cell_url(str(conf)))

    assert [c.params.database for c in cells] == [demo_cloud.cells[n].database for n in ("cell0", "cell1", "cell2")]
    assert cells[2].source == f"cell {mappings[2].label} database_connection filled from [database] connection"
    with open_cells(cells) as opened:
        counts = {cell.mapping.name: opened[cell.mapping.uuid].instance_counts() for cell in cells}
    assert {name: c["total"] for name, c in counts.items()} == {"cell0": 30, "cell1": 884, "cell2": 576}
    assert counts["cell1"]["busy"] > 0 and counts["cell1"]["deleted"] > 0


def test_a_template_without_database_connection_is_refused_naming_the_cell(demo_cloud):
    with pytest.raises(ConfigError, match=r"cell cell2 \(ada1b992-1bb5-5458-b47a-3407ad251e9e\) database_connection "
                                          r"is a template .* give --nova-conf, or --cell-db-url cell2=URL"):
        locate_cells(mappings_of(demo_cloud))


def test_the_operators_url_for_a_cell_wins_by_name_or_uuid(demo_cloud):
    mappings = mappings_of(demo_cloud)
    cell2 = demo_cloud.cells["cell2"]
    by_name = locate_cells(mappings, cell_urls=parse_cell_urls([f"cell2={url_of(cell2)}"]))
    by_uuid = locate_cells(mappings, cell_urls=parse_cell_urls([f"{mappings[2].uuid}={url_of(cell2)}"]))
    assert by_name[2].params == by_uuid[2].params and by_name[2].params.database == cell2.database
    assert by_name[2].source == f"--cell-db-url for cell {mappings[2].label}"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["cell9=mysql+pymysql://u@h/db"], r"--cell-db-url cell9=\.\.\.: no cell has that name or uuid \(cells: cell0"),
        (["mysql+pymysql://u@h/db"], r"must be CELL=URL"),
        (["cell2="], r"must be CELL=URL"),
        (["cell2=mysql+pymysql://u@h/a", "cell2=mysql+pymysql://u@h/b"], r"names cell 'cell2' twice"),
    ],
    ids=["unknown-cell", "no-cell-name", "no-url", "twice"],
)
def test_bad_cell_urls_are_refused(demo_cloud, values, message):
    with pytest.raises(UsageError, match=message):
        locate_cells(mappings_of(demo_cloud), cell_urls=parse_cell_urls(values))


def test_a_password_in_a_bad_cell_url_is_never_shown():
    with pytest.raises(UsageError) as refused:
        parse_cell_urls([f"mysql+pymysql://nova:{SECRET}@db/nova_cell1"])
    assert SECRET not in str(refused.value)


def test_an_unreachable_cell_stops_everything_before_any_write_naming_the_cell(demo_cloud):
    cells = locate_cells(mappings_of(demo_cloud), cell_urls={"cell2": url_of(demo_cloud.cells["cell2"])})
    cells[1] = dataclasses.replace(cells[1], params=dataclasses.replace(cells[1].params, port=1))
    with pytest.raises(DatabaseUnavailableError, match=r"^cell cell1 \(835ce9b0-6a5b-5709-b701-5eb36f22fdca\): "
                                                       r"cannot connect to mysql\+pymysql://"):
        with open_cells(cells):
            pytest.fail("opened a cloud with a cell that cannot be reached")


def test_a_database_that_is_not_a_cell_is_refused_naming_the_cell(demo_cloud):
    # cell1 pointed at the API database by mistake
    cells = locate_cells(mappings_of(demo_cloud), cell_urls={"cell1": url_of(demo_cloud.api),
                                                            "cell2": url_of(demo_cloud.cells["cell2"])})
    with pytest.raises(SchemaError, match=r"^cell cell1 \(.*\): .* is not a Nova cell database this tool can use: "
                                          r"missing table instances, table instance_extra"):
        with open_cells(cells):
            pass


def test_no_cell_mappings_at_all_is_refused(demo_cloud):
    with connect(demo_cloud.api) as conn, conn.cursor() as cur:
        cur.execute("UPDATE instance_mappings SET cell_id = NULL")
        cur.execute("DELETE FROM cell_mappings")
    with pytest.raises(ConfigError, match="nova_api has no cell_mappings"):
        locate_cells(mappings_of(demo_cloud))


def test_a_template_filled_without_a_password_says_why_it_is_refused(demo_cloud):
    """Nova fills ``user@host`` with the password text None: an operator should not have to know that."""
    api = demo_cloud.api
    cells = locate_cells(mappings_of(demo_cloud), template_url=f"mysql+pymysql://{api.user}@{api.host}:{api.port}/nova")
    assert cells[2].params.password == "None"
    with pytest.raises(DatabaseUnavailableError) as refused:
        with open_cells(cells):
            pytest.fail("opened a cell with the password 'None'")
    message = str(refused.value)
    assert message.startswith("cell cell2 (ada1b992-1bb5-5458-b47a-3407ad251e9e): cannot connect to "), message
    assert message.endswith("which gives the password the text 'None': give the password there "
                            "(user:password@host, or user:@host for an empty one), or this cell's own URL"), message
    assert "root:None@" not in message  # masked, as every URL in a message
