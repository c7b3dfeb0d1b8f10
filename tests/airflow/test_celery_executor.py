"""A distributed Airflow: CeleryExecutor, Redis as broker, PostgreSQL as metadata DB, two workers.

What an operator's Airflow looks like, on this machine: api-server, scheduler, dag-processor
and triggerer (the approval is a deferred operator), and two ``airflow celery worker``
processes, ``worker-a`` and ``worker-b``, each with two slots, started by the launcher
``make demo`` uses (scripts/local_airflow.py), all on 127.0.0.1. The metadata DB is a
PostgreSQL database of this test's own (dropped after it), the broker's keys carry a prefix
of its own in Redis (deleted after it), and $NOVA_FLAVOR_SYNC_APPLY_PARALLELISM is 4.

One run, through the REST API (apache-airflow-client): a dry run, then a sync approved
through the API whose mapped apply tasks run on both workers, and, while some of them run
on one worker, that worker dies: it and every process it started get SIGKILL at once, as
when its machine goes down (the issue: Airflow 3.3 puts each task process in a process group
of its own, so killing the worker process alone would leave its tasks running). Airflow
notices the tasks' missing heartbeats, fails those tries and retries them (the apply tasks'
APPLY_RETRIES) on the surviving worker. The run must end green, every row hold exactly the
bytes the plan approved (nothing torn, nothing written twice differently), verify find no
drift; then nova_flavor_restore puts the original bytes back.

Two settings make it fast enough for a test, both Airflow's own: the task heartbeat timeout
(300 s by default) is HEARTBEAT_TIMEOUT_S, and ``[core] max_task_retry_delay`` caps the
apply tasks' retry delay (1, 2, then 4 minutes) at RETRY_DELAY_CAP_S. Run only it with
``-k celery``.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import psutil
import psycopg2
import pytest
import redis
from airflow_rest import Rest, wait_for
from local_airflow import Airflow

from dbtools import connect, copies_hash, opened_cloud, stale_copies
from nova_flavor_sync.backup import API_DATABASE
from nova_flavor_sync.demo import cell_database_name
from nova_flavor_sync.plan_file import load_plan
from operator_rest import answer, tries, wait_for_input

SYNC, RESTORE = "nova_flavor_sync", "nova_flavor_restore"
APPLY_TASKS = ("apply_cells", "apply_request_specs")
WORKERS = ("worker-a", "worker-b")
PARALLELISM = 4
HEARTBEAT_TIMEOUT_S = 30
RETRY_DELAY_CAP_S = 5
# About this many mapped apply tasks, each pausing PAUSE_S before its one batch: long enough
# for the kill to land while a worker runs some, short enough for a test.
APPLY_TASK_COUNT = 14
PAUSE_S = 6
REPO = Path(__file__).resolve().parents[2]
POSTGRES = {"host": os.environ.get("NFS_TEST_PG_HOST", "127.0.0.1"),
            "port": int(os.environ.get("NFS_TEST_PG_PORT", "5432")),
            "user": os.environ.get("NFS_TEST_PG_USER", "postgres")}
REDIS_URL = os.environ.get("NFS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def postgres_admin():
    try:
        conn = psycopg2.connect(dbname="postgres", connect_timeout=5, **POSTGRES)
    except psycopg2.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {POSTGRES['host']}:{POSTGRES['port']} (user {POSTGRES['user']!r}) does not "
                    f"answer: {exc}. Start it, or set NFS_TEST_PG_HOST/PORT/USER.", pytrace=False)
    conn.autocommit = True
    return conn


@pytest.fixture
def metadata_db() -> Iterator[str]:
    """A new PostgreSQL database for Airflow's metadata: its URL without a driver; dropped after."""
    name = f"nfs_airflow_{secrets.token_hex(6)}"
    # closing(), not the connection's own `with`: that is a transaction, which CREATE DATABASE refuses.
    with closing(postgres_admin()) as conn, conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://{POSTGRES['user']}@{POSTGRES['host']}:{POSTGRES['port']}/{name}"
    finally:
        with closing(postgres_admin()) as conn, conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def broker_prefix() -> Iterator[str]:
    """A key prefix of this test's own in Redis (kombu's global_keyprefix); its keys deleted after."""
    server = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    try:
        server.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at {REDIS_URL} does not answer: {exc}. Start it, or set NFS_TEST_REDIS_URL.",
                    pytrace=False)
    prefix = f"nfs_test_{secrets.token_hex(6)}:"
    try:
        yield prefix
    finally:
        for key in server.scan_iter(match=f"{prefix}*"):
            server.delete(key)
        server.close()


