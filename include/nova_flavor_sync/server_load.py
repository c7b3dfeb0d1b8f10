"""How loaded the database servers are, and what a Galera node allows: what the pacing asks.

The SQL that is about the servers, not the flavor copies: the load the pacer waits on
(Threads_running, Galera flow control, each replica's lag: ``ServerLoadReader``,
``ReplicaDb``), whether a Galera node may be used at all and the write-set limits its
batches must stay inside (read when ``db.NovaDb`` opens), and why a write that timed out
was stuck. ``db.NovaDb`` keeps its methods (``server_load``, ``fit_pacing``) and asks here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import pymysql
from pymysql.constants import ER

from nova_flavor_sync.dburl import DbParams
from nova_flavor_sync.errors import ConfigError, DatabaseUnavailableError, NovaFlavorSyncError, mysql_error_text
from nova_flavor_sync.throttle import PaceSettings, ReplicaLag, ServerLoad

log = logging.getLogger(__name__)

# Galera write-set limits: batches stay at half of wsrep_max_ws_rows at most.
WRITE_SET_SHARE = 0.5


class Server(Protocol):
    """What the load is read through: a Nova database's connection (``db.NovaDb``)."""

    params: DbParams

    @property
    def conn(self) -> pymysql.connections.Connection: ...

    def reopen_quietly(self) -> None: ...


