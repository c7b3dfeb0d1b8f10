"""Replica lag read from a real replica: two throwaway MariaDB servers, a primary and its replica.

The test server has no binary log, so it cannot have a replica; this module starts two
small ``mariadbd`` instances of its own (data in a temporary directory, ports picked free),
makes the second replicate from the first, and has the pacer watch it while a plan is
applied to the usual test database. Skipped when ``mariadbd`` is not installed.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest

from dbtools import connect, table_hash
from nova_flavor_sync import service
from nova_flavor_sync.apply import apply_plan
from nova_flavor_sync.dburl import DbParams
from nova_flavor_sync.server_load import ReplicaDb
from nova_flavor_sync.throttle import PaceSettings, ServerBusyError

pytestmark = pytest.mark.db

MARIADBD = shutil.which("mariadbd") or shutil.which("mariadbd", path="/usr/sbin:/usr/local/sbin")
INSTALL_DB = shutil.which("mariadb-install-db")
# Only the replica is checked, and the test database (where the plan is applied) is quiet.
LAG_ONLY = {"target_batch_s": None, "batch_size": 200, "max_threads_running": None, "pause_on_flow_control": False}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A throwaway mariadbd on 127.0.0.1, user root without a password."""

    def __init__(self, base: Path, name: str, *options: str) -> None:
        self.dir = base / name
        as_root = ["--user=root"] if os.geteuid() == 0 else []
        subprocess.run(
            [INSTALL_DB, "--no-defaults", f"--datadir={self.dir}", "--auth-root-authentication-method=normal",
             "--skip-test-db", *as_root],
            check=True, capture_output=True, timeout=120,
        )
        self.port = free_port()
        self.proc = subprocess.Popen(
            [MARIADBD, "--no-defaults", f"--datadir={self.dir}", f"--port={self.port}", "--bind-address=127.0.0.1",
             f"--socket={base / (name + '.sock')}", f"--pid-file={base / (name + '.pid')}",
             f"--log-error={base / (name + '.err')}", "--innodb-buffer-pool-size=16M", *as_root, *options],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.sql("SELECT 1")
                return
            except pymysql.MySQLError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (base / (name + ".err")).read_text()
                    raise RuntimeError(f"mariadbd {name} did not start: {log}") from None
                time.sleep(0.1)

    @property
    def params(self) -> DbParams:
        return DbParams(database="mysql", host="127.0.0.1", port=self.port, user="root")

    def sql(self, *statements: str) -> list[dict]:
        with pymysql.connect(**self.params.connect_kwargs(), autocommit=True, connect_timeout=2) as conn:
            with conn.cursor(pymysql.cursors.DictCursor) as cur:
                for statement in statements:
                    cur.execute(statement)
                return list(cur.fetchall())

    def lag(self) -> int | None:
        return self.sql("SHOW REPLICA STATUS")[0]["Seconds_Behind_Master"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wait_for(condition, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def replication() -> Iterator[tuple[Server, Server]]:
    """(primary, replica): the replica replicating, 0 s behind."""
    if not (MARIADBD and INSTALL_DB):
        pytest.skip("mariadbd and mariadb-install-db are needed to start a primary and a replica")
    base = Path(tempfile.mkdtemp(prefix="nfs-repl-"))  # short: a socket path has at most 107 bytes
    servers: list[Server] = []
    try:
        primary = Server(base, "primary", "--log-bin=primary-bin", "--server-id=11", "--binlog-format=ROW")
        servers.append(primary)
        replica = Server(base, "replica", "--server-id=12")
        servers.append(replica)
        primary.sql("CREATE USER repl@'%' IDENTIFIED BY 'repl'", "GRANT REPLICATION SLAVE ON *.* TO repl@'%'",
                    "CREATE DATABASE lagtest", "CREATE TABLE lagtest.t (id INT PRIMARY KEY)")
        replica.sql(f"CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={primary.port}, MASTER_USER='repl', "
                    "MASTER_PASSWORD='repl', MASTER_USE_GTID=no", "START SLAVE")
        wait_for(lambda: replica.lag() == 0, "the replica to catch up")
        yield primary, replica
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)


def plan_all_keys(db):
    flavors, scope = service.resolve_scope(db, all_keys=True)
    return service.make_plan(db, scope, flavors=flavors)


def test_a_real_replica_s_lag_is_read(replication, demo_db):
    _, replica = replication
    with ReplicaDb(replica.params) as watched:
        assert watched.lag().lag_s == 0.0
        with service.connect(demo_db) as db:
            (lag,) = db.server_load([watched]).replicas
    assert lag.lag_s == 0.0 and lag.name == f"mysql+pymysql://root@127.0.0.1:{replica.port}/mysql"


def test_the_apply_waits_while_the_replica_is_behind_then_goes_on(replication, demo_db, caplog):
    primary, replica = replication
    replica.sql("STOP SLAVE", "CHANGE MASTER TO MASTER_DELAY=2", "START SLAVE")
    try:
        settings = PaceSettings(max_replica_lag_s=0.5, max_wait_s=10, **LAG_ONLY)
        with service.connect(demo_db) as db, caplog.at_level(logging.INFO, logger="nova_flavor_sync"):
            plan = plan_all_keys(db)
            primary.sql("INSERT INTO lagtest.t VALUES (1)")  # applied on the replica 2 s later
            wait_for(lambda: (replica.lag() or 0) >= 1, "the replica to fall behind")
            started = time.monotonic()
            with service.pacing(db, settings, [replica.params]) as pacer:
                result = apply_plan(db, plan, pacer=pacer)
        assert sorted(result.updated) == sorted(c.id for c in plan.changes)
        assert pacer.waited_s >= 0.5 and time.monotonic() - started < 10
        assert f"replica mysql+pymysql://root@127.0.0.1:{replica.port}/mysql is " in caplog.text
        assert "s behind (limit 0.5 s)" in caplog.text
        assert replica.lag() == 0
    finally:
        replica.sql("STOP SLAVE", "CHANGE MASTER TO MASTER_DELAY=0", "START SLAVE")
        wait_for(lambda: replica.lag() == 0, "the replica to catch up")


def test_a_stopped_replica_is_waited_for_until_it_runs_again_or_the_wait_runs_out(replication, demo_db, caplog):
    _, replica = replication
    replica.sql("STOP SLAVE SQL_THREAD")
    try:
        with ReplicaDb(replica.params) as watched:
            lag = watched.lag()
        assert lag.lag_s is None
        assert lag.problem == "replication is not running (Seconds_Behind_Master is NULL, IO thread Yes, SQL thread No)"

        # Started again 1.5 s in: the apply waits, then writes everything.
        restart = threading.Timer(1.5, lambda: replica.sql("START SLAVE SQL_THREAD"))
        restart.start()
        with service.connect(demo_db) as db:
            plan = plan_all_keys(db)
            with service.pacing(db, PaceSettings(max_wait_s=10, **LAG_ONLY), [replica.params]) as pacer:
                result = apply_plan(db, plan, pacer=pacer)
        restart.join()
        assert sorted(result.updated) == sorted(c.id for c in plan.changes)
        assert pacer.waited_s >= 1.0

        # Stopped for good: bounded by max_wait_s, nothing written.
        replica.sql("STOP SLAVE SQL_THREAD")
        with connect(demo_db) as conn, conn.cursor() as cur:  # a flavor changes: its rows are stale again
            cur.execute("UPDATE flavor_extra_specs SET value = CONCAT(value, '-again') "
                        "WHERE `key` LIKE 'aggregate_instance_extra_specs:%%'")
        before = table_hash(demo_db)
        with service.connect(demo_db) as db:
            plan = plan_all_keys(db)
            assert plan.changes
            with service.pacing(db, PaceSettings(max_wait_s=1, **LAG_ONLY), [replica.params]) as pacer, \
                    pytest.raises(ServerBusyError, match=r"lag unknown, replication is not running.*"
                                                         r"\(0 rows written\).*run again"):
                apply_plan(db, plan, pacer=pacer)
        assert table_hash(demo_db) == before
    finally:
        replica.sql("START SLAVE SQL_THREAD")