def conn_uri(params) -> str:
    auth = params.user + (f":{params.password}" if params.password else "")
    return f"mysql://{auth}@{params.host}:{params.port}/{params.database}"


@pytest.fixture
def celery_provider() -> None:
    """Fail first, saying what to fix, when the Celery provider cannot load its executor with this celery."""
    from importlib.metadata import version

    try:
        import airflow.providers.celery.executors.celery_executor_utils  # noqa: F401
    except ImportError as exc:
        problem = str(exc)
    else:
        return
    pytest.fail(f"apache-airflow-providers-celery {version('apache-airflow-providers-celery')} cannot load "
                f"its executor with celery {version('celery')}: {problem}. requirements.lock must pin a celery "
                "that provider supports", pytrace=False)


@pytest.fixture
def airflow(celery_provider, demo_db, tmp_path, metadata_db, broker_prefix) -> Iterator[Airflow]:
    """The distributed Airflow, its ``nova_api_db`` connection on ``demo_db``; always stopped."""
    db = metadata_db.removeprefix("postgresql://")
    env = {
        "AIRFLOW_CONN_NOVA_API_DB": conn_uri(demo_db),
        "AIRFLOW_CONN_NOVA_DATABASE": conn_uri(dataclasses.replace(demo_db, database="nova")),
        "NOVA_FLAVOR_SYNC_DIR": str(tmp_path / "data"),  # shared: the workers are on one machine
        "NOVA_FLAVOR_SYNC_APPLY_PARALLELISM": str(PARALLELISM),
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://{db}",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": f"postgresql+asyncpg://{db}",
        "AIRFLOW__CELERY__BROKER_URL": REDIS_URL,
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": broker_prefix,
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql+psycopg2://{db}",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_S),
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
        "AIRFLOW__CORE__MAX_TASK_RETRY_DELAY": str(RETRY_DELAY_CAP_S),
    }
    workers = {
        name: ["celery", "worker", "--celery-hostname", name, "--concurrency", "2",
               "--skip-serve-logs", "--without-mingle", "--without-gossip"]
        for name in WORKERS
    }
    worker_env = {
        name: {"AIRFLOW__CORE__HOSTNAME_CALLABLE": "worker_hostname.hostname",
               "NFS_TEST_WORKER_HOSTNAME": name,
               "PYTHONPATH": os.pathsep.join(
                   filter(None, [str(REPO / "tests" / "hosts"), os.environ.get("PYTHONPATH")]))}
        for name in WORKERS
    }
    # The components' $TMPDIR, removed after: Celery's pool (billiard) makes pymp-* directories
    # there, which a worker stopped mid-task leaves behind. A short path, for their sockets.
    with tempfile.TemporaryDirectory(prefix="nfs-airflow-", ignore_cleanup_errors=True) as tmpdir:
        env["TMPDIR"] = tmpdir
        running = Airflow(tmp_path / "airflow-home", tmp_path / "airflow-logs", env=env,
                          workers=workers, worker_env=worker_env)
        try:
            try:
                running.start(timeout=240)
                for name in WORKERS:
                    wait_for(f"{name} to be ready", lambda name=name: "ready." in running.output(name) or None,
                             timeout=120)
            except BaseException:
                print("\n" + running.diagnostics())
                raise
            yield running
        finally:
            survivors = running.stop()
            print(f"\nairflow stopped in {running.timings['stop_s']:.1f} s")
    assert not survivors, f"still running after stop(): {survivors}"


