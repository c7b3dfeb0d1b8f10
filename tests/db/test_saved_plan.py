"""A plan saved to a file and applied later by id range (what the Airflow apply tasks do)."""

from __future__ import annotations

import json

import pytest

from dbtools import connect
from nova_flavor_sync import service
from nova_flavor_sync.errors import BackupError
from nova_flavor_sync.plan_file import load_plan, save_plan

pytestmark = pytest.mark.db


def planned(params, tmp_path):
    with service.connect(params) as db:
        flavors, scope = service.resolve_scope(db, all_keys=True)
        plan = service.make_plan(db, scope, flavors=flavors)
    return plan, save_plan(plan, tmp_path / "plans")


def test_applying_every_range_of_the_saved_plan_leaves_no_drift(demo_db, tmp_path):
    plan, path = planned(demo_db, tmp_path)
    saved = load_plan(path, expected_digest=plan.digest)
    ids = [c.id for c in saved.changes]
    middle = ids[len(ids) // 2]
    with service.connect(demo_db) as db:
        first = service.apply_saved_plan(db, saved, first_id=0, last_id=middle, batch_size=50)
        second = service.apply_saved_plan(db, saved, first_id=middle + 1, last_id=ids[-1], batch_size=50)
        again = service.apply_saved_plan(db, saved, first_id=0, last_id=ids[-1])
        remaining = service.verify(db, plan.scope)
    assert sorted(first.updated + second.updated) == ids
    assert sorted(again.already) == ids and again.updated == []
    assert remaining.changes == []


def test_a_flavor_changed_after_approval_makes_its_rows_conflicts(demo_db, tmp_path):
    plan, path = planned(demo_db, tmp_path)
    saved = load_plan(path)
    flavor_id = plan.changes[0].diff.flavor_id
    of_that_flavor = {c.id for c in plan.changes if c.diff.flavor_id == flavor_id}
    with connect(demo_db) as conn, conn.cursor() as cur:
        cur.execute("UPDATE flavor_extra_specs SET value = 'changed-after-approval' WHERE flavor_id = %s LIMIT 1",
                    (flavor_id,))
    with service.connect(demo_db) as db:
        result = service.apply_saved_plan(db, saved, first_id=0, last_id=10**9)
    assert set(result.conflicts) == of_that_flavor
    assert set(result.updated) == {c.id for c in plan.changes} - of_that_flavor


def test_a_row_nova_saved_after_approval_is_a_conflict(demo_db, tmp_path):
    plan, path = planned(demo_db, tmp_path)
    raced = plan.changes[0].id
    with connect(demo_db) as conn, conn.cursor() as cur:
        cur.execute("UPDATE request_specs SET spec = REPLACE(spec, '\"az-', '\"zone-') WHERE id = %s", (raced,))
    with service.connect(demo_db) as db:
        result = service.apply_saved_plan(
            db, load_plan(path), first_id=0, last_id=10**9, exclude_ids=[plan.changes[1].id]
        )
    assert result.conflicts == [plan.changes[1].id, raced]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["changes"].pop(), "does not match its digest"),
        (lambda d: d["changes"][0].__setitem__(3, "0" * 64), "does not match its digest"),
        (lambda d: d["scope"].__setitem__("all_keys", False), "does not match its digest"),
        (lambda d: d.__setitem__("format_version", 9), "format version 9"),
        (lambda d: d.__setitem__("format", "x"), "not a nova-flavor-sync plan file"),
    ],
    ids=["row-dropped", "new-hash-edited", "scope-edited", "unknown-version", "not-a-plan"],
)
def test_an_edited_plan_file_is_refused(demo_db, tmp_path, edit, message):
    _, path = planned(demo_db, tmp_path)
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))
    with pytest.raises(BackupError, match=message):
        load_plan(path)


def test_a_plan_file_that_is_not_the_approved_one_is_refused(demo_db, tmp_path):
    _, path = planned(demo_db, tmp_path)
    with pytest.raises(BackupError, match="not the approved plan"):
        load_plan(path, expected_digest="0" * 64)
    with pytest.raises(BackupError, match="does not exist"):
        load_plan(tmp_path / "missing.json")