class ServerLoadReader:
    """Reads one server's load for its pacer, remembering Galera's flow-control counter between reads."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._flow_control: tuple[int, float] | None = None  # (wsrep_flow_control_paused_ns, when)

    def read(self, replicas: Sequence[ReplicaDb] = ()) -> ServerLoad:
        """What the pacer waits on: Threads_running, Galera flow control, each replica's lag.

        Flow control is read two ways: ``wsrep_flow_control_active`` says whether it pauses
        the cluster right now (so a run that starts while it does waits before its first
        batch), and the share of the time since the previous call that the node spent
        paused (the growth of ``wsrep_flow_control_paused_ns``), not ``wsrep_flow_control_paused``,
        which averages over the server's whole uptime. A reading that fails is logged and
        left unknown: the next batch meets the failure itself and retries or stops.
        """
        server = self.server
        try:
            with server.conn.cursor() as cur:
                cur.execute(
                    "SHOW GLOBAL STATUS WHERE Variable_name IN ('Threads_running', "
                    "'wsrep_flow_control_paused_ns', 'wsrep_flow_control_active', 'wsrep_local_recv_queue')"
                )
                status = {str(name).lower(): value for name, value in cur.fetchall()}
        except (pymysql.err.MySQLError, DatabaseUnavailableError) as exc:
            reason = mysql_error_text(exc) if isinstance(exc, pymysql.err.MySQLError) else str(exc)
            log.warning("Cannot read the load of %s: %s", server.params.safe_url(), reason)
            server.reopen_quietly()
            status = {}
        paused = None
        if status.get("wsrep_flow_control_paused_ns") is not None:
            now_ns, now = int(status["wsrep_flow_control_paused_ns"]), time.monotonic()
            if self._flow_control is not None:
                before_ns, before = self._flow_control
                if now_ns >= before_ns and now > before:  # FLUSH STATUS can reset the counter
                    paused = min((now_ns - before_ns) / 1e9 / (now - before), 1.0)
            self._flow_control = (now_ns, now)
        return ServerLoad(
            threads_running=_int_or_none(status.get("threads_running")),
            replicas=tuple(replica.lag() for replica in replicas),
            flow_control_paused=paused,
            recv_queue=_int_or_none(status.get("wsrep_local_recv_queue")),
            # galera 26.4.? and later: flow control in effect right now (also at the first reading)
            flow_control_active=_bool_or_none(status.get("wsrep_flow_control_active")),
        )


def galera_write_set_limits(conn: pymysql.connections.Connection, name: str) -> tuple[int, int] | None:
    """On a Galera node: refuse one outside the primary component; return the write-set limits.

    ``(wsrep_max_ws_rows (0: no limit), wsrep_max_ws_size)``, or None if this is not Galera;
    ``name`` is the database as messages name it. A node that lost quorum
    (``wsrep_cluster_status`` non-Primary, ``wsrep_ready`` OFF) refuses every query but
    SHOW and SET; a node still joining is not ready either: DatabaseUnavailableError.
    """
    with conn.cursor() as cur:
        cur.execute("SHOW GLOBAL VARIABLES WHERE Variable_name IN "
                    "('wsrep_on', 'wsrep_max_ws_rows', 'wsrep_max_ws_size')")
        variables = {str(name).lower(): value for name, value in cur.fetchall()}
        if str(variables.get("wsrep_on", "OFF")).upper() != "ON":
            return None
        cur.execute("SHOW GLOBAL STATUS WHERE Variable_name IN "
                    "('wsrep_ready', 'wsrep_cluster_status', 'wsrep_local_state_comment', 'wsrep_cluster_size')")
        status = {str(name).lower(): value for name, value in cur.fetchall()}
    if status.get("wsrep_ready") != "ON" or status.get("wsrep_cluster_status") != "Primary":
        raise DatabaseUnavailableError(
            f"{name} is a Galera node outside the cluster's primary component "
            f"(wsrep_cluster_status {status.get('wsrep_cluster_status')}, wsrep_ready {status.get('wsrep_ready')}, "
            f"state {status.get('wsrep_local_state_comment')}): it lost quorum or is not joined, and "
            "cannot take reads or writes. Nothing was written; connect through a node of the primary "
            "component, or wait until this one is back in it"
        )
    return (int(variables.get("wsrep_max_ws_rows") or 0), int(variables.get("wsrep_max_ws_size") or 0))


def fit_write_set_limits(settings: PaceSettings, limits: tuple[int, int], cluster_size: Any) -> PaceSettings:
    """The pacing with batches of at most half of a Galera cluster's ``wsrep_max_ws_rows`` (if it has one).

    ``limits``: from ``galera_write_set_limits``; ``cluster_size``: ``wsrep_cluster_size``, for the log.
    """
    max_rows, max_bytes = limits
    log.info("Galera node of cluster size %s: write-set limits wsrep_max_ws_rows %s, wsrep_max_ws_size %d bytes",
             cluster_size, max_rows or "unlimited", max_bytes)
    cap = int(max_rows * WRITE_SET_SHARE) if max_rows else 0
    if cap and cap < settings.max_batch_size:
        cap = max(cap, 1)
        log.warning("Batches of at most %d rows: half of this cluster's wsrep_max_ws_rows (%d)", cap, max_rows)
        return dataclasses.replace(
            settings, batch_size=min(settings.batch_size, cap), max_batch_size=cap,
            min_batch_size=min(settings.min_batch_size, cap),
        )
    return settings


def why_writes_wait(params: DbParams, connect_timeout: int) -> str:
    """Why a write transaction did not finish in time, asked on a connection of its own: " (...)".

    Galera flow control pausing the cluster, else the server's Threads_running; or why the
    server could not be asked.
    """
    try:
        with pymysql.connect(**params.connect_kwargs(), autocommit=True,
                             connect_timeout=connect_timeout, read_timeout=10) as probe, \
                probe.cursor() as cur:
            cur.execute("SHOW GLOBAL STATUS WHERE Variable_name IN "
                        "('wsrep_flow_control_active', 'wsrep_local_send_queue', 'Threads_running')")
            status = {str(k).lower(): v for k, v in cur.fetchall()}
        if status.get("wsrep_flow_control_active") == "true":
            return (" (Galera flow control is pausing the cluster: wsrep_flow_control_active true, "
                    f"wsrep_local_send_queue {status.get('wsrep_local_send_queue')})")
        return f" (Threads_running {status.get('threads_running')})"
    except pymysql.err.MySQLError as exc:
        return f" (and the server cannot be asked why: {mysql_error_text(exc)})"


class ReplicaDb:
    """A replica of the nova_api database, only ever asked how far behind it is."""

    def __init__(self, params: DbParams, *, connect_timeout: int = 5) -> None:
        self.params = params
        self.name = params.safe_url()
        self.connect_timeout = connect_timeout
        self._conn: pymysql.connections.Connection | None = None

    def open(self) -> ReplicaDb:
        """Connect and read the lag once; refuse (exit 4) what is not a replica we can watch."""
        self._connect()
        try:
            lag = self._read_lag()
        except pymysql.err.MySQLError as exc:
            self.close()
            raise DatabaseUnavailableError(
                f"cannot read the replication status of {self.name}: {mysql_error_text(exc)}"
            ) from None
        except BaseException:
            self.close()
            raise
        log.info("Replica %s: %s", self.name, lag.problem if lag.lag_s is None else f"{lag.lag_s:g} s behind")
        return self

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(pymysql.err.Error):  # already gone: nothing to close
                self._conn.close()
        self._conn = None

    def __enter__(self) -> ReplicaDb:
        return self.open() if self._conn is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def lag(self) -> ReplicaLag:
        """Seconds behind; unknown (None, with the reason) if replication stopped or the replica is away.

        A connection that fails (e.g. one the replica dropped while idle) is opened again at once.
        """
        if self._conn is not None:
            try:
                return self._read_lag()
            except pymysql.err.MySQLError:
                self.close()  # connect again below
            except NovaFlavorSyncError as exc:
                return ReplicaLag(self.name, None, f"cannot read its replication status ({exc})")
        try:
            self._connect()
            return self._read_lag()
        except (pymysql.err.MySQLError, NovaFlavorSyncError) as exc:
            problem = mysql_error_text(exc) if isinstance(exc, pymysql.err.MySQLError) else str(exc)
            self.close()
            return ReplicaLag(self.name, None, f"cannot read its replication status ({problem})")

    def _connect(self) -> None:
        self.close()
        try:
            self._conn = pymysql.connect(
                **self.params.connect_kwargs(), autocommit=True, connect_timeout=self.connect_timeout,
                read_timeout=30,
            )
            with self._conn.cursor() as cur:
                encrypted = cur.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'") and cur.fetchone()[1]
        except pymysql.err.MySQLError as exc:
            self.close()
            raise DatabaseUnavailableError(
                f"cannot connect to replica {self.name}: {mysql_error_text(exc)}"
            ) from None
        if self.params.requires_tls() and not encrypted:
            # PyMySQL quietly goes on in clear text when the server offers no TLS.
            self.close()
            raise DatabaseUnavailableError(
                f"the connection to replica {self.name} is not encrypted, but its settings ask for TLS"
            )

    def _read_lag(self) -> ReplicaLag:
        rows = self._replica_status()
        if not rows:
            raise ConfigError(
                f"{self.name} is not a replica (SHOW REPLICA STATUS is empty): give only replicas of "
                "the nova_api database with --replica-db-url"
            )
        lags = []
        for row in rows:  # one row per replication channel
            lag = row.get("Seconds_Behind_Master", row.get("Seconds_Behind_Source"))
            if lag is None:
                io = row.get("Slave_IO_Running", row.get("Replica_IO_Running"))
                sql = row.get("Slave_SQL_Running", row.get("Replica_SQL_Running"))
                return ReplicaLag(self.name, None, "replication is not running (Seconds_Behind_Master is NULL, "
                                                   f"IO thread {io}, SQL thread {sql})")
            lags.append(float(lag))
        return ReplicaLag(self.name, max(lags))

    def _replica_status(self) -> list[dict[str, Any]]:
        assert self._conn is not None
        # SHOW REPLICA STATUS: MariaDB 10.5.1+, MySQL 8.0.22+ (8.4 knows only this one);
        # SHOW SLAVE STATUS for older servers.
        for sql in ("SHOW REPLICA STATUS", "SHOW SLAVE STATUS"):
            try:
                with self._conn.cursor(pymysql.cursors.DictCursor) as cur:
                    cur.execute(sql)
                    return list(cur.fetchall())
            except pymysql.err.ProgrammingError as exc:
                if exc.args and exc.args[0] == ER.PARSE_ERROR and sql == "SHOW REPLICA STATUS":
                    continue
                problem = mysql_error_text(exc)
            except pymysql.err.OperationalError as exc:
                if not (exc.args and exc.args[0] in (ER.SPECIFIC_ACCESS_DENIED_ERROR, ER.ACCESS_DENIED_ERROR)):
                    raise
                problem = mysql_error_text(exc)
            raise ConfigError(
                f"cannot read the replication status of {self.name}: {problem} (the user needs the "
                "REPLICA MONITOR privilege on MariaDB, REPLICATION CLIENT on MySQL)"
            )
        return []


def _bool_or_none(value: Any) -> bool | None:
    if value is None:
        return None
    return str(value).strip().lower() in ("true", "on", "1", "yes")


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
