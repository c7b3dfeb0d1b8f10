"""Back up, sync, restore against the real MariaDB: the original bytes come back."""

from __future__ import annotations

import pytest

from dbtools import connect, table_hash
from nova_flavor_sync import service
from nova_flavor_sync.backup import load_backup
from nova_flavor_sync.errors import BackupError

pytestmark = pytest.mark.db


def sync_with_backup(params, backup_dir, **backup_kwargs):
    with service.connect(params) as db:
        flavors, scope = service.resolve_scope(db, all_keys=True)
        plan = service.make_plan(db, scope, flavors=flavors)
        backup = service.back_up(db, plan, backup_dir, **backup_kwargs)
        service.apply_plan(db, plan)
    return plan, backup


def specs(params):
    with connect(params) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, spec FROM request_specs")
        return dict(cur.fetchall())


def stamps(params):
    """Each RequestSpec's updated_at as a backup must record it: "YYYY-mm-dd HH:MM:SS" (UTC, as
    stored), or None for a row Nova never updated."""
    with connect(params) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, updated_at FROM request_specs")
        return {row_id: None if at is None else at.strftime("%Y-%m-%d %H:%M:%S") for row_id, at in cur.fetchall()}


def test_restore_brings_back_every_original_byte(demo_db, tmp_path):
    original = table_hash(demo_db, columns="id, instance_uuid, spec")
    plan, backup = sync_with_backup(demo_db, tmp_path)
    assert table_hash(demo_db, columns="id, instance_uuid, spec") != original

    with service.connect(demo_db) as db:
        dry = service.restore(db, backup.info.path)
        assert len(dry.restored) == len(plan.changes)
        assert table_hash(demo_db, columns="id, instance_uuid, spec") != original  # dry run wrote nothing
        done = service.restore(db, backup.info.path, run=True)

    assert sorted(done.restored) == sorted(c.id for c in plan.changes)
    assert done.skipped == [] and done.errors == {} and done.not_verified == []
    assert table_hash(demo_db, columns="id, instance_uuid, spec") == original


def test_the_backup_holds_exactly_the_rows_the_plan_changes(demo_db, tmp_path):
    before, stamped = specs(demo_db), stamps(demo_db)
    plan, backup = sync_with_backup(demo_db, tmp_path)
    loaded = load_backup(backup.info.path)
    assert loaded.info.plan_digest == plan.digest and backup.diverged == []
    assert {r.id: r.spec for r in loaded.records} == {c.id: before[c.id] for c in plan.changes}
    assert all(r.new_sha256 == c.new_sha256 for r, c in zip(loaded.records, plan.changes, strict=True))
    assert {r.id: r.updated_at for r in loaded.records} == {c.id: stamped[c.id] for c in plan.changes}
    assert {r.updated_at is None for r in loaded.records} == {True, False}  # the demo has both


def test_backup_all_saves_every_row_and_restore_skips_the_unchanged_ones(demo_db, tmp_path):
    stamped = stamps(demo_db)
    plan, backup = sync_with_backup(demo_db, tmp_path, backup_all=True)
    assert backup.info.record_count == 1500
    assert {r.id: r.updated_at for r in load_backup(backup.info.path).records} == stamped
    with service.connect(demo_db) as db:
        done = service.restore(db, backup.info.path, run=True)
    assert len(done.restored) == len(plan.changes)
    assert len(done.skipped) == 1500 - len(plan.changes)
    assert {n.reason for n in done.skipped} == {"already holds the backed-up spec"}


def test_a_row_changed_after_the_sync_is_skipped_unless_forced(demo_db, tmp_path):
    plan, backup = sync_with_backup(demo_db, tmp_path)
    changed_later = plan.changes[0].id
    with connect(demo_db) as conn, conn.cursor() as cur:
        cur.execute("UPDATE request_specs SET spec = REPLACE(spec, '\"az-', '\"zone-') WHERE id = %s", (changed_later,))
    nova_version = specs(demo_db)[changed_later]

    with service.connect(demo_db) as db:
        careful = service.restore(db, backup.info.path, run=True)
        assert specs(demo_db)[changed_later] == nova_version
        forced = service.restore(db, backup.info.path, run=True, force=True)

    assert [n.id for n in careful.skipped] == [changed_later]
    assert "changed since the sync" in careful.skipped[0].reason
    assert forced.restored == [changed_later]
    backed_up = {r.id: r.spec for r in load_backup(backup.info.path).records}
    assert specs(demo_db)[changed_later] == backed_up[changed_later]


def test_a_backup_of_another_database_is_refused_and_nothing_changes(demo_db, other_demo_db, tmp_path):
    _, backup = sync_with_backup(demo_db, tmp_path)
    untouched = table_hash(other_demo_db)
    with service.connect(other_demo_db) as db, pytest.raises(BackupError, match="is of schema"):
        service.restore(db, backup.info.path, run=True)
    assert table_hash(other_demo_db) == untouched


def test_a_deleted_row_and_a_row_of_another_instance_are_never_restored_even_forced(demo_db, tmp_path):
    plan, backup = sync_with_backup(demo_db, tmp_path)
    gone, reused = plan.changes[0], plan.changes[1]
    with connect(demo_db) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM request_specs WHERE id = %s", (gone.id,))
        cur.execute("UPDATE request_specs SET instance_uuid = %s WHERE id = %s",
                    ("11111111-2222-3333-4444-555555555555", reused.id))
    before = specs(demo_db)

    with service.connect(demo_db) as db:
        forced = service.restore(db, backup.info.path, run=True, force=True)

    assert [(n.id, n.reason) for n in forced.skipped] == [(gone.id, "row no longer exists")]
    assert forced.errors == {reused.id: f"row now belongs to instance 11111111-2222-3333-4444-555555555555, "
                                        f"not {reused.instance_uuid}; not written"}
    assert specs(demo_db)[reused.id] == before[reused.id]
    assert len(forced.restored) == len(plan.changes) - 2


def test_a_zero_updated_at_is_backed_up_as_stored(demo_db, tmp_path):
    # A server without NO_ZERO_DATE in its sql_mode keeps '0000-00-00 00:00:00', which no
    # Python datetime can hold: the backup records the text, as for every other date.
    with service.connect(demo_db) as db:
        flavors, scope = service.resolve_scope(db, all_keys=True)
        changed = service.make_plan(db, scope, flavors=flavors).changes[0].id
    with connect(demo_db) as conn, conn.cursor() as cur:
        cur.execute("SET SESSION sql_mode = ''")
        cur.execute("UPDATE request_specs SET updated_at = '0000-00-00 00:00:00' WHERE id = %s", (changed,))
    _, backup = sync_with_backup(demo_db, tmp_path)
    records = {r.id: r for r in load_backup(backup.info.path).records}
    assert records[changed].updated_at == "0000-00-00 00:00:00"
