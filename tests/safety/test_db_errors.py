"""Real database errors in the middle of a batch: a deadlock and a connection killed by the server.

Both are provoked for real with a second session, as Nova's own transactions would: the batch
is rolled back whole by the server, retried from a fresh read, and completes; no row of it
is ever half-applied.
"""

from __future__ import annotations

import threading
import time

import pytest

from dbtools import connect
from nova_flavor_sync import service
from nova_flavor_sync.apply import RetryPolicy, apply_batch, sync_targets
from nova_flavor_sync.db import NovaApiDb

pytestmark = pytest.mark.db
FAST_RETRY = RetryPolicy(attempts=4, first_delay_s=0.5, max_delay_s=1.0)


def specs(params, ids):
    with connect(params) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, spec FROM request_specs WHERE id IN %s", (tuple(ids),))
        return dict(cur.fetchall())


def wait_until_blocked(params, thread_id: int, seconds: float = 10) -> None:
    """Wait until session ``thread_id`` has been stuck in its UPDATE (on the row lock) a while."""
    deadline = time.monotonic() + seconds
    with connect(params) as conn, conn.cursor() as cur:
        while time.monotonic() < deadline:
            cur.execute(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                "WHERE id = %s AND info LIKE 'UPDATE request_specs%%' AND time_ms > 300",
                (thread_id,),
            )
            if cur.fetchone()[0]:
                return
            time.sleep(0.05)
    raise TimeoutError("the batch never waited for the lock")


def first_batch(db, size=20):
    flavors, scope = service.resolve_scope(db, all_keys=True)
    plan = service.make_plan(db, scope, flavors=flavors)
    return plan.changes[:size]


def apply_in_thread(db, changes):
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = apply_batch(db, list(sync_targets(changes)), retry=FAST_RETRY)
        except BaseException as exc:  # reported by the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_a_deadlock_with_a_nova_transaction_is_retried_and_the_batch_completes(demo_db):
    with NovaApiDb(demo_db, lock_wait_timeout=5).open() as db:
        changes = first_batch(db)
        low, high = changes[0].id, changes[-1].id
        before = specs(demo_db, [c.id for c in changes])
        with connect(demo_db, autocommit=False) as nova, nova.cursor() as cur:
            # "Nova" changes many rows outside the batch (so InnoDB picks the batch as the
            # deadlock victim), then locks the batch's last row.
            cur.execute("UPDATE request_specs SET updated_at = UTC_TIMESTAMP() WHERE id > %s LIMIT 200", (high,))
            cur.execute("UPDATE request_specs SET updated_at = UTC_TIMESTAMP() WHERE id = %s", (high,))
            thread, outcome = apply_in_thread(db, changes)
            wait_until_blocked(demo_db, db.conn.thread_id())  # the batch holds `low`, waits for `high`
            cur.execute("UPDATE request_specs SET updated_at = UTC_TIMESTAMP() WHERE id = %s", (low,))
            nova.commit()
        thread.join(30)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.retries >= 1, "no deadlock was provoked"
    assert sorted(result.updated) == sorted(c.id for c in changes)
    after = specs(demo_db, [c.id for c in changes])
    assert all(after[i] != before[i] for i in after)


def test_a_connection_killed_while_the_batch_waits_is_retried_with_nothing_half_applied(demo_db):
    with NovaApiDb(demo_db, lock_wait_timeout=5).open() as db:
        changes = first_batch(db)
        ids = [c.id for c in changes]
        before = specs(demo_db, ids)
        with connect(demo_db, autocommit=False) as nova, nova.cursor() as cur:
            cur.execute("SELECT id FROM request_specs WHERE id = %s FOR UPDATE", (ids[-1],))
            victim = db.conn.thread_id()
            thread, outcome = apply_in_thread(db, changes)
            wait_until_blocked(demo_db, victim)
            with connect(demo_db) as admin, admin.cursor() as kill:
                kill.execute(f"KILL CONNECTION {int(victim)}")
            half_way = specs(demo_db, ids)  # the killed batch's rows: all as before
            nova.rollback()
        thread.join(30)
    assert half_way == before
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].retries >= 1
    assert sorted(outcome["result"].updated) == sorted(ids)
