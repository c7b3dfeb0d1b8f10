"""Plain helpers for tests that use the real MariaDB (the fixtures are in conftest.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pymysql

from nova_flavor_sync.dburl import DbParams

DEFAULT_HASH_COLUMNS = "id, instance_uuid, spec, created_at, updated_at"
# The password of the ``secret_account`` fixture's user: searched for in every output.
SECRET = "S3cr3t/p@ss:w0rd#" + secrets.token_hex(4)


def assert_no_secret(text: str, where: str) -> None:
    """Fail if SECRET appears in ``text``, raw or percent-encoded."""
    for form in (SECRET, quote(SECRET, safe=""), quote(SECRET)):
        assert form not in text, f"password found in {where}"


def create_secret_account(params: DbParams) -> tuple[str, str]:
    """A MariaDB user with password SECRET for ``params.database`` only: (user, URL)."""
    user = f"nfs_{secrets.token_hex(4)}"
    with connect(params) as conn, conn.cursor() as cur:
        cur.execute("CREATE USER %s@'127.0.0.1' IDENTIFIED BY %s", (user, SECRET))
        cur.execute(f"GRANT ALL ON `{params.database}`.* TO %s@'127.0.0.1'", (user,))
    return user, f"mysql+pymysql://{user}:{quote(SECRET, safe='')}@127.0.0.1:{params.port}/{params.database}"


def drop_account(params: DbParams, user: str) -> None:
    with connect(params) as conn, conn.cursor() as cur:
        cur.execute("DROP USER IF EXISTS %s@'127.0.0.1'", (user,))


def server_kwargs_from_env() -> dict[str, Any]:
    """PyMySQL keyword arguments for the test server, without a database."""
    return {
        "host": os.environ.get("NFS_TEST_DB_HOST", "127.0.0.1"),
        "port": int(os.environ.get("NFS_TEST_DB_PORT", "3306")),
        "user": os.environ.get("NFS_TEST_DB_USER", "root"),
        "password": os.environ.get("NFS_TEST_DB_PASSWORD", ""),
    }


def new_database_name(prefix: str = "nfs_test") -> str:
    """A database name no other test (or concurrent test run) is using."""
    return f"{prefix}_{secrets.token_hex(6)}"


def db_params(server_kwargs: dict[str, Any], database: str) -> DbParams:
    return DbParams(database=database, **server_kwargs)


def connect(params: DbParams, **overrides: Any) -> pymysql.connections.Connection:
    """A PyMySQL connection to ``params`` (autocommit on unless overridden); use ``with``."""
    return pymysql.connect(**{**params.connect_kwargs(), "autocommit": True, **overrides})


def table_hash(params: DbParams, table: str = "request_specs", columns: str = DEFAULT_HASH_COLUMNS) -> str:
    """sha256 over ``columns`` of every row of ``table`` in id order: equal hashes = no row changed."""
    if not re.fullmatch(r"\w+", table):
        raise ValueError(f"bad table name {table!r}")
    digest = hashlib.sha256()
    with connect(params) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT {columns} FROM `{table}` ORDER BY id")
        for row in cur.fetchall():
            digest.update(repr(row).encode() + b"\n")  # repr keeps None vs 'None' apart
    return digest.hexdigest()


def copies_hash(params: DbParams, *, copies_only: bool = False) -> str:
    """sha256 over both flavor copies of a test's demo cloud: equal hashes = no copy changed.

    nova_api's request_specs and the instance_extra of its cells ``<database>_cell1`` and
    ``_cell2``; ``copies_only``: only each row's id, instance and JSON, not its timestamps.
    """
    times = "" if copies_only else ", created_at, updated_at"
    parts = [table_hash(params, columns=f"id, instance_uuid, spec{times}")]
    for cell in ("cell1", "cell2"):
        cell_db = dataclasses.replace(params, database=f"{params.database}_{cell}")
        parts.append(table_hash(cell_db, "instance_extra", columns=f"id, instance_uuid, flavor{times}"))
    return hashlib.sha256(" ".join(parts).encode()).hexdigest()


def tables_with_rows(server_kwargs: dict[str, Any], database: str) -> list[str]:
    """The tables of ``database`` that hold at least one row."""
    with connect(db_params(server_kwargs, database)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (database,),
        )
        names = [name for (name,) in cur.fetchall()]
        found = []
        for name in names:
            cur.execute(f"SELECT EXISTS (SELECT 1 FROM `{name}`)")
            if cur.fetchone()[0]:
                found.append(name)
        return found


def copy_rows(server_kwargs: dict[str, Any], source: str, target: str, tables: list[str]) -> None:
    """Copy every row of ``tables`` from database ``source`` into the same (empty) tables of ``target``."""
    with connect(db_params(server_kwargs, target), autocommit=False) as conn, conn.cursor() as cur:
        # As the dump does: parents and children in any order, and an id of 0 kept as 0.
        cur.execute("SET SESSION foreign_key_checks = 0, sql_mode = 'NO_AUTO_VALUE_ON_ZERO'")
        for name in tables:
            cur.execute(f"INSERT INTO `{target}`.`{name}` SELECT * FROM `{source}`.`{name}`")
        conn.commit()


def copy_database(server_kwargs: dict[str, Any], source: str, target: str, tables: list[str] | None = None) -> None:
    """A new database ``target`` with ``tables`` of ``source`` (all by default), made LIKE them, and their rows."""
    with connect(db_params(server_kwargs, source)) as conn, conn.cursor() as cur:
        if tables is None:
            cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (source,))
            tables = [name for (name,) in cur.fetchall()]
        cur.execute(f"CREATE DATABASE `{target}` CHARACTER SET utf8mb3 COLLATE utf8mb3_general_ci")
        for name in tables:
            cur.execute(f"CREATE TABLE `{target}`.`{name}` LIKE `{source}`.`{name}`")
    copy_rows(server_kwargs, source, target, [t for t in tables_with_rows(server_kwargs, source) if t in tables])


@dataclass(frozen=True)
class DemoCloud:
    """The demo cloud of one test: its nova_api database and its cells' ({cell name: database})."""

    api: DbParams
    cells: dict[str, DbParams]


