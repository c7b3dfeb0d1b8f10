"""Pacing against the real MariaDB: tuned batch sizes, pauses, waiting while the server is busy.

Threads_running is pushed over a limit for real, with sessions running ``SELECT SLEEP``.
This server is no replica and no Galera node, so replica lag and flow control come from a
fake load reader (with fake time) while the writes are real; ``server_load()`` and the
replica checks are run against the real server for what it can show.
"""

from __future__ import annotations

import logging
import math
import re
import time
from contextlib import ExitStack

import pytest
from nova_flavor_sync_airflow import apply_ranges, pace_settings

from dbtools import busy_sessions, connect, threads_running
from fake_time import FakeTime
from nova_flavor_sync import service
from nova_flavor_sync.apply import apply_plan
from nova_flavor_sync.dburl import DbParams
from nova_flavor_sync.errors import ConfigError, DatabaseUnavailableError, UsageError
from nova_flavor_sync.plan_file import save_plan
from nova_flavor_sync.server_load import ReplicaDb
from nova_flavor_sync.throttle import Pacer, PaceSettings, ReplicaLag, ServerBusyError, ServerLoad

# serial: their timings (batches growing, waits of a second) do not hold beside another test
# process; make test runs them after the others, in a process of their own.
pytestmark = [pytest.mark.db, pytest.mark.serial]

# Only what a test turns on is checked.
NO_CHECKS = {"max_threads_running": None, "max_replica_lag_s": None, "pause_on_flow_control": False}


def specs(params) -> dict[int, str]:
    with connect(params) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, spec FROM request_specs")
        return dict(cur.fetchall())


def put_back(params, saved: dict[int, str]) -> None:
    """Make the rows stale again: write back the texts read before the run."""
    with connect(params) as conn, conn.cursor() as cur:
        cur.executemany("UPDATE request_specs SET spec = %s WHERE id = %s", [(t, i) for i, t in saved.items()])


def plan_all_keys(db):
    flavors, scope = service.resolve_scope(db, all_keys=True)
    return service.make_plan(db, scope, flavors=flavors)


# -- reading the load -----------------------------------------------------------------------


def test_server_load_on_a_plain_server_has_threads_running_and_nothing_else(demo_db):
    with service.connect(demo_db) as db:
        first, second = db.server_load(), db.server_load()
    for load in (first, second):
        assert 1 <= load.threads_running < 10_000  # at least this query's own session
        assert load.flow_control_paused is None and load.recv_queue is None  # not a Galera node
        assert load.replicas == ()


def test_a_server_that_is_no_replica_is_refused_as_one_before_anything_is_written(demo_db):
    before = specs(demo_db)
    with pytest.raises(ConfigError, match=r"is not a replica \(SHOW REPLICA STATUS is empty\)") as refused:
        ReplicaDb(demo_db).open()
    assert demo_db.safe_url() in str(refused.value)
    with service.connect(demo_db) as db, pytest.raises(ConfigError, match="is not a replica"):
        with service.pacing(db, PaceSettings(), [demo_db]) as pacer:
            apply_plan(db, plan_all_keys(db), pacer=pacer)
    assert specs(demo_db) == before


def test_an_unreachable_replica_is_refused_at_the_start_and_unknown_later(demo_db):
    away = DbParams(database="nova_api", host="127.0.0.1", port=1, user="nova", password="pw")
    with pytest.raises(DatabaseUnavailableError, match=r"cannot connect to replica mysql\+pymysql://nova:\*\*\*@"):
        ReplicaDb(away, connect_timeout=2).open()
    lag = ReplicaDb(away, connect_timeout=2).lag()
    assert lag.lag_s is None and "cannot read its replication status (cannot connect to replica" in lag.problem
    assert "pw" not in lag.problem
    assert Pacer(PaceSettings()).why_loaded(ServerLoad(1, (lag,)))  # unknown lag: wait


# -- batch size and pause -------------------------------------------------------------------


def test_fast_batches_grow_and_slow_ones_shrink(demo_db):
    stale = specs(demo_db)
    with service.connect(demo_db) as db:
        plan = plan_all_keys(db)
        growing = Pacer(PaceSettings(batch_size=20, target_batch_s=0.5, min_batch_size=10, **NO_CHECKS))
        result = apply_plan(db, plan, pacer=growing)
    assert sorted(result.updated) == sorted(c.id for c in plan.changes)
    # A 20-row batch takes far less than 0.5 s: doubled each time. Each size is tuned from the
    # batches written before it was cut, and the next batch is cut (and read ahead) while the
    # current one is written: the second batch is cut before the first one is timed.
    assert growing.sizes[:4] == [20, 20, 40, 80]

    put_back(demo_db, stale)
    with service.connect(demo_db) as db:
        shrinking = Pacer(PaceSettings(batch_size=400, target_batch_s=0.01, min_batch_size=10, **NO_CHECKS))
        result = apply_plan(db, plan, pacer=shrinking)
    assert sorted(result.updated) == sorted(c.id for c in plan.changes)
    assert shrinking.sizes[0] == 400 and shrinking.next_batch_size() < 400  # 400 rows take more than 10 ms


