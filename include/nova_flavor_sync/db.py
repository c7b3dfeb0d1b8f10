"""The SQL of the flavor copies: connect, check the schema, read in keyset pages, CAS writes.

Reads run in autocommit mode, so no read holds a snapshot (or an InnoDB purge back) while
the run goes on. Each write batch is one short transaction of compare-and-swap UPDATEs.
What the pacing asks of a server (its load, a replica's lag, a Galera node's state and
write-set limits) is in ``server_load``; NovaDb's ``server_load`` and ``fit_pacing`` ask there.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self

import orjson
import pymysql
from pymysql.constants import ER

from nova_flavor_sync.dburl import DbParams
from nova_flavor_sync.errors import (
    ApplyAbortedError,
    DatabaseUnavailableError,
    NovaFlavorSyncError,
    SchemaError,
    mysql_error_text,
)
from nova_flavor_sync.flavor import Flavor
from nova_flavor_sync.plan import SpecRow
from nova_flavor_sync.server_load import (
    ReplicaDb,
    ServerLoadReader,
    fit_write_set_limits,
    galera_write_set_limits,
    why_writes_wait,
)
from nova_flavor_sync.spec_json import (
    INSTANCE_FLAVOR,
    REQUEST_SPEC,
    CopyLayout,
    SpecShapeError,
    instance_flavor_in_flux,
)
from nova_flavor_sync.throttle import DEFAULT_MAX_WAIT_S, PaceSettings, ServerBusyError, ServerLoad

log = logging.getLogger(__name__)

# What the tool reads and writes; anything missing means this is not a nova_api database.
API_REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "request_specs": ("id", "instance_uuid", "spec", "created_at", "updated_at"),
    "flavors": ("id", "flavorid", "name"),
    "flavor_extra_specs": ("flavor_id", "key", "value"),
    "instance_mappings": ("instance_uuid", "cell_id", "queued_for_delete"),
    "cell_mappings": ("id", "uuid", "name", "database_connection", "disabled"),
}
# ... in a cell database (cell0 and every other cell have the same schema).
CELL_REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "instances": ("uuid", "vm_state", "task_state", "deleted", "instance_type_id"),
    "instance_extra": ("id", "instance_uuid", "flavor", "updated_at", "deleted"),
}



@dataclass(frozen=True, slots=True)
class CopyTable:
    """Where one kind of flavor copy is kept: its table, the JSON column, and the JSON's layout."""

    table: str
    column: str
    layout: CopyLayout
    # More the compare-and-swap checks, as SQL after WHERE ... AND (no parameters).
    write_guard: str = ""


REQUEST_SPECS = CopyTable("request_specs", "spec", REQUEST_SPEC)  # in nova_api
# An instance copy is written only while its instance is still idle, as when it was planned:
# a resize or migration that started since then (a task_state set, vm_state resized) or a
# delete leaves the copy alone even where the flavor bytes did not change yet.
INSTANCE_EXTRA = CopyTable(
    "instance_extra", "flavor", INSTANCE_FLAVOR,
    write_guard=(
        "deleted = 0 AND instance_uuid IN (SELECT uuid FROM instances WHERE deleted = 0 "
        "AND task_state IS NULL AND (vm_state IS NULL OR vm_state != 'resized'))"
    ),
)  # in each cell database

# Nova's CellMapping.CELL0_UUID: the cell of instances that failed to schedule.
CELL0_UUID = "00000000-0000-0000-0000-000000000000"

# Errors after which the same batch can simply be tried again.
RETRYABLE_ERRORS = {
    ER.LOCK_DEADLOCK: "deadlock",
    ER.LOCK_WAIT_TIMEOUT: "lock wait timeout",
    2003: "cannot reach the server",
    2006: "server has gone away",
    2013: "lost connection to the server",
    1927: "connection was killed",
    # Galera: the node left the primary component (lost quorum) since the connection was
    # opened ("WSREP has not yet prepared node for application use"); reconnecting refuses
    # such a node with its own message (NovaDb.open), so the retries end, with exit 5.
    ER.UNKNOWN_COM_ERROR: "the Galera node is not ready (not in the primary component)",
}

DEFAULT_PAGE_SIZE = 1000
# Why an instance_extra row whose instance is not in its cell's instances table is left alone.
MISSING_INSTANCE_ROW = "instance row missing from its cell"
# Our row locks must not keep Nova waiting long: give up (and retry later) after this.
LOCK_WAIT_TIMEOUT_S = 5
# Leave room under max_allowed_packet for the statement around the spec texts.
PACKET_HEADROOM = 64 * 1024
# How long one write transaction (its UPDATEs and COMMIT) may wait for the server, at least.
# On Galera a COMMIT waits, without any timeout of the server's, for as long as flow control
# pauses the cluster; neither KILL nor max_statement_time ends that wait (MariaDB 10.11,
# galera 26.4). The only bound is the client's: a read timeout on the connection. The pacing
# sets it to --max-load-wait (a COMMIT stuck behind the load is waiting for the load), but
# never below this, so a row lock wait (LOCK_WAIT_TIMEOUT_S) or a slow big batch is not
# mistaken for it.
MIN_WRITE_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class SpecWrite:
    """One compare-and-swap: set ``new_spec`` only where the row still hashes to ``expected_sha256``."""

    id: int
    expected_sha256: str
    new_spec: str
    new_sha256: str


