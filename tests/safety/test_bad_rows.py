"""Rows the tool must not touch: each reported with its id and reason, the run goes on.

Each case puts one bad row (or flavor) into the demo cloud, runs the real CLI with
``--run --all-keys``, and checks: the exit code, the message naming the row, that the bad
row is byte-for-byte unchanged, and that every other stale row was still fixed.
"""

from __future__ import annotations

import json
import re

import pytest

from dbtools import connect, map_instances
from nova_flavor_sync import cli, service
from nova_flavor_sync.errors import ExitCode

pytestmark = pytest.mark.db
BAD_ID = 99001
UUID = "0badc0de-0000-4000-8000-000000000001"


def a_stale_spec(params) -> dict:
    """A real stale spec of the demo cloud, parsed (row with the lowest id that the plan changes)."""
    with service.connect(params) as db:
        flavors, scope = service.resolve_scope(db, all_keys=True)
        row_id = service.make_plan(db, scope, flavors=flavors).changes[0].id
        return json.loads(db.read_specs([row_id])[row_id][1])


def flavor_data(document: dict) -> dict:
    return document["nova_object.data"]["flavor"]["nova_object.data"]


def put_row(params, text: str) -> None:
    with connect(params) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO request_specs (id, instance_uuid, spec) VALUES (%s, %s, %s)", (BAD_ID, UUID, text))
    map_instances(params, [UUID])  # an instance in cell1, so its RequestSpec is judged


def mutate(change):
    def make(params):
        document = a_stale_spec(params)
        change(document)
        put_row(params, json.dumps(document))
    return make


def raw(text):
    return lambda params: put_row(params, text)


def delete_flavor_of_row(params):
    """A flavor deleted after its instances were made (Nova hard-deletes flavors)."""
    document = a_stale_spec(params)
    put_row(params, json.dumps(document))
    fid = flavor_data(document)["id"]
    with connect(params) as conn, conn.cursor() as cur:
        for table in ("flavor_extra_specs", "flavor_projects"):
            cur.execute(f"DELETE FROM {table} WHERE flavor_id = %s", (fid,))
        cur.execute("DELETE FROM flavors WHERE id = %s", (fid,))


def recreate_flavor_of_row(params):
    """The same flavorid re-created with a new id: the row's copy names the old id."""
    document = a_stale_spec(params)
    old = flavor_data(document)
    put_row(params, json.dumps(document))
    with connect(params) as conn, conn.cursor() as cur:
        cur.execute("SET FOREIGN_KEY_CHECKS = 0")
        cur.execute("UPDATE flavors SET id = 777 WHERE id = %s", (old["id"],))
        cur.execute("UPDATE flavor_extra_specs SET flavor_id = 777 WHERE flavor_id = %s", (old["id"],))


def huge_spec(params):
    """A stale spec too large to send back under max_allowed_packet (16 MiB here)."""
    document = a_stale_spec(params)
    document["nova_object.data"]["image"]["nova_object.data"]["name"] = "x" * (9 * 1024 * 1024)
    put_row(params, json.dumps(document))


CASES = [
    pytest.param(raw("{not json"), ExitCode.INCOMPLETE, "Error", "not valid JSON", id="invalid-json"),
    pytest.param(raw(""), ExitCode.INCOMPLETE, "Error", "not valid JSON", id="empty-spec"),
    pytest.param(raw("[]"), ExitCode.INCOMPLETE, "Error", "not a JSON object", id="json-array"),
    pytest.param(mutate(lambda d: d["nova_object.data"].pop("flavor")), ExitCode.INCOMPLETE, "Error",
                 "has no flavor", id="missing-flavor-object"),
    pytest.param(mutate(lambda d: flavor_data(d).update(extra_specs=["a"])), ExitCode.INCOMPLETE, "Error",
                 "extra_specs is not an object", id="extra-specs-not-a-dict"),
    pytest.param(mutate(lambda d: flavor_data(d)["extra_specs"].update({"quota:cpu_shares": 5})),
                 ExitCode.INCOMPLETE, "Error", "non-string value", id="non-string-value"),
    pytest.param(mutate(lambda d: d.update({"nova_object.version": "2.0"})), ExitCode.INCOMPLETE, "Error",
                 "RequestSpec version '2.0'", id="unknown-requestspec-version"),
    pytest.param(mutate(lambda d: d["nova_object.data"]["flavor"].update({"nova_object.version": "9.9"})),
                 ExitCode.INCOMPLETE, "Error", "Flavor version '9.9'", id="unknown-flavor-version"),
    pytest.param(huge_spec, ExitCode.INCOMPLETE, "Error", "too large for the server's max_allowed_packet",
                 id="huge-spec"),
    pytest.param(delete_flavor_of_row, ExitCode.OK, "Orphan", "no longer exists", id="deleted-flavor"),
    pytest.param(recreate_flavor_of_row, ExitCode.OK, "Orphan", "re-created as id 777", id="recreated-flavor"),
]


@pytest.mark.parametrize(("make_bad", "code", "kind", "reason"), CASES)
def test_a_bad_row_is_reported_and_left_byte_for_byte(demo_db, tmp_path, capsys, make_bad, code, kind, reason):
    make_bad(demo_db)
    with connect(demo_db) as conn, conn.cursor() as cur:
        cur.execute("SELECT spec, updated_at FROM request_specs WHERE id = %s", (BAD_ID,))
        before = cur.fetchone()

    result = cli.main(["--db-url", f"mysql+pymysql://{demo_db.user}@{demo_db.host}:{demo_db.port}/{demo_db.database}",
                       "--run", "--all-keys", "--verbose", "--log-file", str(tmp_path / "log"),
                       "--backup-dir", str(tmp_path / "b")])
    out, err = capsys.readouterr()

    assert result == code, out + err
    assert re.search(rf"{kind}: row {BAD_ID}( \({UUID}\))?.*{re.escape(reason)}", out), out
    with connect(demo_db) as conn, conn.cursor() as cur:
        cur.execute("SELECT spec, updated_at FROM request_specs WHERE id = %s", (BAD_ID,))
        assert cur.fetchone() == before
    left = 1 if "too large" in reason else 0  # a row too large to write stays stale
    assert f"Verify: {left} flavor copies still out of sync" in out  # the run went on and fixed the rest


def test_a_4_byte_character_cannot_reach_a_flavor_value(demo_db):
    """The tables are utf8mb3: MariaDB refuses the value, so no flavor can hold one."""
    import pymysql

    with connect(demo_db) as conn, conn.cursor() as cur, pytest.raises(pymysql.err.DataError):
        cur.execute("SET SESSION sql_mode = 'STRICT_ALL_TABLES'")
        cur.execute("UPDATE flavor_extra_specs SET value = %s LIMIT 1", ("\U0001f600",))


def test_a_4_byte_character_escaped_in_a_spec_is_synced_exactly(demo_db, tmp_path):
    document = a_stale_spec(demo_db)
    flavor_data(document)["extra_specs"]["aggregate_instance_extra_specs:note"] = "\U0001f600"
    put_row(demo_db, json.dumps(document))  # stored as the ASCII escape \ud83d\ude00, as Nova does
    with service.connect(demo_db) as db:
        flavors, scope = service.resolve_scope(db, all_keys=True)
        plan = service.make_plan(db, scope, flavors=flavors)
        assert BAD_ID in {c.id for c in plan.changes}
        service.apply_plan(db, plan)
        text = db.read_specs([BAD_ID])[BAD_ID][1]
    assert text.isascii() and "aggregate_instance_extra_specs:note" not in text
    assert json.dumps(json.loads(text)) == text