def test_the_pause_falls_between_batches(demo_db):
    done_at: list[float] = []
    with service.connect(demo_db) as db:
        plan = plan_all_keys(db)
        pacer = Pacer(PaceSettings(batch_size=200, target_batch_s=None, pause_s=0.3, **NO_CHECKS))
        started = time.monotonic()
        apply_plan(db, plan, pacer=pacer, progress=lambda result, total: done_at.append(time.monotonic()))
    batches = math.ceil(len(plan.changes) / 200)
    assert len(done_at) == pacer.batches == batches >= 3
    assert done_at[0] - started < 0.3  # no pause before the first batch
    assert all(later - earlier >= 0.3 for earlier, later in zip(done_at, done_at[1:], strict=False))
    assert pacer.paused_s == pytest.approx(0.3 * (batches - 1))


# -- waiting while the server is busy -------------------------------------------------------


def test_the_apply_waits_while_threads_running_is_over_the_limit_then_completes(demo_db, caplog):
    limit = threads_running(demo_db) + 2
    done_at: list[float] = []
    with service.connect(demo_db) as db:
        plan = plan_all_keys(db)
        settings = PaceSettings(batch_size=200, target_batch_s=None, max_threads_running=limit,
                                max_replica_lag_s=None, pause_on_flow_control=False, max_wait_s=8)
        with caplog.at_level(logging.INFO, logger="nova_flavor_sync"), busy_sessions(demo_db, 5, 2.0):
            busy_since = time.monotonic()
            with service.pacing(db, settings) as pacer:
                result = apply_plan(db, plan, pacer=pacer,
                                    progress=lambda result, total: done_at.append(time.monotonic()))
    finished = time.monotonic()
    assert sorted(result.updated) == sorted(c.id for c in plan.changes)
    assert done_at[0] - busy_since >= 1.6  # nothing was written while the five sessions ran
    assert finished - busy_since < 8
    assert pacer.waited_s >= 1.5
    assert "Waiting before the next batch: Threads_running is " in caplog.text
    assert f"(limit {limit})" in caplog.text and "Server load back under the limits" in caplog.text


def test_a_server_busy_for_too_long_stops_between_batches_with_earlier_batches_written(demo_db):
    before = specs(demo_db)
    limit = threads_running(demo_db) + 2
    with service.connect(demo_db) as db, ExitStack() as busy:
        plan = plan_all_keys(db)
        ids = [c.id for c in plan.changes]
        settings = PaceSettings(batch_size=100, target_batch_s=None, max_threads_running=limit,
                                max_replica_lag_s=None, pause_on_flow_control=False, max_wait_s=1)

        def load_up_after_the_first_batch(result, total):
            if result.batches == 1:
                busy.enter_context(busy_sessions(demo_db, 5, 30))

        started = time.monotonic()
        with service.pacing(db, settings) as pacer, pytest.raises(ServerBusyError) as stopped:
            apply_plan(db, plan, pacer=pacer, progress=load_up_after_the_first_batch)
        assert time.monotonic() - started < 5
    message = str(stopped.value)
    assert re.search(rf"stayed busy for 1 s, longer than the 1 s allowed \(Threads_running is \d+ \(limit {limit}\)\)",
                     message), message
    assert f"Stopped before the batch of rows {ids[100]}-{ids[199]}: every batch before it is written in full " \
           "(100 rows written), this one and the rest not at all: run again" in message
    after = specs(demo_db)
    assert all(after[i] != before[i] for i in ids[:100])
    assert all(after[i] == before[i] for i in ids[100:])


def replica(lag, problem=None):
    return ServerLoad(threads_running=1, replicas=(ReplicaLag("mysql+pymysql://r1:3306/nova_api", lag, problem),))


BUSY = {
    "replica-lagging": replica(30.0),
    "replica-stopped": replica(None, "replication is not running (Seconds_Behind_Master is NULL)"),
    "galera-flow-control": ServerLoad(threads_running=1, flow_control_paused=0.4, recv_queue=150),
}