class WriteTimeoutError(ServerBusyError):
    """A write transaction did not finish in time (e.g. a COMMIT held by Galera flow control)."""


class WriteSetTooLargeError(ApplyAbortedError):
    """The server refused a batch as too large a Galera write-set (wsrep_max_ws_rows/_size)."""


def retryable_reason(exc: BaseException) -> str | None:
    """Why a batch may be retried after ``exc``, or None if it may not."""
    if isinstance(exc, DatabaseUnavailableError):
        return "cannot reach the server"
    if isinstance(exc, pymysql.err.InterfaceError):
        return "connection closed"
    if isinstance(exc, pymysql.err.OperationalError) and exc.args:
        return RETRYABLE_ERRORS.get(exc.args[0])
    return None


# A row's updated_at as backups keep it: the server's text ("YYYY-mm-dd HH:MM:SS" for Nova's
# DATETIME columns), not a datetime: PyMySQL's parsing of each one into a datetime, and our
# strftime back, were a seventh of a backup's CPU. A date Python cannot hold ('0000-00-00 ...')
# comes through as it is.
UPDATED_AT_TEXT = "CAST({} AS CHAR)"


def utcnow() -> datetime:
    """What Nova's ORM writes into updated_at: naive UTC, whole seconds."""
    return datetime.now(UTC).replace(tzinfo=None, microsecond=0)


