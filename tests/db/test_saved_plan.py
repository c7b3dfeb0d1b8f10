"""A plan saved to a file and applied later by id range (what the Airflow apply tasks do)."""

from __future__ import annotations

import json

import pytest

from dbtools import connect
from nova_flavor_sync import service
from nova_flavor_sync.errors import BackupError
from nova_flavor_sync.plan_file import load_plan, save_plan
from nova_flavor_sync.spec_json import find_flavor_start, flavor_text_at

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
        remaining = service.make_plan(db, plan.scope)
    assert sorted(first.updated + second.updated) == ids
    assert sorted(again.already) == ids and not again.updated
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
        (lambda head, rows: rows.pop(), "does not match its digest"),
        (lambda head, rows: rows.pop(0), "does not match its digest"),
        (lambda head, rows: rows[0].__setitem__(3, "0" * 64), "does not match its digest"),
        (lambda head, rows: head["scope"].__setitem__("all_keys", False), "does not match its digest"),
        (lambda head, rows: rows.append(rows[-1]), "does not match its digest"),
        (lambda head, rows: rows[0].__setitem__(0, "1"), "is malformed"),
        (lambda head, rows: rows[0].pop(), "is malformed"),
        (lambda head, rows: head.__setitem__("format_version", 9), "format version 9"),
        (lambda head, rows: head.__setitem__("format", "x"), "not a nova-flavor-sync plan file"),
    ],
    ids=["last-row-dropped", "first-row-dropped", "new-hash-edited", "scope-edited", "row-repeated",
         "id-not-a-number", "row-short", "unknown-version", "not-a-plan"],
)
def test_an_edited_plan_file_is_refused(demo_db, tmp_path, edit, message):
    _, path = planned(demo_db, tmp_path)
    head, *rows = [json.loads(line) for line in path.read_text().splitlines()]
    edit(head, rows)
    path.write_text("".join(json.dumps(item) + "\n" for item in [head, *rows]))
    with pytest.raises(BackupError, match=message):
        load_plan(path)


def test_an_apply_task_keeps_only_its_range_and_still_checks_every_row(demo_db, tmp_path):
    plan, path = planned(demo_db, tmp_path)
    ids = [c.id for c in plan.changes]
    middle = load_plan(path, first_id=ids[10], last_id=ids[19])
    assert [r.id for r in middle.changes] == ids[10:20] and middle.digest == plan.digest
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")  # a row far outside the range is gone
    with pytest.raises(BackupError, match="does not match its digest"):
        load_plan(path, first_id=ids[10], last_id=ids[19])


def test_a_plan_file_of_the_old_format_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "plan_old.json"
    path.write_text(json.dumps({"format": "nova-flavor-sync-plan", "format_version": 1, "changes": []}))
    with pytest.raises(BackupError, match="format version 1; this tool reads version 2: make the plan again"):
        load_plan(path)


def test_a_plan_file_that_is_not_the_approved_one_is_refused(demo_db, tmp_path):
    _, path = planned(demo_db, tmp_path)
    with pytest.raises(BackupError, match="not the approved plan"):
        load_plan(path, expected_digest="0" * 64)
    with pytest.raises(BackupError, match="does not exist"):
        load_plan(tmp_path / "missing.json")


def test_a_row_whose_flavor_repeats_its_id_after_extra_specs_is_never_written(demo_db, tmp_path):
    # Nova never writes a key twice. The planner recognises a copy by its text up to the end
    # of its extra_specs, so it takes such a row for the copy that text names; both ways of
    # applying (the command line's, the Airflow tasks') parse it in full and refuse it.
    plan, _ = planned(demo_db, tmp_path)
    first, crafted = next(pair for pair in zip(plan.changes, plan.changes[1:], strict=False)
                          if pair[0].diff is pair[1].diff)
    with connect(demo_db) as conn, conn.cursor() as cur:
        cur.execute("SELECT spec FROM request_specs WHERE id = %s", (crafted.id,))
        (spec,) = cur.fetchone()
        at = find_flavor_start(spec)
        tail_at = spec.index('"deleted": false}', at + flavor_text_at(spec, at).specs_end)
        spec = spec[:tail_at] + '"deleted": false, "id": 99999}' + spec[tail_at + len('"deleted": false}'):]
        cur.execute("UPDATE request_specs SET spec = %s WHERE id = %s", (spec, crafted.id))
    plan, path = planned(demo_db, tmp_path)
    assert crafted.id in {c.id for c in plan.changes}  # recognised, not parsed
    refused = "its flavor copy (id 99999, flavorid"
    with service.connect(demo_db) as db:
        task = service.apply_saved_plan(db, load_plan(path), first_id=first.id, last_id=crafted.id)
        assert list(task.updated) == [first.id] and refused in task.errors[crafted.id]
        command_line = service.apply_plan(db, plan)
    assert refused in command_line.errors[crafted.id] and first.id in command_line.already
    with connect(demo_db) as conn, conn.cursor() as cur:
        cur.execute("SELECT spec FROM request_specs WHERE id = %s", (crafted.id,))
        assert cur.fetchone()[0] == spec
