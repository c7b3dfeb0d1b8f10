"""Applying a plan against the real MariaDB: exact bytes, compare-and-swap, retries."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from dbtools import connect
from nova_flavor_sync import service
from nova_flavor_sync.apply import RetryPolicy, apply_plan
from nova_flavor_sync.db import NovaApiDb
from nova_flavor_sync.errors import ApplyAbortedError
from nova_flavor_sync.spec_json import rewrite_extra_specs, sha256_text

pytestmark = pytest.mark.db
FAST_RETRY = RetryPolicy(attempts=4, first_delay_s=0.2, max_delay_s=0.5)


def rows(params) -> dict[int, tuple[str, datetime | None]]:
    with connect(params) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, spec, updated_at FROM request_specs")
        return {row_id: (spec, updated_at) for row_id, spec, updated_at in cur.fetchall()}


def plan_all_keys(db):
    flavors, scope = service.resolve_scope(db, all_keys=True)
    return service.make_plan(db, scope, flavors=flavors)


def nova_saves(params, row_id: int, zone: str = "az-nova") -> str:
    """Rewrite a row the way Nova does: read the blob, change a field, write it all back."""
    with connect(params) as conn, conn.cursor() as cur:
        cur.execute("SELECT spec FROM request_specs WHERE id = %s", (row_id,))
        document = json.loads(cur.fetchone()[0])
        document["nova_object.data"]["availability_zone"] = zone
        text = json.dumps(document)
        cur.execute("UPDATE request_specs SET spec = %s WHERE id = %s", (text, row_id))
        return text


def test_a_sync_rewrites_only_extra_specs_and_sets_updated_at(demo_db):
    before = rows(demo_db)
    with service.connect(demo_db) as db:
        plan = plan_all_keys(db)
        started = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
        result = apply_plan(db, plan, batch_size=100)
        remaining = service.make_plan(db, plan.scope)
    after = rows(demo_db)

    changed = {c.id: c for c in plan.changes}
    assert len(changed) > 600 and sorted(result.updated) == sorted(changed)
    assert result.batches == -(-len(changed) // 100)
    for row_id, (spec, updated_at) in after.items():
        if row_id in changed:
            target = dict(changed[row_id].diff.target_extra_specs)
            assert spec == rewrite_extra_specs(before[row_id][0], target)
            assert sha256_text(spec) == changed[row_id].new_sha256
            assert started <= updated_at <= started + timedelta(minutes=1)
        else:
            assert (spec, updated_at) == before[row_id]  # untouched, byte for byte
    assert remaining.changes == []


def test_a_row_nova_saved_after_planning_is_a_conflict_and_keeps_novas_bytes(demo_db):
    with service.connect(demo_db) as db:
        plan = plan_all_keys(db)
        raced = plan.changes[3].id
        novas_text = nova_saves(demo_db, raced)
        result = apply_plan(db, plan)
        (note,) = service.explain_conflicts(db, plan.scope, result.conflicts)

    assert result.conflicts == [raced] and raced not in result.updated
    assert rows(demo_db)[raced][0] == novas_text
    assert note.id == raced and "not overwritten; still out of sync: run again" in note.reason


def test_a_row_deleted_after_planning_is_reported_gone(demo_db):
    with service.connect(demo_db) as db:
        plan = plan_all_keys(db)
        gone = plan.changes[0].id
        with connect(demo_db) as conn, conn.cursor() as cur:
            cur.execute("DELETE FROM request_specs WHERE id = %s", (gone,))
        result = apply_plan(db, plan)
    assert result.gone == [gone] and len(result.updated) == len(plan.changes) - 1


def test_rows_listed_as_excluded_are_conflicts_and_not_written(demo_db):
    before = rows(demo_db)
    with service.connect(demo_db) as db:
        plan = plan_all_keys(db)
        excluded = plan.changes[5].id
        result = apply_plan(db, plan, exclude_ids=[excluded])
    assert excluded in result.conflicts and rows(demo_db)[excluded] == before[excluded]


def test_an_interrupted_rerun_counts_rows_already_written(demo_db):
    with service.connect(demo_db) as db:
        plan = plan_all_keys(db)
        first = apply_plan(db, plan)
        second = apply_plan(db, plan)
    assert sorted(second.already) == sorted(first.updated) and not second.updated


def hold_row_lock(params, row_id: int, seconds: float) -> threading.Thread:
    """Another session locks a row (as a Nova transaction would) and lets go later."""
    locked = threading.Event()

    def hold():
        with connect(params, autocommit=False) as conn, conn.cursor() as cur:
            cur.execute("SELECT id FROM request_specs WHERE id = %s FOR UPDATE", (row_id,))
            locked.set()
            time.sleep(seconds)
            conn.rollback()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert locked.wait(10)
    return thread


def test_a_lock_wait_timeout_is_retried_and_the_batch_completes(demo_db):
    with NovaApiDb(demo_db, lock_wait_timeout=1).open() as db:
        plan = plan_all_keys(db)
        holder = hold_row_lock(demo_db, plan.changes[10].id, seconds=1.5)
        result = apply_plan(db, plan, retry=FAST_RETRY)
        holder.join()
    assert result.retries >= 1
    assert sorted(result.updated) == sorted(c.id for c in plan.changes)


def test_a_lock_held_too_long_stops_the_run_with_nothing_half_applied(demo_db):
    before = rows(demo_db)
    with NovaApiDb(demo_db, lock_wait_timeout=1).open() as db:
        plan = plan_all_keys(db)
        ids = [c.id for c in plan.changes]
        holder = hold_row_lock(demo_db, ids[150], seconds=8)
        with pytest.raises(ApplyAbortedError, match="run again") as stopped:
            apply_plan(db, plan, batch_size=100, retry=RetryPolicy(attempts=2, first_delay_s=0.1))
        holder.join()
    after = rows(demo_db)
    assert "rows " in str(stopped.value) and "lock wait timeout" in str(stopped.value)
    assert all(after[i][0] != before[i][0] for i in ids[:100])  # the first batch is complete
    assert all(after[i] == before[i] for i in ids[100:])  # the failing batch and the rest untouched


def test_a_connection_killed_mid_batch_is_reopened_and_the_batch_retried(demo_db):
    with service.connect(demo_db) as db:
        plan = plan_all_keys(db)
        victim = db.conn.thread_id()
        killed = []

        def kill_once(result, total):
            if not killed:
                with connect(demo_db) as conn, conn.cursor() as cur:
                    cur.execute(f"KILL CONNECTION {int(victim)}")
                killed.append(victim)

        result = apply_plan(db, plan, batch_size=200, progress=kill_once, retry=FAST_RETRY)
        remaining = service.make_plan(db, plan.scope)
    assert killed and result.retries >= 1
    assert remaining.changes == []