class NovaDb:
    """A connection to one Nova database, re-opened after a lost connection.

    A subclass says which database it is: its kind (for messages) and the tables and
    columns it must have (``check_schema``).
    """

    KIND = "Nova"
    REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {}
    COPY: CopyTable  # the table of flavor copies this database holds

    def __init__(
        self, params: DbParams, *, connect_timeout: int = 10, lock_wait_timeout: int = LOCK_WAIT_TIMEOUT_S
    ) -> None:
        self.params = params
        self.connect_timeout = connect_timeout
        self.lock_wait_timeout = lock_wait_timeout
        self._conn: pymysql.connections.Connection | None = None
        self._max_packet = 0
        self._load = ServerLoadReader(self)
        # The longest a write transaction may wait for the server (see MIN_WRITE_TIMEOUT_S).
        self.write_timeout_s = DEFAULT_MAX_WAIT_S
        # Galera: wsrep_max_ws_rows (0: no limit) and wsrep_max_ws_size, read on open; None: not Galera.
        self.write_set_limits: tuple[int, int] | None = None

    # -- connecting ---------------------------------------------------------------------

    def open(self) -> Self:
        """Connect, or raise DatabaseUnavailableError with a message free of secrets."""
        self.close()
        try:
            self._conn = pymysql.connect(
                **self.params.connect_kwargs(),
                autocommit=True,
                connect_timeout=self.connect_timeout,
                init_command=f"SET SESSION innodb_lock_wait_timeout = {int(self.lock_wait_timeout)}",
            )
        except pymysql.err.MySQLError as exc:
            raise DatabaseUnavailableError(
                f"cannot connect to {self.params.safe_url()}: {mysql_error_text(exc)}"
            ) from None
        if self.params.requires_tls() and not self._scalar("SHOW SESSION STATUS LIKE 'Ssl_cipher'", column=1):
            # PyMySQL quietly goes on in clear text when the server offers no TLS.
            self.close()
            raise DatabaseUnavailableError(
                f"the connection to {self.params.safe_url()} is not encrypted, but its "
                "settings ask for TLS: refusing to send anything over it"
            )
        try:
            self.write_set_limits = galera_write_set_limits(self._conn, self.params.safe_url())
        except DatabaseUnavailableError:  # a Galera node outside the primary component
            self.close()
            raise
        self._max_packet = int(self._scalar("SELECT @@max_allowed_packet"))
        return self

    def fit_pacing(self, settings: PaceSettings) -> PaceSettings:
        """The run's pacing fitted to this server: the write timeout, batches inside Galera's limits.

        Every write transaction may wait at most ``max(max_wait_s, MIN_WRITE_TIMEOUT_S)``. On
        Galera with a ``wsrep_max_ws_rows`` limit, batches get at most half of it
        (``server_load.fit_write_set_limits``).
        """
        self.write_timeout_s = max(settings.max_wait_s, MIN_WRITE_TIMEOUT_S)
        if self.write_set_limits is None:
            return settings
        cluster_size = self._scalar("SHOW GLOBAL STATUS LIKE 'wsrep_cluster_size'", column=1)
        return fit_write_set_limits(settings, self.write_set_limits, cluster_size)

    def close(self) -> None:
        _close_quietly(self._conn)
        self._conn = None

    def reopen(self) -> None:
        """After a lost connection: drop whatever is left and connect again."""
        self.close()
        self.open()

    def reopen_quietly(self) -> None:
        """Reconnect before a retry; if the server is still away, the retry will say so."""
        try:
            self.reopen()
        except DatabaseUnavailableError as exc:
            log.warning("Reconnecting failed: %s", exc)

    def __enter__(self) -> Self:
        return self.open() if self._conn is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def conn(self) -> pymysql.connections.Connection:
        if self._conn is None:
            self.open()
        assert self._conn is not None
        return self._conn

    # -- checking -----------------------------------------------------------------------

    def check_schema(self) -> None:
        """Raise SchemaError naming every required table or column that is missing."""
        with self.conn.cursor() as cur:
            cur.execute(
                "SELECT TABLE_NAME, COLUMN_NAME FROM information_schema.COLUMNS "
                "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME IN %s",
                (tuple(self.REQUIRED_COLUMNS),),
            )
            present = {(t.lower(), c.lower()) for t, c in cur.fetchall()}
        missing_tables = [t for t in self.REQUIRED_COLUMNS if not any(p[0] == t for p in present)]
        missing_columns = [
            f"{t}.{c}"
            for t, cols in self.REQUIRED_COLUMNS.items()
            if t not in missing_tables
            for c in cols
            if (t, c) not in present
        ]
        if missing_tables or missing_columns:
            what = [f"table {t}" for t in missing_tables] + [f"column {c}" for c in missing_columns]
            raise SchemaError(
                f"{self.params.database} is not a {self.KIND} database this tool can use: "
                f"missing {', '.join(what)}"
            )

    def server_identity(self) -> dict[str, Any]:
        """Which server and schema this is, recorded in backups and checked on restore."""
        with self.conn.cursor() as cur:
            cur.execute(
                "SHOW GLOBAL VARIABLES WHERE Variable_name IN "
                "('server_uuid', 'hostname', 'port', 'server_id', 'wsrep_on')"
            )
            variables = dict(cur.fetchall())
            galera_uuid = None
            if str(variables.get("wsrep_on", "OFF")).upper() == "ON":
                cur.execute("SHOW GLOBAL STATUS LIKE 'wsrep_cluster_state_uuid'")
                row = cur.fetchone()
                galera_uuid = row[1] if row else None
            cur.execute("SELECT DATABASE()")
            schema = cur.fetchone()[0]
        return {
            "host": self.params.host,
            "port": self.params.port,
            "schema": schema,
            # MySQL has a server_uuid; MariaDB has none, so hostname, port and server_id
            # stand in for it, and a Galera cluster is known by its state uuid.
            "server_uuid": variables.get("server_uuid"),
            "server_hostname": variables.get("hostname"),
            "server_port": int(variables["port"]) if variables.get("port") else None,
            "server_id": int(variables["server_id"]) if variables.get("server_id") else None,
            "galera_cluster_uuid": galera_uuid,
        }

    def server_load(self, replicas: Sequence[ReplicaDb] = ()) -> ServerLoad:
        """What the pacer waits on: Threads_running, Galera flow control, each replica's lag
        (``server_load.ServerLoadReader``)."""
        return self._load.read(replicas)

    # -- the flavor copies: read and compare-and-swap -----------------------------------

    def read_specs(
        self, ids: Sequence[int], *, with_updated_at: bool = True
    ) -> dict[int, tuple[str, str, str | None]]:
        """Current ``(instance_uuid, text, updated_at)`` of the given rows of COPY; gone rows are absent.

        ``updated_at`` as the server writes it (``UPDATED_AT_TEXT``); without
        ``with_updated_at`` it is not read (None).
        """
        if not ids:
            return {}
        column = UPDATED_AT_TEXT.format("updated_at") if with_updated_at else "NULL"
        with self.conn.cursor() as cur:
            cur.execute(
                f"SELECT id, instance_uuid, {self.COPY.column}, {column} FROM {self.COPY.table} WHERE id IN %s",
                (tuple(ids),),
            )
            return {row_id: (uuid, spec, updated_at) for row_id, uuid, spec, updated_at in cur.fetchall()}

    # -- writing ------------------------------------------------------------------------

    def write_specs(self, writes: Sequence[SpecWrite]) -> set[int]:
        """Compare-and-swap the rows of COPY in one transaction; return the ids that were written.

        A row is written only if its text still hashes to ``expected_sha256``, so nothing
        Nova wrote after we read is ever overwritten. One multi-row UPDATE per chunk; the
        rows are re-read only when the affected-row count says some lost the compare.
        """
        if not writes:
            return set()
        now = utcnow()
        written: set[int] = set()
        conn = self.conn
        deadline = time.monotonic() + self.write_timeout_s
        bounded = _BoundedReads(conn, deadline)
        try:
            with bounded:
                conn.begin()
                with conn.cursor() as cur:
                    for chunk in self._chunks(writes):
                        bounded.arm()
                        affected = cur.execute(*_cas_update(self.COPY, chunk, now))
                        if affected == len(chunk):
                            written.update(w.id for w in chunk)
                            continue
                        bounded.arm()
                        cur.execute(
                            f"SELECT id, SHA2({self.COPY.column}, 256) FROM {self.COPY.table} WHERE id IN %s",
                            (tuple(w.id for w in chunk),),
                        )
                        now_there = dict(cur.fetchall())
                        written.update(w.id for w in chunk if now_there.get(w.id) == w.new_sha256)
                bounded.arm()
                conn.commit()
        except pymysql.err.OperationalError as exc:
            if bounded.timed_out(exc):
                self.close()  # PyMySQL closed the socket; the server goes on with the transaction
                raise WriteTimeoutError(self._write_timeout_message(writes)) from None
            if _write_set_too_large(exc):
                _rollback_quietly(conn)
                raise WriteSetTooLargeError(
                    f"the batch of rows {writes[0].id}-{writes[-1].id} ({len(writes)} rows) is larger than "
                    f"this Galera cluster accepts in one transaction ({mysql_error_text(exc)}); nothing of it was "
                    "written. Run again with a smaller --batch-size"
                ) from None
            _rollback_quietly(conn)
            raise
        except BaseException:
            _rollback_quietly(conn)
            raise
        return written

    def _write_timeout_message(self, writes: Sequence[SpecWrite]) -> str:
        why = why_writes_wait(self.params, self.connect_timeout)  # on a connection of its own
        return (
            f"the write of rows {writes[0].id}-{writes[-1].id} ({len(writes)} rows) did not finish within "
            f"{self.write_timeout_s:g} s{why}; stopped waiting for it. The server may still commit it "
            "later, which is harmless: each row is written only over the exact bytes it was planned "
            "from. Every batch before it is written in full; run again later (the next run finds "
            "what this one left undone)"
        )

    def fits_in_one_statement(self, spec: str) -> bool:
        """Whether a spec this long can be sent at all under the server's max_allowed_packet."""
        return _statement_cost(spec) <= self._statement_budget()

    def _statement_budget(self) -> int:
        return max(self._max_packet // 2 - PACKET_HEADROOM, 1)

    def _chunks(self, writes: Sequence[SpecWrite]) -> Iterator[Sequence[SpecWrite]]:
        """Split writes so no statement exceeds the server's max_allowed_packet."""
        budget = self._statement_budget()
        chunk: list[SpecWrite] = []
        size = 0
        for write in writes:
            cost = _statement_cost(write.new_spec)
            if chunk and size + cost > budget:
                yield chunk
                chunk, size = [], 0
            chunk.append(write)
            size += cost
        if chunk:
            yield chunk

    def _scalar(self, sql: str, column: int = 0) -> Any:
        with self.conn.cursor() as cur:
            cur.execute(sql)
            row = cur.fetchone()
            return row[column] if row else None


def _aggregated_extra_specs(cur: pymysql.cursors.Cursor) -> dict[int, dict[str, str | None]] | None:
    """Each flavor's extra specs as one JSON object (JSON_OBJECTAGG): one row per flavor, not one
    per spec, which at thousands of flavors took most of the time before a plan's workers
    start. Each object must match the count of its specs and the sum of a CRC32 of each key
    and value, which the server computes from the rows themselves; None (read them row by
    row) if one does not (truncated, or escaped otherwise than JSON), or if the server has no
    JSON_OBJECTAGG (MariaDB before 10.5)."""
    try:
        cur.execute(
            "SELECT flavor_id, JSON_OBJECTAGG(`key`, value), COUNT(*), "
            "COALESCE(SUM(CRC32(CONCAT(`key`, CHAR(0), value))), 0) FROM flavor_extra_specs GROUP BY flavor_id"
        )
    except pymysql.MySQLError as exc:
        if exc.args[0] not in (ER.PARSE_ERROR, ER.SP_DOES_NOT_EXIST):
            raise
        return None
    specs: dict[int, dict[str, str | None]] = {}
    for flavor_id, text, count, crc_sum in cur.fetchall():
        try:
            found = orjson.loads(text)
        except (TypeError, orjson.JSONDecodeError):
            return None
        if not isinstance(found, dict) or len(found) != count:
            return None
        crcs = 0
        for key, value in found.items():
            if value is not None:
                if not isinstance(value, str):
                    return None
                crcs += zlib.crc32(f"{key}\0{value}".encode())
        if crcs != crc_sum:
            return None
        specs[flavor_id] = dict(sorted(found.items()))  # in key order, as read row by row
    return specs


def _extra_specs_by_rows(cur: pymysql.cursors.Cursor) -> dict[int, dict[str, str | None]]:
    cur.execute("SELECT flavor_id, `key`, value FROM flavor_extra_specs ORDER BY flavor_id, `key`")
    specs: dict[int, dict[str, str | None]] = {}
    for flavor_id, key, value in cur.fetchall():
        specs.setdefault(flavor_id, {})[key] = value
    return specs


class NovaApiDb(NovaDb):
    """The nova_api database: flavors, request_specs (the RequestSpec copies), cell mappings."""

    KIND = "nova_api"
    REQUIRED_COLUMNS = API_REQUIRED_COLUMNS
    COPY = REQUEST_SPECS

    # -- reading ------------------------------------------------------------------------

    def cell_mappings(self) -> list[tuple[str, str | None, str, bool]]:
        """Every cell_mappings row as ``(uuid, name, database_connection, disabled)``, by id."""
        with self.conn.cursor() as cur:
            cur.execute("SELECT uuid, name, database_connection, disabled FROM cell_mappings ORDER BY id")
            return [(uuid, name, url or "", bool(disabled)) for uuid, name, url, disabled in cur.fetchall()]

    def load_flavors(self) -> dict[int, Flavor]:
        """Every flavor with its extra specs, read once per run."""
        with self.conn.cursor() as cur:
            cur.execute("SELECT id, flavorid, name FROM flavors ORDER BY id")
            rows = cur.fetchall()
            specs = _aggregated_extra_specs(cur)
            if specs is None:
                specs = _extra_specs_by_rows(cur)
        return {fid: Flavor(fid, flavorid, name, specs.get(fid, {})) for fid, flavorid, name in rows}

    def iter_spec_rows(
        self,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        instance_uuids: Sequence[str] | None = None,
        with_updated_at: bool = False,
        id_range: tuple[int, int] | None = None,
        left_alone: Mapping[str, str] | None = None,
    ) -> Iterator[SpecRow]:
        """Yield request_specs rows in id order, a keyset page at a time.

        ``id_range`` ``(first, last)`` limits the read to those ids (a plan worker's share).
        ``left_alone`` maps the uuids of instances whose copies must not be written to why
        (``cells.instances_to_leave_alone``); by default, those instance_mappings marks as
        queued for delete. Either is read once, up front: joining instance_mappings in
        every page costs a random index lookup per row, which at a million rows doubled
        the time of the read.
        """
        where = ""
        extra: tuple[Any, ...] = ()
        if instance_uuids is not None:
            if not instance_uuids:
                return
            where += "AND instance_uuid IN %s "
            extra += (tuple(instance_uuids),)
        last_id = 0
        if id_range is not None:
            last_id = id_range[0] - 1
            where += "AND id <= %s "
            extra += (id_range[1],)
        if left_alone is None:
            left_alone = dict.fromkeys(self.queued_for_delete(), "instance is queued for delete")
        columns = "id, instance_uuid, spec" + (", " + UPDATED_AT_TEXT.format("updated_at") if with_updated_at else "")
        sql = f"SELECT {columns} FROM request_specs WHERE id > %s {where}ORDER BY id LIMIT %s"
        while True:
            with self.conn.cursor() as cur:
                cur.execute(sql, (last_id, *extra, page_size))
                page = cur.fetchall()
            for row_id, uuid, spec, *updated_at in page:
                yield SpecRow(row_id, uuid, spec, updated_at[0] if updated_at else None, left_alone.get(uuid, ""))
            if len(page) < page_size:
                return
            last_id = page[-1][0]
            del page  # before the next page is read: one page in memory, not two

    def spec_id_bounds(self) -> tuple[int, int] | None:
        """The lowest and highest request_specs id (from the primary key: instant), or None."""
        with self.conn.cursor() as cur:
            cur.execute("SELECT MIN(id), MAX(id) FROM request_specs")
            low, high = cur.fetchone()
        return None if low is None else (int(low), int(high))

    def queued_for_delete(self) -> frozenset[str]:
        """Instance uuids whose mapping says the instance is queued for delete."""
        with self.conn.cursor(pymysql.cursors.SSCursor) as cur:  # streamed: see busy_instances
            cur.execute("SELECT instance_uuid FROM instance_mappings WHERE queued_for_delete = 1")
            return frozenset(uuid for (uuid,) in cur)

    def instances_without_a_cell(self) -> dict[str, str]:
        """RequestSpecs' instances that are in no cell Nova could write them to, with the reason.

        No instance_mappings row, or one without a cell (the instance is still being
        built: Nova has a build_requests row for it), or in cell0 (it never scheduled).

        Two queries, neither of which reads a row of either table: the uuids without a
        mapping by joining the two uuid indexes (both in uuid order: the server walks them
        side by side), then the few mappings without a cell or in cell0 through the
        ``cell_id`` index. One query joining the mappings' rows for their ``cell_id`` looked
        up every mapping row at random: 1 s a 100,000 instances, growing faster than the table.
        """
        found: dict[str, str] = {}
        with self.conn.cursor() as cur:
            cur.execute(
                "SELECT r.instance_uuid FROM request_specs r "
                "LEFT JOIN instance_mappings m ON m.instance_uuid = r.instance_uuid "
                "WHERE m.instance_uuid IS NULL"
            )
            found.update((uuid, "instance has no instance mapping") for (uuid,) in cur.fetchall())
            cur.execute("SELECT id FROM cell_mappings WHERE uuid = %s", (CELL0_UUID,))
            cell0_ids = tuple(i for (i,) in cur.fetchall()) or (-1,)
            cur.execute(
                "SELECT m.instance_uuid, m.cell_id FROM instance_mappings m "
                "WHERE m.cell_id IS NULL OR m.cell_id IN %s",
                (cell0_ids,),
            )
            unplaced = dict(cur.fetchall())
            if unplaced:
                uuids = list(unplaced)
                for start in range(0, len(uuids), DEFAULT_PAGE_SIZE):  # only those with a RequestSpec
                    cur.execute(
                        "SELECT instance_uuid FROM request_specs WHERE instance_uuid IN %s",
                        (tuple(uuids[start : start + DEFAULT_PAGE_SIZE]),),
                    )
                    for (uuid,) in cur.fetchall():
                        found[uuid] = (
                            "instance has no cell yet (still being built)" if unplaced[uuid] is None
                            else "instance never scheduled (in cell0)"
                        )
        return found

    def mapped_instances(self, cell_uuid: str, *, chunk: int = 10_000) -> Iterator[str]:
        """The uuids of the instances instance_mappings places in this cell, in uuid order.

        One statement, streamed (an unbuffered cursor, ``chunk`` rows at a time): no index
        holds (cell_id, instance_uuid), so the server sorts the cell's mappings once; keyset
        pages would sort them again for every page. The connection serves nothing else until
        the last row is read.
        """
        with self.conn.cursor(pymysql.cursors.SSCursor) as cur:
            cur.execute(
                "SELECT m.instance_uuid FROM instance_mappings m JOIN cell_mappings c ON c.id = m.cell_id "
                "WHERE c.uuid = %s ORDER BY m.instance_uuid",
                (cell_uuid,),
            )
            while rows := cur.fetchmany(chunk):
                yield from (uuid for (uuid,) in rows)

    def mapped_instances_missing_from(self, cell_uuid: str, cell_schema: str) -> list[str]:
        """The instances instance_mappings places in this cell that have no instances row in
        ``cell_schema``, a schema on this same server, in one anti-join the server answers
        from the instances' uuid index (few rows come back, normally none).

        Raises pymysql's errors where this user may not read that schema or the two columns
        do not compare: the caller falls back to ``mapped_instances`` and a merge.
        """
        quoted = "`" + cell_schema.replace("`", "``") + "`"
        with self.conn.cursor() as cur:
            cur.execute(
                "SELECT m.instance_uuid FROM instance_mappings m JOIN cell_mappings c ON c.id = m.cell_id "
                f"LEFT JOIN {quoted}.instances i ON i.uuid = m.instance_uuid "
                "WHERE c.uuid = %s AND i.id IS NULL ORDER BY m.instance_uuid",
                (cell_uuid,),
            )
            return [uuid for (uuid,) in cur.fetchall()]

    def count_specs(self) -> int:
        """How many request_specs rows there are (for progress; one index scan)."""
        return int(self._scalar("SELECT COUNT(*) FROM request_specs"))

class NovaCellDb(NovaDb):
    """A cell database: its instances, and each one's own flavor copy (instance_extra.flavor)."""

    KIND = "Nova cell"
    REQUIRED_COLUMNS = CELL_REQUIRED_COLUMNS
    COPY = INSTANCE_EXTRA

    def instance_counts(self) -> dict[str, int]:
        """How many instances the cell holds: ``total``, ``deleted`` (soft-deleted), ``busy``.

        Busy: in the middle of an operation (``vm_state`` resized or a ``task_state`` set),
        the instances whose copies are left alone.
        """
        with self.conn.cursor() as cur:
            cur.execute(
                "SELECT COUNT(*), COALESCE(SUM(deleted != 0), 0), "
                "COALESCE(SUM(deleted = 0 AND (vm_state = 'resized' OR task_state IS NOT NULL)), 0) FROM instances"
            )
            total, deleted, busy = cur.fetchone()
        return {"total": int(total), "deleted": int(deleted), "busy": int(busy)}

    def instance_uuids(self, *, page_size: int = 10_000) -> Iterator[str]:
        """The uuids of the cell's instances rows (deleted ones too), in uuid order, a page at a time."""
        last = ""
        while True:
            with self.conn.cursor() as cur:
                cur.execute("SELECT uuid FROM instances WHERE uuid > %s ORDER BY uuid LIMIT %s", (last, page_size))
                page = [uuid for (uuid,) in cur.fetchall()]
            yield from page
            if len(page) < page_size:
                return
            last = page[-1]

    def busy_instances(self, uuids: Sequence[str] | None = None, *, in_flux: bool = True) -> dict[str, str]:
        """The cell's instances whose copies must be left alone now, with the reason (few, normally).

        Deleted, or in the middle of a resize or migration (``instance_state_reason``).
        ``uuids``: only among these instances (by their uuid indexes), not the whole cell.
        ``in_flux=False``: not those whose flavor alone says so (``old`` or ``new`` set), which
        takes reading every flavor: a plan of the cell's copies reads them anyway
        (``cells.instances_in_flux``).
        """
        found: dict[str, str] = {}
        if uuids is not None and not uuids:
            return found
        among, params = ("", ()) if uuids is None else (" AND {} IN %s", (tuple(uuids),))
        # Streamed (unbuffered), as below: a buffered result stays with the connection until its
        # next query, rows and all; this cell's connection has none until the plan is made
        # (at a million instances, 25,000 rows a cell: 9 MB held by the planner throughout).
        with self.conn.cursor(pymysql.cursors.SSCursor) as cur:
            cur.execute(
                "SELECT uuid, deleted, vm_state, task_state FROM instances "
                "WHERE (deleted != 0 OR vm_state = 'resized' OR task_state IS NOT NULL)" + among.format("uuid"),
                params,
            )
            reasons: dict[str, str] = {}  # one string per distinct reason (see iter_flavor_rows)
            for uuid, deleted, vm_state, task_state in cur:
                reason = instance_state_reason(bool(deleted), vm_state, task_state, None)
                found[uuid] = reasons.setdefault(reason, reason)
        if not in_flux:
            return found
        # old or new set: Nova writes '..., "old": null, "new": null}' when neither is. The
        # server compares only each flavor's last bytes (a LIKE '%...' matches through all of
        # them: twice the time); BINARY: byte for byte, so every other ending, whatever its
        # case, comes back and is judged here (instance_state_reason). Streamed (unbuffered):
        # each such row brings its whole flavor text (tens of thousands of them at a million
        # instances), and a buffered result stays with the connection until its next query.
        with self.conn.cursor(pymysql.cursors.SSCursor) as cur:
            cur.execute(
                "SELECT e.instance_uuid, e.flavor FROM instance_extra e "
                "WHERE e.deleted = 0 AND RIGHT(e.flavor, %s) <> BINARY %s" + among.format("e.instance_uuid"),
                (len(NOT_IN_FLUX_END), NOT_IN_FLUX_END, *params),
            )
            for uuid, flavor in cur:
                reason = instance_state_reason(False, None, None, flavor)
                if reason:
                    found.setdefault(uuid, reason)
        return found

    def flavor_id_bounds(self) -> tuple[int, int] | None:
        """The lowest and highest instance_extra id (from the primary key: instant), or None."""
        with self.conn.cursor() as cur:
            cur.execute("SELECT MIN(id), MAX(id) FROM instance_extra")
            low, high = cur.fetchone()
        return None if low is None else (int(low), int(high))

    def iter_flavor_rows(
        self,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        left_alone: Mapping[str, str] | None = None,
        with_updated_at: bool = False,
        id_range: tuple[int, int] | None = None,
    ) -> Iterator[SpecRow]:
        """Yield instance_extra rows (the instances' own flavor copies) in id order, a keyset page at a time.

        Each row says why it must be left alone, if it must: the reason in ``left_alone``
        (from nova_api, e.g. queued for delete), or its own state (``instance_state_reason``).
        ``id_range`` ``(first, last)`` limits the read to those ids (a plan worker's share).
        """
        left_alone = left_alone or {}
        updated = ", " + UPDATED_AT_TEXT.format("e.updated_at") if with_updated_at else ""
        last_id, where, extra = 0, "", ()
        if id_range is not None:
            last_id, where, extra = id_range[0] - 1, "AND e.id <= %s ", (id_range[1],)
        sql = (
            f"SELECT e.id, e.instance_uuid, e.flavor, {_INSTANCE_STATE}{updated} FROM instance_extra e "
            f"LEFT JOIN instances i ON i.uuid = e.instance_uuid WHERE e.id > %s {where}ORDER BY e.id LIMIT %s"
        )
        # One string per distinct reason, not one per row: a plan keeps a note per row left
        # alone (5% of a million rows is 50,000 notes) and sends them between processes.
        reasons: dict[str, str] = {}
        while True:
            with self.conn.cursor() as cur:
                cur.execute(sql, (last_id, *extra, page_size))
                page = cur.fetchall()
            for row_id, uuid, flavor, state, *updated_at in page:
                if state == "missing":
                    reason = MISSING_INSTANCE_ROW  # cells.MISSING_FROM_CELL
                elif uuid in left_alone:
                    reason = left_alone[uuid]
                else:
                    reason = instance_state_reason(state == "deleted", "resized" if state == "resized" else None,
                                                   state[5:] if state and state[:5] == "task:" else None, flavor)
                    reason = reasons.setdefault(reason, reason)
                yield SpecRow(row_id, uuid, flavor, updated_at[0] if updated_at else None, reason)
            if len(page) < page_size:
                return
            last_id = page[-1][0]
            del page


def identity_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The most telling ``SERVER_IDENTITY_KEYS`` that two ``server_identity`` results both give, or None."""
    return next((keys for keys in SERVER_IDENTITY_KEYS if all(x.get(k) is not None for x in (a, b) for k in keys)),
                None)


def same_server(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool | None:
    """Whether two ``server_identity`` results are the same server (or Galera cluster); None
    when they do not say. Host names may differ for one server (a VIP, a node's name)."""
    keys = identity_keys(a, b)
    return None if keys is None else all(a[k] == b[k] for k in keys)


# What tells one server from another, most telling first: a Galera cluster's state uuid,
# MySQL's server_uuid, MariaDB's hostname, port and server_id.
SERVER_IDENTITY_KEYS = (("galera_cluster_uuid",), ("server_uuid",), ("server_hostname", "server_port", "server_id"))


def left_alone_reason(row: SpecRow, left_alone: Mapping[str, str]) -> str:
    """Why a row read without the instances to leave alone (``left_alone={}``) must be left
    alone once they are known, or "": what ``iter_flavor_rows`` and ``iter_spec_rows`` give
    when they are given them. An instance_extra row without its instance row, for that; else
    the reason given for its instance; else the row's own (its instance's state, in a cell).
    """
    if row.left_alone == MISSING_INSTANCE_ROW:
        return row.left_alone
    return left_alone.get(row.instance_uuid) or row.left_alone


# What instance_state_reason needs of an instance_extra row and its instance, as one column
# (iter_flavor_rows): NULL for an instance that is there, not deleted, not resized and with
# no task_state (nearly every row: one NULL to read instead of five columns, a third less of
# the client's CPU for a cell's rows); else missing, deleted, resized or task:<task_state>,
# in the order instance_state_reason decides.
_INSTANCE_STATE = (
    "CASE WHEN i.uuid IS NULL THEN 'missing' WHEN e.deleted <> 0 OR i.deleted <> 0 THEN 'deleted' "
    "WHEN i.vm_state = 'resized' THEN 'resized' WHEN i.task_state <> '' THEN CONCAT('task:', i.task_state) END"
)
# How Nova's instance_extra.flavor ends when the instance has neither an old nor a new flavor.
NOT_IN_FLUX_END = '"old": null, "new": null}'
# Why an instance whose flavor has ``old`` or ``new`` set is left alone (instance_state_reason).
IN_FLUX = "resize or migration under way (old or new flavor set)"


def instance_state_reason(deleted: bool, vm_state: str | None, task_state: str | None, flavor: str | None) -> str:
    """Why an instance's copies must be left alone now, or "" if they may be synced.

    Nova itself reads and rewrites both copies while a resize or migration runs, so a copy
    changed under it is overwritten or ends up mixing two flavors; a deleted instance's
    copies are history.
    """
    if deleted:
        return "instance is deleted"
    if vm_state == "resized":
        return "resize or migration waits for confirm or revert (vm_state resized)"
    if task_state:
        return f"an operation is under way (task_state {task_state})"
    try:
        if flavor is not None and instance_flavor_in_flux(flavor):
            return IN_FLUX
    except SpecShapeError:
        pass  # unreadable: the planner reports it as an error
    return ""


class _BoundedReads:
    """While a write transaction runs, every wait for the server ends by ``deadline``.

    PyMySQL re-applies the connection's read timeout before each socket read, so setting it
    to the time left before each statement bounds the whole transaction; on exit the
    connection's own timeout (none) is put back.
    """

    def __init__(self, conn: pymysql.connections.Connection, deadline: float) -> None:
        self.conn, self.deadline = conn, deadline
        self._saved = getattr(conn, "_read_timeout", None)

    def __enter__(self) -> _BoundedReads:
        self.arm()
        return self

    def arm(self) -> None:
        self.conn._read_timeout = max(self.deadline - time.monotonic(), 0.001)

    def timed_out(self, exc: pymysql.err.OperationalError) -> bool:
        if not exc.args or exc.args[0] != 2013:
            return False
        return "timed out" in str(exc.args[-1]) or time.monotonic() >= self.deadline - 0.05

    def __exit__(self, *exc_info: object) -> None:
        self.conn._read_timeout = self._saved


def _write_set_too_large(exc: pymysql.err.OperationalError) -> bool:
    """Galera refused the transaction's write-set: ``(1180) wsrep_max_ws_rows exceeded`` at an
    UPDATE, ``(1105) Maximum writeset size exceeded`` at COMMIT (MariaDB 10.11, galera 26.4)."""
    code, text = (exc.args[0], str(exc.args[-1])) if exc.args else (None, "")
    return (code == 1180 and "wsrep_max_ws_rows" in text) or (code == 1105 and "writeset size" in text)


def _cas_update(copy: CopyTable, writes: Sequence[SpecWrite], now: datetime) -> tuple[str, list[Any]]:
    """One UPDATE for many rows, each guarded by the hash of the bytes it was planned from.

    SHA2 compares bytes; ``spec = %s`` would compare with the table's case-insensitive,
    pad-space collation and could match text that is not what we read. ``updated_at`` is
    set as Nova's ORM sets it on both tables.
    """
    table, column = copy.table, copy.column
    whens = " ".join("WHEN %s THEN %s" for _ in writes)
    sql = (
        f"UPDATE {table} SET {column} = CASE id {whens} END, updated_at = %s "
        f"WHERE id IN ({', '.join('%s' for _ in writes)}) "
        f"AND SHA2({column}, 256) = CASE id {whens} END"
        + (f" AND {copy.write_guard}" if copy.write_guard else "")
    )
    params: list[Any] = [v for w in writes for v in (w.id, w.new_spec)]
    params.append(now)
    params.extend(w.id for w in writes)
    params.extend(v for w in writes for v in (w.id, w.expected_sha256))
    return sql, params


def _statement_cost(spec: str) -> int:
    return 2 * len(spec.encode("utf-8")) + 200  # escaping can double the text


def _close_quietly(conn: pymysql.connections.Connection | None) -> None:
    if conn is not None:
        try:
            conn.close()
        except pymysql.err.Error:
            pass  # already gone: nothing to close


def _rollback_quietly(conn: pymysql.connections.Connection) -> None:
    try:
        conn.rollback()
    except pymysql.err.Error:
        pass  # the connection is gone; the server rolls the transaction back itself


def describe_error(exc: BaseException) -> str:
    """A message for an error met in a plan worker, free of secrets (it crosses a pipe)."""
    if isinstance(exc, NovaFlavorSyncError):
        return str(exc)
    if isinstance(exc, pymysql.err.MySQLError):
        return f"reading request_specs failed: {mysql_error_text(exc)}"
    return f"planning failed: {type(exc).__name__}: {exc}"