def row_hashes(params) -> dict[str, dict[int, str]]:
    """Both copies, row by row: {copy key (nova_api or the cell's uuid): {id: sha256 of its bytes}}.

    The sha256 is MariaDB's SHA2(..., 256), what a plan file records before and after.
    """
    with opened_cloud(params) as (_db, cells, _flavors, _scope):
        tables = {API_DATABASE: (params, "request_specs", "spec")}
        for mapping, _cell in cells:
            cell_db = dataclasses.replace(params, database=cell_database_name(params.database, mapping.name))
            tables[mapping.uuid] = (cell_db, "instance_extra", "flavor")
    found = {}
    for key, (db, table, column) in tables.items():
        with connect(db) as conn, conn.cursor() as cur:
            cur.execute(f"SELECT id, SHA2(`{column}`, 256) FROM `{table}`")
            found[key] = dict(cur.fetchall())
    return found


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def apply_tis(rest: Rest, run_id: str) -> list:
    return [ti for ti in rest.task_instances(SYNC, run_id) if ti.task_id in APPLY_TASKS and ti.map_index >= 0]


def wait_until_both_workers_apply(rest: Rest, run_id: str, *, timeout: float = 240) -> tuple[str, set, list]:
    """Until apply tasks have run on both workers and one of them runs some now.

    Returns (that worker, the hosts seen, its running task instances).
    """
    seen: set[str] = set()

    def spread() -> tuple[str, set, list] | None:
        state = rest.run(SYNC, run_id).state
        assert state == "running", f"{run_id} is {state} before a worker could be killed"
        tis = apply_tis(rest, run_id)
        seen.update(ti.hostname for ti in tis if ti.hostname)
        if not seen >= set(WORKERS):
            return None
        for worker in reversed(WORKERS):
            running = [ti for ti in tis if ti.hostname == worker and ti.state == "running"]
            if running:
                return worker, set(seen), running
        return None

    return wait_for("apply tasks running on both workers", spread, timeout=timeout, interval=0.5)


def run_approved(rest: Rest, dag_id: str, conf: dict) -> str:
    run_id = rest.trigger(dag_id, conf)
    wait_for_input(rest, dag_id, run_id)
    answered = answer(rest, dag_id, run_id, "Approve")
    assert answered.chosen_options == ["Approve"], answered
    return run_id


