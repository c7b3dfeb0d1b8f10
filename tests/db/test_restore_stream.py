"""A restore reads its backup a database at a time: a backup whose records are not in id order
(hand-made: this tool writes them in id order) is restored and reported just the same."""

from __future__ import annotations

import pytest

from dbtools import table_hash
from nova_flavor_sync import service
from nova_flavor_sync.backup import load_backup, write_backup

pytestmark = pytest.mark.db

COLUMNS = "id, instance_uuid, spec"


def test_a_backup_in_reverse_id_order_restores_and_reports_as_the_one_in_id_order(demo_db, tmp_path):
    original = table_hash(demo_db, columns=COLUMNS)
    with service.connect(demo_db) as db:
        flavors, scope = service.resolve_scope(db, all_keys=True)
        plan = service.make_plan(db, scope, flavors=flavors)
        backup = service.back_up(db, plan, tmp_path / "in-order")
        written = load_backup(backup.info.path)
        (tmp_path / "reversed").mkdir(mode=0o700)
        reversed_path = write_backup(
            tmp_path / "reversed", list(reversed(written.records)), databases=written.info.databases,
            plan_digest=written.info.plan_digest, scope=written.info.scope,
        ).path
        service.apply_plan(db, plan)
        changed_later = plan.changes[3].id
        with db.conn.cursor() as cur:  # Nova saves one row after the sync: skipped, with its instance
            cur.execute("UPDATE request_specs SET spec = CONCAT(spec, ' ') WHERE id = %s", (changed_later,))

        dry = service.restore(db, reversed_path)
        done = service.restore(db, reversed_path, run=True)
        again = service.restore(db, backup.info.path, run=True)

    assert sorted(dry.restored) == sorted(done.restored) == sorted(c.id for c in plan.changes if c.id != changed_later)
    assert done.not_verified == [] and done.errors == {}
    assert [(n.id, n.instance_uuid) for n in done.skipped] == [(changed_later, plan.changes[3].instance_uuid)]
    assert "changed since the sync" in done.skipped[0].reason
    assert again.restored == [] and sorted(n.id for n in again.skipped) == sorted([*done.restored, changed_later])
    assert {n.reason for n in again.skipped if n.id != changed_later} == {"already holds the backed-up spec"}
    assert table_hash(demo_db, columns=COLUMNS) != original  # only the row Nova saved differs