def map_instances(params: DbParams, uuids: list[str], cell: str = "cell1") -> None:
    """Instances in ``cell``, as Nova makes them: an instance_mappings row and the cell's instances row.

    A RequestSpec without both is left alone (no mapping; or "instance row missing from its cell").
    """
    with connect(params) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO instance_mappings (created_at, instance_uuid, cell_id, project_id, queued_for_delete) "
            "SELECT NOW(), %s, id, 'p', 0 FROM cell_mappings WHERE name = %s",
            [(uuid, cell) for uuid in uuids],
        )
    with connect(dataclasses.replace(params, database=f"{params.database}_{cell}")) as conn, conn.cursor() as cur:
        cur.executemany("INSERT INTO instances (created_at, uuid, vm_state, deleted) VALUES (NOW(), %s, 'active', 0)",
                        [(uuid,) for uuid in uuids])


def enlarge(params: DbParams, total: int, seed: int) -> None:
    """Copy the demo specs (new instance uuid, inside the spec too) until there are ``total`` rows.

    Each copy's instance is placed in cell1 (``map_instances``), so its RequestSpec is judged.
    """
    import json
    import random
    import uuid

    rng = random.Random(seed)
    with connect(params, autocommit=False) as conn, conn.cursor() as cur:
        cur.execute("SELECT created_at, updated_at, spec FROM request_specs ORDER BY id")
        base = cur.fetchall()
        rows = []
        for i in range(total - len(base)):
            created_at, updated_at, spec = base[i % len(base)]
            new_uuid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            document = json.loads(spec)
            document["nova_object.data"]["instance_uuid"] = new_uuid
            rows.append((created_at, updated_at, new_uuid, json.dumps(document)))
        cur.executemany(
            "INSERT INTO request_specs (created_at, updated_at, instance_uuid, spec) VALUES (%s, %s, %s, %s)", rows
        )
        conn.commit()
    map_instances(params, [row[2] for row in rows])