@pytest.mark.parametrize("busy", list(BUSY.values()), ids=list(BUSY))
def test_replica_lag_and_flow_control_are_waited_for_and_the_wait_is_bounded(demo_db, busy):
    quiet = ServerLoad(threads_running=1, replicas=(ReplicaLag("mysql+pymysql://r1:3306/nova_api", 0.0),),
                       flow_control_paused=0.0)
    settings = PaceSettings(batch_size=100, target_batch_s=None, max_wait_s=30)

    # Busy for two checks, then quiet: the run waits, then completes.
    stale = specs(demo_db)
    readings = iter([quiet, busy, busy, quiet] + [quiet] * 100)
    fake = FakeTime()
    with service.connect(demo_db) as db:
        plan = plan_all_keys(db)
        pacer = Pacer(settings, read_load=lambda: next(readings), sleep=fake.sleep, clock=fake.clock)
        result = apply_plan(db, plan, pacer=pacer)
    assert sorted(result.updated) == sorted(c.id for c in plan.changes)
    assert fake.sleeps == [0.25, 0.5]

    # Busy for good after the first batch: stopped after 30 (fake) seconds, the first batch written.
    put_back(demo_db, stale)
    before = specs(demo_db)
    readings = iter([quiet] + [busy] * 1000)
    fake = FakeTime()
    with service.connect(demo_db) as db:
        pacer = Pacer(settings, read_load=lambda: next(readings), sleep=fake.sleep, clock=fake.clock)
        with pytest.raises(ServerBusyError, match="stayed busy for 30 s.*100 rows written.*run again"):
            apply_plan(db, plan, pacer=pacer)
    assert fake.now == pytest.approx(30)
    ids = [c.id for c in plan.changes]
    after = specs(demo_db)
    assert all(after[i] != before[i] for i in ids[:100]) and all(after[i] == before[i] for i in ids[100:])


# -- restore and the Airflow task -----------------------------------------------------------


def test_a_restore_is_paced_too(demo_db, tmp_path):
    original = specs(demo_db)
    with service.connect(demo_db) as db:
        plan = plan_all_keys(db)
        backup = service.back_up(db, plan, tmp_path / "backups")
        apply_plan(db, plan)
        pacer = Pacer(PaceSettings(batch_size=250, target_batch_s=None, pause_s=0.05, **NO_CHECKS))
        result = service.restore(db, backup.info.path, run=True, pacer_for=lambda _db: pacer)
    assert len(result.restored) == len(plan.changes) and not result.errors
    assert pacer.batches == math.ceil(len(plan.changes) / 250) and pacer.paused_s > 0
    assert specs(demo_db) == original


def test_an_airflow_apply_task_paces_itself_from_the_dag_params(demo_db, tmp_path, caplog):
    with service.connect(demo_db) as db:
        plan = plan_all_keys(db)
    path = save_plan(plan, tmp_path / "plans")
    params = {"batch_size": 100, "batch_seconds": 0.5, "pause_seconds": 0.05, "max_threads_running": 1000,
              "max_replica_lag": 1, "flow_control_pause": True, "max_load_wait": 5}
    ranges = apply_ranges(str(path), params["batch_size"], auto_tune=True)
    assert len(ranges) == 1  # auto-tuned: a task holds up to 5000 rows, room for the batches to grow
    assert len(apply_ranges(str(path), 100)) == math.ceil(len(plan.changes) / 100)
    with caplog.at_level(logging.INFO, logger="nova_flavor_sync"):
        counts = service.apply_range(
            demo_db, str(path), plan.digest, first_id=ranges[0]["first_id"], last_id=ranges[0]["last_id"],
            batch_size=100, pace=pace_settings(params), pause_first=True,
        )
    assert counts["updated"] == len(plan.changes)
    assert "Pacing: batches sized to take 0.5 s (50-5000 rows, starting at 100), pause 0.05 s" in caplog.text
    assert re.search(r"Paced: \d+ batches of \d+-\d+ rows, 0\.\d s paused", caplog.text)


@pytest.mark.parametrize(("params", "message"), [
    ({"batch_seconds": 0.001}, "target_batch_s must be between 0.01 and 60"),
    ({"pause_seconds": -1}, "pause_s must be between 0 and 3600"),
    ({"max_load_wait": 0}, "max_wait_s must be between 1 and 86400"),
    ({"max_threads_running": -3}, "max_threads_running must be between 1"),
])
def test_bad_pacing_params_fail_the_task_with_a_clear_message(params, message):
    with pytest.raises(UsageError, match=message):
        pace_settings({"batch_size": 500, **params})