@pytest.mark.timeout(480)
def test_celery_two_workers_one_killed_while_applying(airflow, demo_db, tmp_path):
    started = time.monotonic()
    timings: dict[str, float] = {}
    rest = airflow.rest
    try:
        original = copies_hash(demo_db, copies_only=True)
        before = row_hashes(demo_db)
        stale = stale_copies(demo_db)
        assert stale > 0, "the demo cloud should start with stale flavor copies"
        assert airflow.listening() == {("127.0.0.1", airflow.api_port)}, airflow.listening()
        assert "Loaded executor: :CeleryExecutor:" in airflow.output("scheduler")

        rest.wait_for_dags(SYNC, RESTORE)
        for dag_id in (SYNC, RESTORE):
            rest.unpause(dag_id)

        # The dry run: planned on the workers, nothing written.
        run_id = rest.trigger(SYNC, {"dry_run": True, "all_keys": True})
        assert rest.wait_for_run(SYNC, run_id).state == "success", rest.task_states(SYNC, run_id)
        dry = rest.xcom(SYNC, run_id, "report_outcome")
        assert dry["outcome"] == "dry_run" and f"DRY RUN: {stale} flavor copies" in dry["message"], dry
        assert copies_hash(demo_db, copies_only=True) == original
        timings["dry run"] = time.monotonic() - started

        # The sync, in about APPLY_TASK_COUNT mapped tasks of one fixed-size batch each.
        batch_size = max(1, math.ceil(stale / APPLY_TASK_COUNT))
        conf = {"dry_run": False, "all_keys": True, "batch_size": batch_size, "batch_seconds": 0,
                "pause_seconds": PAUSE_S}
        run_id = run_approved(rest, SYNC, conf)
        victim, seen, running = wait_until_both_workers_apply(rest, run_id)
        survivor = next(w for w in WORKERS if w != victim)
        killed_at, killed_when = time.monotonic(), datetime.datetime.now(datetime.UTC)
        killed = airflow.kill(victim)
        cut = {(ti.task_id, ti.map_index) for ti in running}
        print(f"\nkilled {victim} (pids {killed}) while it ran {sorted(cut)}")
        assert len(killed) > 2 and not [pid for pid in killed if alive(pid)], killed  # its tasks too
        state = rest.wait_for_run(SYNC, run_id, timeout=300).state
        timings["sync after the kill"] = time.monotonic() - killed_at
        states = rest.task_states(SYNC, run_id)
        assert state == "success", f"{run_id} ended {state}: {states}"

        # Both workers ran apply tasks; what the dead one was running was retried on the other.
        assert seen == set(WORKERS), seen
        tis = apply_tis(rest, run_id)
        assert len(tis) >= APPLY_TASK_COUNT // 2 and all(ti.state == "success" for ti in tis), states
        for task_id, map_index in cut:
            made = tries(rest, SYNC, run_id, task_id, map_index)
            summary = [(t.try_number, t.hostname, t.state and t.state.value) for t in made]
            assert made[0].hostname == victim, summary
            assert made[0].state in ("failed", "up_for_retry"), summary
            assert made[-1].try_number > 1 and made[-1].hostname == survivor, summary
            assert made[-1].state == "success", summary
        for ti in tis:  # nothing started on the dead worker after it died
            assert ti.hostname == survivor or ti.start_date < killed_when, (ti.task_id, ti.map_index, ti.hostname)

        outcome = rest.xcom(SYNC, run_id, "report_outcome")
        assert outcome["outcome"] == "applied", outcome
        assert outcome["updated"] + outcome.get("already", 0) == stale, outcome
        assert outcome.get("conflicts", 0) == 0 and outcome.get("errors", 0) == 0, outcome
        verified = rest.xcom(SYNC, run_id, "verify")
        assert verified["to_update"] == 0 and verified["disagreeing"] == 0, verified

        # Real Nova's view: in sync, and every row holds exactly the bytes the plan approved
        # (its after-bytes if the plan changes it, else what it held before).
        assert stale_copies(demo_db) == 0
        plan = rest.xcom(SYNC, run_id, "combine_plans")
        after = row_hashes(demo_db)
        assert {c["key"] for c in plan["copies"]} <= before.keys() == after.keys(), (before.keys(), plan)
        changed = 0
        for copy in plan["copies"]:
            planned = {row.id: row for row in load_plan(Path(copy["plan_path"])).changes}
            for row_id, sha in after[copy["key"]].items():
                if row_id in planned:
                    assert before[copy["key"]][row_id] == planned[row_id].old_sha256, (copy["where"], row_id)
                    assert sha == planned[row_id].new_sha256, (copy["where"], row_id, "not the approved bytes")
                    changed += 1
                else:
                    assert sha == before[copy["key"]][row_id], (copy["where"], row_id, "not in the plan")
        for key in before.keys() - {c["key"] for c in plan["copies"]}:
            assert after[key] == before[key], f"{key}: rows changed that no plan named"
        assert changed == stale

        # The original bytes back, from the sync's backup, on the surviving worker.
        backups = sorted((tmp_path / "data" / "backups").glob("flavor_copies_*.json"))
        assert len(backups) == 1, backups
        restore_started = time.monotonic()
        run_id = run_approved(rest, RESTORE, {"backup_path": str(backups[0]), "dry_run": False})
        state = rest.wait_for_run(RESTORE, run_id).state
        assert state == "success", rest.task_states(RESTORE, run_id)
        restored = rest.xcom(RESTORE, run_id, "restore")
        assert restored["restored"] == stale and restored["errors"] == 0, restored
        assert copies_hash(demo_db, copies_only=True) == original
        timings["restore"] = time.monotonic() - restore_started
    except BaseException:
        print("\n" + airflow.diagnostics())
        raise
    print(f"\ncelery e2e: {time.monotonic() - started:.0f} s in the test body "
          f"(airflow up {airflow.timings['start_s']:.0f} s); "
          + ", ".join(f"{what} {seconds:.0f} s" for what, seconds in timings.items()))
