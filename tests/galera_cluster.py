"""A real three-node MariaDB Galera cluster on loopback, for tests (issue 13).

Each node is a ``mariadbd`` of its own with wsrep on (Debian's ``galera-4`` provider), its data
directory and its own ports under one temporary directory: the client port, Galera's group
communication (gcomm), IST and SST. Node 1 bootstraps the cluster (``--wsrep-new-cluster``);
nodes 2 and 3 join it and get their state by SST (``rsync``), one after the other. Every node
reads only its own option file (``--defaults-file``), never ``/etc/mysql/my.cnf``.

Failure detection is tuned for a test (a killed node is declared gone in about 2 s instead of
the default 5-15 s), and the provider options can be changed on a running node
(``SET GLOBAL wsrep_provider_options``), e.g. a small ``gcs.fc_limit``.

This file is a helper module, not a test module: ``tests/galera/conftest.py`` has the fixture.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pymysql

from nova_flavor_sync.dburl import DbParams

MARIADBD = shutil.which("mariadbd") or shutil.which("mariadbd", path="/usr/sbin:/usr/local/sbin")
INSTALL_DB = shutil.which("mariadb-install-db")
PROVIDER_PATHS = ("/usr/lib/galera/libgalera_smm.so", "/usr/lib/libgalera_smm.so",
                  "/usr/lib64/galera-4/libgalera_smm.so")
PROVIDER = next((p for p in PROVIDER_PATHS if os.path.exists(p)), None)
# What wsrep_sst_rsync runs (rsync as a daemon on the joiner, ss or lsof to see it listen).
SST_TOOLS = ("rsync", "wsrep_sst_rsync", "my_print_defaults")

def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


# As root, the nodes run as Debian's mysql user: the rsync SST's daemon on a joiner drops root
# for "nobody" otherwise, and then cannot write the data directory.
RUN_AS = ("mysql" if _user_exists("mysql") else "root") if os.geteuid() == 0 else None

# Failure detection in about 2 s (defaults: suspect 5 s, inactive 15 s), a small gcache.
BASE_PROVIDER_OPTIONS = (
    "evs.keepalive_period=PT0.2S; evs.suspect_timeout=PT1.5S; evs.inactive_timeout=PT3S; "
    "evs.inactive_check_period=PT0.5S; evs.install_timeout=PT3S; "
    "evs.join_retrans_period=PT0.3S; pc.announce_timeout=PT1S; gcache.size=64M; gcache.page_size=32M"
)


def missing_tools() -> list[str]:
    """What this machine lacks to run the cluster (empty: it can run)."""
    missing = [name for name, path in (("mariadbd", MARIADBD), ("mariadb-install-db", INSTALL_DB)) if not path]
    if not PROVIDER:
        missing.append("the galera-4 provider (libgalera_smm.so)")
    missing += [tool for tool in SST_TOOLS if not shutil.which(tool)]
    if not (shutil.which("ss") or shutil.which("lsof")):
        missing.append("ss or lsof")
    return missing


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (held open together while picked)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Node:
    """One node of the cluster: its ports, directory, option file and process."""

    def __init__(self, cluster: GaleraCluster, index: int, ports: list[int]) -> None:
        self.cluster = cluster
        self.index = index
        self.name = f"node{index}"
        self.port, self.gcomm_port, self.ist_port, self.sst_port = ports
        self.dir = cluster.base / self.name
        self.datadir = self.dir / "data"
        self.cnf = self.dir / "my.cnf"
        self.log = self.dir / "error.log"
        self.proc: subprocess.Popen | None = None

    @property
    def params(self) -> DbParams:
        return DbParams(database="mysql", host="127.0.0.1", port=self.port, user="root")

    def params_for(self, database: str) -> DbParams:
        return DbParams(database=database, host="127.0.0.1", port=self.port, user="root")

    @property
    def url(self) -> str:
        return f"mysql+pymysql://root@127.0.0.1:{self.port}"

    def write_config(self) -> None:
        peers = ",".join(f"127.0.0.1:{n.gcomm_port}" for n in self.cluster.nodes)
        options = (f"{BASE_PROVIDER_OPTIONS}; gmcast.listen_addr=tcp://127.0.0.1:{self.gcomm_port}; "
                   f"ist.recv_addr=127.0.0.1:{self.ist_port}")
        if self.cluster.provider_options:
            options += "; " + self.cluster.provider_options
        as_user = f"user = {RUN_AS}\n" if RUN_AS else ""
        self.cnf.write_text(
            "[mysqld]\n"
            f"{as_user}"
            f"datadir = {self.datadir}\n"
            f"port = {self.port}\n"
            "bind-address = 127.0.0.1\n"
            f"socket = {self.dir / 'mysqld.sock'}\n"
            f"pid-file = {self.dir / 'mysqld.pid'}\n"
            f"log-error = {self.log}\n"
            "skip-name-resolve\n"
            "character-set-server = utf8mb4\n"
            "collation-server = utf8mb4_general_ci\n"
            "innodb-buffer-pool-size = 32M\n"
            "innodb-log-file-size = 32M\n"
            "innodb-flush-log-at-trx-commit = 2\n"
            "performance-schema = OFF\n"
            "binlog-format = ROW\n"
            "default-storage-engine = InnoDB\n"
            "innodb-autoinc-lock-mode = 2\n"
            "server-id = 1\n"  # as on many real clusters (and the issue's): the same on every node
            "wsrep-on = ON\n"
            f"wsrep-provider = {PROVIDER}\n"
            f"wsrep-cluster-name = {self.cluster.name}\n"
            f"wsrep-cluster-address = gcomm://{peers}\n"
            f"wsrep-node-name = {self.name}\n"
            f"wsrep-node-address = 127.0.0.1:{self.gcomm_port}\n"
            f"wsrep-node-incoming-address = 127.0.0.1:{self.port}\n"
            f"wsrep-provider-options = \"{options}\"\n"
            "wsrep-sst-method = rsync\n"
            f"wsrep-sst-receive-address = 127.0.0.1:{self.sst_port}\n"
            "wsrep-slave-threads = 2\n"
        )

    def make_datadir(self) -> None:
        self.datadir.mkdir()
        if RUN_AS:
            shutil.chown(self.datadir, RUN_AS, RUN_AS)

    def start(self, *, bootstrap: bool = False, timeout: float = 60) -> None:
        """Start mariadbd and wait until the node is Synced in the primary component."""
        args = [MARIADBD, f"--defaults-file={self.cnf}"]
        if bootstrap:
            args.append("--wsrep-new-cluster")
        with open(self.dir / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_synced(timeout)

    def wait_synced(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = self.status()
                if status.get("wsrep_local_state_comment") == "Synced" and status.get("wsrep_ready") == "ON":
                    return
            except pymysql.MySQLError:
                pass
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {self.tail_log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not Synced after {timeout:g} s: {self.tail_log()}")
            time.sleep(0.1)

    def tail_log(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no error log)"

    def connect(self, database: str | None = None, **overrides: Any) -> pymysql.connections.Connection:
        kwargs = {"host": "127.0.0.1", "port": self.port, "user": "root", "password": "", "autocommit": True,
                  "connect_timeout": 3, "read_timeout": 30, **overrides}
        if database:
            kwargs["database"] = database
        return pymysql.connect(**kwargs)

    def sql(self, *statements: str, database: str | None = None) -> list[dict]:
        with self.connect(database) as conn, conn.cursor(pymysql.cursors.DictCursor) as cur:
            rows: list[dict] = []
            for statement in statements:
                cur.execute(statement)
                rows = list(cur.fetchall())
            return rows

    def status(self, like: str = "wsrep%") -> dict[str, str]:
        with self.connect(connect_timeout=2, read_timeout=5) as conn, conn.cursor() as cur:
            cur.execute("SHOW GLOBAL STATUS LIKE %s", (like,))
            return {name.lower(): value for name, value in cur.fetchall()}

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: no shutdown, no goodbye to the cluster."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


class GaleraCluster:
    """Three nodes: ``start()`` bootstraps node 1 and joins the others; ``stop()`` kills every one."""

    def __init__(self, size: int = 3, *, provider_options: str = "") -> None:
        # Short: a socket path has at most 107 bytes.
        self.base = Path(tempfile.mkdtemp(prefix="nfs-galera-"))
        self.name = f"nfs-{self.base.name.rsplit('-', 1)[-1]}"
        self.provider_options = provider_options
        ports = free_ports(4 * size)
        self.nodes = [Node(self, i + 1, ports[4 * i: 4 * i + 4]) for i in range(size)]
        self.timings: dict[str, float] = {}

    def start(self) -> GaleraCluster:
        started = time.monotonic()
        for node in self.nodes:
            node.dir.mkdir()
            node.write_config()
        if RUN_AS:
            for path in (self.base, *(n.dir for n in self.nodes)):
                shutil.chown(path, RUN_AS, RUN_AS)
        first = self.nodes[0]
        subprocess.run(
            [INSTALL_DB, f"--defaults-file={first.cnf}", "--auth-root-authentication-method=normal",
             "--skip-test-db", "--wsrep-on=OFF"],
            check=True, capture_output=True, timeout=120,
        )
        self.timings["install_db"] = time.monotonic() - started
        first.start(bootstrap=True)
        self.timings["bootstrap"] = time.monotonic() - started
        for node in self.nodes[1:]:
            node.make_datadir()
            node.start()  # an empty data directory: the joiner asks for SST
        self.timings["all_synced"] = time.monotonic() - started
        self.wait_size(len(self.nodes))
        return self

    def wait_size(self, size: int, timeout: float = 30) -> None:
        """Until every running node sees a primary component of ``size`` nodes, all Synced."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = [n.status() for n in self.nodes if n.alive()]
                if all(s.get("wsrep_cluster_size") == str(size) and s.get("wsrep_local_state_comment") == "Synced"
                       and s.get("wsrep_cluster_status") == "Primary" for s in states):
                    return
            except pymysql.MySQLError:
                states = []
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not {size} Synced nodes after {timeout:g} s: {states}")
            time.sleep(0.1)

    def restart_node(self, node: Node) -> None:
        """A node that was killed, joined again (its data dropped: a full SST from a donor)."""
        node.kill()
        shutil.rmtree(node.datadir, ignore_errors=True)
        node.make_datadir()
        node.start()
        self.wait_size(len(self.nodes))

    def stop(self) -> None:
        """Kill every node (even on failure: SIGKILL is enough, the data is thrown away)."""
        for node in self.nodes:
            try:
                node.kill()
            except Exception:  # noqa: BLE001 (go on with the others)
                pass

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@contextmanager
def galera_cluster(size: int = 3, **kwargs: Any) -> Iterator[GaleraCluster]:
    cluster = GaleraCluster(size, **kwargs)
    try:
        yield cluster.start()
    finally:
        cluster.remove()