def nova_database_connection(server: dict[str, Any] | DbParams) -> str:
    """What the nova.conf of a Nova service of a test's demo cloud has as [database] connection.

    Always ``user:password@``: Nova fills ``user@host`` with the password text ``None``.
    """
    server = server if isinstance(server, dict) else {"user": server.user, "password": server.password,
                                                      "host": server.host, "port": server.port}
    auth = quote(server["user"], safe="") + ":" + quote(server["password"] or "", safe="")
    return f"mysql+pymysql://{auth}@{server['host']}:{server['port']}/nova"


@contextmanager
def opened_cloud(params: DbParams, *, all_keys: bool = True):
    """A test's demo cloud opened as the command line opens it (its cell_mappings, cell2's
    template filled): ``(nova_api, [(mapping, cell db)], flavors, scope)``."""
    from nova_flavor_sync import service

    with service.connect(params) as db, \
            service.open_cells_of(db, template_url=nova_database_connection(params)) as cells:
        flavors, scope = service.resolve_scope(db, all_keys=all_keys)
        yield db, cells, flavors, scope


def plan_request_specs(params: DbParams, *, all_keys: bool = True):
    """The RequestSpecs' plan as the CLI makes it: with every cell open, busy instances left alone."""
    from nova_flavor_sync import service

    with opened_cloud(params, all_keys=all_keys) as (db, cells, flavors, scope):
        return service.plan_both_copies(db, cells, scope, flavors=flavors).copies[0].plan


def stale_copies(params: DbParams, *, all_keys: bool = True) -> int:
    """How many flavor copies (both copies, every cell) a run would rewrite now."""
    from nova_flavor_sync import service

    with opened_cloud(params, all_keys=all_keys) as (db, cells, flavors, scope):
        return service.plan_both_copies(db, cells, scope, flavors=flavors).to_update


def sync_both_copies(params: DbParams, *, all_keys: bool = True, backup_dir=None):
    """Sync both copies with the engine, as the CLI does: (the plan, the backup or None)."""
    from nova_flavor_sync import service

    with opened_cloud(params, all_keys=all_keys) as (db, cells, flavors, scope):
        cloud = service.plan_both_copies(db, cells, scope, flavors=flavors)
        databases = service.databases_of(db, cells)
        backup = None if backup_dir is None else service.back_up_copies(
            databases, cloud.copies, backup_dir, digest=cloud.digest, scope=scope,
            cell_names={mapping.uuid: mapping.name for mapping, _ in cells})
        service.apply_copies(databases, cloud.copies)
    return cloud, backup


def threads_running(params: DbParams) -> int:
    """The server's Threads_running now (this query's own session counts as one)."""
    with connect(params) as conn, conn.cursor() as cur:
        cur.execute("SHOW GLOBAL STATUS LIKE 'Threads_running'")
        return int(cur.fetchone()[1])


@contextmanager
def busy_sessions(params: DbParams, count: int, seconds: float) -> Iterator[list[int]]:
    """``count`` sessions each running ``SELECT SLEEP(seconds)``: Threads_running goes up by ``count``.

    Yields once every one of them is running (their connection ids); on exit, the queries still
    running are killed, so a test never waits for them.
    """
    conns = [connect(params) for _ in range(count)]
    ids = [conn.thread_id() for conn in conns]

    def sleep(conn) -> None:
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT SLEEP(%s)", (seconds,))
        except Exception:
            pass  # killed

    threads = [threading.Thread(target=sleep, args=(conn,), daemon=True) for conn in conns]
    for thread in threads:
        thread.start()
    try:
        with connect(params) as conn, conn.cursor() as cur:
            deadline = time.monotonic() + 10
            while True:
                cur.execute(
                    "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID IN %s AND INFO LIKE 'SELECT SLEEP%%'",
                    (tuple(ids),),
                )
                if cur.fetchone()[0] == count:
                    break
                assert time.monotonic() < deadline, "the sleeping sessions never started"
                time.sleep(0.02)
        yield ids
    finally:
        with connect(params) as conn, conn.cursor() as cur:
            for thread_id in ids:
                try:
                    cur.execute(f"KILL QUERY {int(thread_id)}")
                except pymysql.MySQLError:
                    pass  # already done
        for thread in threads:
            thread.join(10)
        for conn in conns:
            conn.close()
