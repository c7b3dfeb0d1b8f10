"""db.py against the real schema: schema check, connection errors, keyset reading."""

from __future__ import annotations

import dataclasses

import psutil
import pytest

from dbtools import connect
from nova_flavor_sync import service
from nova_flavor_sync.backup import API_DATABASE
from nova_flavor_sync.db import NovaApiDb, _aggregated_extra_specs, _extra_specs_by_rows
from nova_flavor_sync.dburl import parse_db_url
from nova_flavor_sync.diff import merge_plans
from nova_flavor_sync.errors import DatabaseUnavailableError, ExitCode, SchemaError
from nova_flavor_sync.plan_worker import PlanContext, PlanJob, PlanWorkerError, PlanWorkers, split_ids

pytestmark = pytest.mark.db


def test_the_real_nova_api_schema_passes_the_check(nova_db):
    with service.connect(nova_db) as db:
        assert db.load_flavors() == {}


@pytest.mark.parametrize(
    ("ddl", "missing"),
    [
        ("DROP TABLE request_specs", "table request_specs"),
        ("DROP TABLE instance_mappings", "table instance_mappings"),
        ("ALTER TABLE request_specs DROP COLUMN updated_at", "column request_specs.updated_at"),
        ("ALTER TABLE flavor_extra_specs DROP COLUMN value", "column flavor_extra_specs.value"),
    ],
    ids=["no-request_specs", "no-instance_mappings", "no-updated_at", "no-extra-spec-value"],
)
def test_a_missing_table_or_column_is_refused_by_name(nova_db, ddl, missing):
    with connect(nova_db) as conn, conn.cursor() as cur:
        cur.execute("SET FOREIGN_KEY_CHECKS = 0")
        cur.execute(ddl)
    with pytest.raises(SchemaError, match=f"not a nova_api database.*missing.*{missing}") as caught:
        service.connect(nova_db)
    assert caught.value.exit_code == ExitCode.REFUSED