class FlowControl:
    """Galera flow control for real: one node falls behind, and the whole cluster pauses.

    ``start()`` gives the lagging node a tiny ``gcs.fc_limit``, holds ``LOCK TABLES ... READ`` on
    a table of its own there (its appliers then wait for that lock: the node falls behind) and
    writes into that table through ``origin`` until ``wsrep_flow_control_active`` says the
    cluster is paused. A plain ``FLUSH TABLES WITH READ LOCK`` would not do: it desyncs the
    node, which then never asks for flow control. ``release()`` unlocks, lets the held writes
    through and waits until flow control is off again.
    """

    def __init__(self, cluster: GaleraCluster, *, lagging: int = 2, origin: int = 0) -> None:
        self.lagging, self.origin = cluster.nodes[lagging], cluster.nodes[origin]
        self.database = f"nfs_fc_{cluster.base.name.rsplit('-', 1)[-1].lower()}"
        self._lock_conn: pymysql.connections.Connection | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.writes = 0
        self.active_since: float | None = None

    def active(self, node: Node | None = None) -> bool:
        return (node or self.origin).status("wsrep_flow_control_active").get("wsrep_flow_control_active") == "true"

    def start(self, timeout: float = 20) -> float:
        """Flow control on; returns when it became active (time.monotonic())."""
        self.origin.sql(f"CREATE DATABASE IF NOT EXISTS {self.database}",
                        f"CREATE TABLE IF NOT EXISTS {self.database}.t (id INT AUTO_INCREMENT PRIMARY KEY, v INT)")
        self.lagging.wait_synced(10)
        # The table is there too. Synced does not mean every write set is applied yet: the read
        # waits until the node has applied the CREATE TABLE (a causal read), else it can fail
        # with "Table ... doesn't exist" (seen once under load).
        self.lagging.sql("SET SESSION wsrep_sync_wait = 1", f"SELECT COUNT(*) FROM {self.database}.t")
        self.lagging.sql("SET GLOBAL wsrep_provider_options = 'gcs.fc_limit=1; gcs.fc_factor=1.0'")
        self._lock_conn = self.lagging.connect(read_timeout=None)
        with self._lock_conn.cursor() as cur:
            cur.execute(f"LOCK TABLES {self.database}.t READ")
        self._stop.clear()
        self._thread = threading.Thread(target=self._write, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.active():
            if time.monotonic() > deadline:
                raise RuntimeError("flow control never became active")
            time.sleep(0.02)
        self.active_since = time.monotonic()
        return self.active_since

    def _write(self) -> None:
        try:
            with self.origin.connect(read_timeout=None) as conn, conn.cursor() as cur:
                while not self._stop.is_set():
                    cur.execute(f"INSERT INTO {self.database}.t (v) VALUES (1)")  # blocks once paused
                    self.writes += 1
        except pymysql.MySQLError:
            pass  # the origin went away: nothing more to hold

    def release(self, timeout: float = 30) -> float:
        """Flow control off; returns when it was seen off (time.monotonic())."""
        self._stop.set()
        if self._lock_conn is not None:
            try:
                with self._lock_conn.cursor() as cur:
                    cur.execute("UNLOCK TABLES")
            except pymysql.MySQLError:
                pass  # the lagging node is gone: its lock with it
            self._lock_conn.close()
            self._lock_conn = None
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        try:
            self.lagging.sql("SET GLOBAL wsrep_provider_options = 'gcs.fc_limit=16; gcs.fc_factor=1.0'")
        except pymysql.MySQLError:
            pass
        deadline = time.monotonic() + timeout
        while self.origin.alive() and self.active():
            if time.monotonic() > deadline:
                raise RuntimeError("flow control still active after release")
            time.sleep(0.02)
        return time.monotonic()

    def __enter__(self) -> FlowControl:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