def test_a_wrong_password_is_refused_without_showing_it(nova_db):
    secret = "S3cret-pass-do-not-print"
    bad = dataclasses.replace(nova_db, user="nfs_nobody", password=secret)
    with pytest.raises(DatabaseUnavailableError, match="cannot connect to .*nfs_nobody:\\*\\*\\*@") as caught:
        service.connect(bad)
    assert secret not in str(caught.value) and secret not in repr(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_an_unknown_database_and_a_closed_port_are_refused(nova_db):
    with pytest.raises(DatabaseUnavailableError, match="Unknown database"):
        service.connect(dataclasses.replace(nova_db, database="nfs_no_such_db"))
    with pytest.raises(DatabaseUnavailableError, match="cannot connect to .*:1/"):
        NovaApiDb(dataclasses.replace(nova_db, host="127.0.0.1", port=1), connect_timeout=2).open()


def test_keyset_pages_read_every_row_once_in_id_order(demo_db):
    with service.connect(demo_db) as db:
        small = [(r.id, r.instance_uuid, r.spec) for r in db.iter_spec_rows(page_size=7)]
        large = [(r.id, r.instance_uuid, r.spec) for r in db.iter_spec_rows(page_size=5000)]
    assert small == large and len(small) == 1500
    assert [i for i, *_ in small] == sorted({i for i, *_ in small})


@pytest.mark.parametrize("workers", [2, 3])
def test_plan_workers_make_exactly_the_plan_one_process_makes(demo_db, workers):
    with connect(demo_db) as conn, conn.cursor() as cur:  # one row that is not ASCII
        cur.execute("UPDATE request_specs SET spec = CONCAT(spec, ' ubuntü') WHERE id = 3")
    seen = []
    with service.connect(demo_db) as db:
        flavors, scope = service.resolve_scope(db, all_keys=True)
        alone = service.plan_copy(db, [], API_DATABASE, scope, flavors=flavors, workers=1).plan
        together = service.plan_copy(db, [], API_DATABASE, scope, flavors=flavors, workers=workers,
                                     progress=lambda done, expected: seen.append((done, expected))).plan
    assert together.digest == alone.digest and list(together.changes) == list(alone.changes)
    assert together.summary() == alone.summary() and together.errors == alone.errors
    assert together.errors and together.orphans == alone.orphans and together.rows_read == 1500
    assert seen[-1] == (1500, 1500)
    assert not psutil.Process().children()  # every worker has exited


def test_a_plan_worker_that_fails_raises_a_clear_error_without_secrets(demo_db):
    secret = "S3cret-pass-do-not-print"
    with service.connect(demo_db) as db:
        flavors, scope = service.resolve_scope(db)
        db.params = dataclasses.replace(demo_db, user="nfs_nobody", password=secret)
        with pytest.raises(PlanWorkerError, match="cannot connect to .*nfs_nobody:\\*\\*\\*@") as caught:
            service.plan_copy(db, [], API_DATABASE, scope, flavors=flavors, left_alone={}, workers=2)
    assert secret not in str(caught.value) and caught.value.exit_code == ExitCode.REFUSED
    assert not psutil.Process().children()


def test_a_table_is_read_in_id_ranges_without_gaps_or_overlaps(demo_db):
    with service.connect(demo_db) as db:
        ranges = split_ids(db.spec_id_bounds(), 3)
        parts = [[r.id for r in db.iter_spec_rows(page_size=7, id_range=ids)] for ids in ranges]
        every = [r.id for r in db.iter_spec_rows()]
    assert sum(parts, []) == every and all(parts)
    assert split_ids((5, 6), 4) == [(5, 5), (6, 6)] and split_ids((1, 10), 1) == [(1, 10)]


def test_rows_carry_queued_for_delete_from_instance_mappings(demo_db):
    with connect(demo_db) as conn, conn.cursor() as cur:
        cur.execute("SELECT instance_uuid FROM request_specs ORDER BY id LIMIT 2")
        (queued,), (kept,) = cur.fetchall()
        cur.execute("UPDATE instance_mappings SET queued_for_delete = (instance_uuid = %s) "
                    "WHERE instance_uuid IN (%s, %s)", (queued, queued, kept))
    with service.connect(demo_db) as db:
        flags = {r.instance_uuid: r.left_alone for r in db.iter_spec_rows(page_size=2)}
    assert flags[queued] == "instance is queued for delete" and flags[kept] == ""


def test_flavors_are_loaded_with_their_extra_specs(demo_db):
    with service.connect(demo_db) as db:
        flavors = db.load_flavors()
        identity = db.server_identity()
    assert len(flavors) == 22
    assert sum(len(f.extra_specs) for f in flavors.values()) == 156
    assert identity["schema"] == demo_db.database and identity["server_hostname"]


# Extra specs a JSON aggregate must escape: quotes, backslashes, control characters, text
# that looks like a JSON escape, non-ASCII, empty and NULL values.
AWKWARD_SPECS = {
    'a"quote': 'say "hi"', "back\\slash": "C:\\path\\", "tab\tkey": "new\nline", "ctl": "\x01\x1f",
    "looks:escaped": "\\u0041 \\n", "zürich": "zürich-1 中", "empty": "", "no:value": None,
}


def test_flavors_are_loaded_with_extra_specs_exactly_as_their_rows_hold_them(nova_db):
    with connect(nova_db) as conn, conn.cursor() as cur:
        cur.executemany("INSERT INTO flavors (id, name, memory_mb, vcpus, swap, flavorid, rxtx_factor, root_gb, "
                        "ephemeral_gb, disabled, is_public) VALUES (%s, %s, 512, 1, 0, %s, 1, 1, 0, 0, 1)",
                        [(1, "awkward", "f-1"), (2, "bare", "f-2"), (3, "plain", "f-3")])
        cur.executemany("INSERT INTO flavor_extra_specs (flavor_id, `key`, value) VALUES (%s, %s, %s)",
                        [(1, key, value) for key, value in AWKWARD_SPECS.items()] + [(3, "hw:cpu_policy", "shared")])
    with service.connect(nova_db) as db:
        flavors = db.load_flavors()
        with db.conn.cursor() as cur:
            by_rows = _extra_specs_by_rows(cur)
            aggregated = _aggregated_extra_specs(cur)
    assert flavors[1].extra_specs == AWKWARD_SPECS and list(flavors[1].extra_specs) == sorted(AWKWARD_SPECS)
    assert flavors[2].extra_specs == {} and flavors[3].extra_specs == {"hw:cpu_policy": "shared"}
    assert aggregated == by_rows == {1: AWKWARD_SPECS, 3: {"hw:cpu_policy": "shared"}}


def test_a_url_asking_for_tls_is_refused_by_a_server_without_it(nova_db):
    """PyMySQL would quietly go on in clear text; the tool refuses instead (have_ssl=DISABLED here)."""
    with connect(nova_db) as conn, conn.cursor() as cur:
        cur.execute("SELECT @@have_ssl")
        if cur.fetchone()[0] == "YES":
            pytest.skip("this server offers TLS")
    url = f"mysql+pymysql://{nova_db.user}@{nova_db.host}:{nova_db.port}/{nova_db.database}?ssl=true"
    with pytest.raises(DatabaseUnavailableError, match="is not encrypted, but its settings ask for TLS"):
        service.connect(parse_db_url(url))


def test_plan_workers_with_more_workers_than_ranges_plan_them_and_stop(demo_db, tmp_path):
    with service.connect(demo_db) as db:
        flavors, scope = service.resolve_scope(db, all_keys=True)
        alone = service.make_plan(db, scope, flavors=flavors, left_alone={})
        with PlanWorkers(3) as workers:
            context = PlanContext(flavors, scope, 100, str(tmp_path))
            (plan,) = workers.run(context, [PlanJob(demo_db, db.spec_id_bounds())], left_alone=dict)
    assert merge_plans(scope, [plan]).digest == alone.digest and plan.rows_read == 1500
    assert not psutil.Process().children()  # the two given no range have stopped too
