"""Real Nova schemas and a demo cloud (nova_api and three cells), and a loader for them (PyMySQL only).

The files next to this module were produced by real Nova 34.0.0 (see ``README.md`` here)
and are shipped unedited. ``make demo`` and the DB tests load them with
``create_nova_api_database`` and ``create_demo_cloud``; ``python -m nova_flavor_sync.demo
--db-url URL`` loads the whole cloud from the command line.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
from pymysql.constants import CLIENT

_HERE = Path(__file__).parent
SCHEMA_SQL = _HERE / "nova_api_schema.sql"
DEMO_DATA_SQL_GZ = _HERE / "nova_api_demo_data.sql.gz"
SAMPLE_SPECS_JSONL = _HERE / "request_specs.sample.jsonl"
CELL_SCHEMA_SQL = _HERE / "nova_cell_schema.sql"
# The demo cloud's cells as its cell_mappings name them, each with its data (nova_cell<N> there).
DEMO_CELLS = ("cell0", "cell1", "cell2")
SAMPLE_INSTANCE_FLAVORS_JSONL = _HERE / "instance_extra.sample.jsonl"

_NAME_RE = re.compile(r"[A-Za-z0-9_]{1,64}")
# Statements are sent to the server in batches of about this size (max_allowed_packet
# is 16 MiB by default on MariaDB 10.11, so this stays far below it).
_CHUNK_BYTES = 1 << 20


def check_database_name(name: str) -> str:
    """Return ``name`` if it is a plain identifier, so it is safe between backticks in SQL."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"bad database name {name!r}: use 1-64 characters from A-Z, a-z, 0-9 and _")
    return name


def _server_kwargs(connect_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``connect_kwargs`` without a database, with multi-statement batches allowed."""
    kwargs = {k: v for k, v in connect_kwargs.items() if k != "database"}
    kwargs.setdefault("charset", "utf8mb4")  # the dumps say SET NAMES utf8mb4
    kwargs["client_flag"] = kwargs.get("client_flag", 0) | CLIENT.MULTI_STATEMENTS
    # One commit per table (LOCK/UNLOCK TABLES commit) instead of one per INSERT as the
    # mysql client would do: the same rows, in about half the time.
    kwargs["autocommit"] = False
    return kwargs


def _database_exists(cursor: pymysql.cursors.Cursor, name: str) -> bool:
    cursor.execute("SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s", (name,))
    return cursor.fetchone() is not None


def _dump_chunks(lines: Iterator[str]) -> Iterator[str]:
    """Group a mysqldump file into batches of whole statements.

    mysqldump escapes newlines inside strings (``\\n``), so a raw line break is never
    inside a literal, and a statement ends exactly where a line ends with ``;``. We only
    cut there; the server itself parses each batch (MULTI_STATEMENTS), so a ``;`` or an
    escaped quote inside spec JSON is never split. Were that assumption ever wrong, the
    server would answer with a syntax error: a loud failure, never a silent change.
    """
    batch: list[str] = []
    size = 0
    for line in lines:
        batch.append(line)
        size += len(line)
        if size >= _CHUNK_BYTES and line.rstrip().endswith(";"):
            yield "".join(batch)
            batch, size = [], 0
    if "".join(batch).strip():
        yield "".join(batch)


def _execute_dump(cursor: pymysql.cursors.Cursor, path: Path) -> None:
    """Run every statement of a (possibly gzipped) mysqldump file, like ``mysql DB < file``."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        for chunk in _dump_chunks(f):
            cursor.execute(chunk)  # no args: PyMySQL does no %-formatting
            # Read every result; an error in any statement of the batch is raised here.
            while cursor.nextset():
                pass
    cursor.connection.commit()


def create_nova_api_database(
    connect_kwargs: dict[str, Any],
    name: str,
    *,
    with_demo_data: bool,
    replace: bool = False,
) -> None:
    """Create database ``name`` with the real nova_api schema, and the demo data if asked.

    The demo's ``cell_mappings`` still name ``nova_cell0``-``2`` on 127.0.0.1:3306: use
    ``create_demo_cloud`` for a cloud whose cells exist.

    :param connect_kwargs: ``pymysql.connect`` keyword arguments; a ``database`` key is ignored.
    :param name: the database to create (a plain identifier).
    :param with_demo_data: also load the demo cloud's API data (22 flavors, 1,500 request specs).
    :param replace: drop ``name`` first if it exists; otherwise an existing one is refused.
    :raises ValueError: bad name, or ``name`` exists and ``replace`` is false.
    """
    _create_database(connect_kwargs, name, [SCHEMA_SQL] + ([DEMO_DATA_SQL_GZ] if with_demo_data else []), replace)


def create_nova_cell_database(
    connect_kwargs: dict[str, Any], name: str, *, demo_cell: str | None, replace: bool = False
) -> None:
    """Create database ``name`` with the real cell schema, and a demo cell's data (``cell1``...) if asked."""
    if demo_cell is not None and demo_cell not in DEMO_CELLS:
        raise ValueError(f"no demo cell {demo_cell!r}; the demo has {', '.join(DEMO_CELLS)}")
    dumps = [CELL_SCHEMA_SQL] + ([_HERE / f"nova_{demo_cell}_demo_data.sql.gz"] if demo_cell else [])
    _create_database(connect_kwargs, name, dumps, replace)


def cell_database_name(api_name: str, cell: str) -> str:
    """Where ``create_demo_cloud`` puts a demo cell: next to the API database, named after it."""
    return check_database_name(f"{api_name}_{cell}")


def create_demo_cloud(connect_kwargs: dict[str, Any], api_name: str, *, replace: bool = False) -> dict[str, str]:
    """The whole demo cloud: the API database ``api_name`` and its three cells, mapped to each other.

    The cells are ``<api_name>_cell0`` to ``_cell2`` on the same server, and the API
    database's ``cell_mappings`` point at them (``point_cell_mappings``). Returns
    ``{cell name: database name}``.
    """
    create_nova_api_database(connect_kwargs, api_name, with_demo_data=True, replace=replace)
    cells = {cell: cell_database_name(api_name, cell) for cell in DEMO_CELLS}
    for cell, database in cells.items():
        create_nova_cell_database(connect_kwargs, database, demo_cell=cell, replace=replace)
    point_cell_mappings(connect_kwargs, api_name, cells)
    return cells


def point_cell_mappings(connect_kwargs: dict[str, Any], api_name: str, cells: dict[str, str]) -> None:
    """Point the demo's ``cell_mappings`` at ``cells`` ({cell name: database}) on this server.

    A plain ``database_connection`` gets this server's host, port, user and password; the
    template (cell2's) keeps its ``{placeholders}`` and only its database name changes, so
    it is still filled from ``[database] connection`` as Nova fills it.
    """
    from urllib.parse import quote  # only the loader needs it

    server = _server_kwargs(connect_kwargs)
    auth = quote(server.get("user") or "", safe="") + ":" + quote(server.get("password") or "", safe="")
    where = f"{server.get('host', '127.0.0.1')}:{server.get('port', 3306)}"
    conn = pymysql.connect(**{**server, "database": check_database_name(api_name)})
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT id, name, database_connection FROM cell_mappings")
            for row_id, cell, url in cursor.fetchall():
                if cell not in cells:
                    raise ValueError(f"cell_mappings has cell {cell!r}, which is not one of {sorted(cells)}")
                database = check_database_name(cells[cell])
                if "{" in url:
                    new_url = re.sub(r"/\w+(?=\?|$)", f"/{database}", url)  # the path: the database
                else:
                    new_url = f"mysql+pymysql://{auth}@{where}/{database}?charset=utf8"
                cursor.execute("UPDATE cell_mappings SET database_connection = %s WHERE id = %s", (new_url, row_id))
        conn.commit()
    finally:
        conn.close()


def _create_database(connect_kwargs: dict[str, Any], name: str, dumps: list[Path], replace: bool) -> None:
    check_database_name(name)
    conn = pymysql.connect(**_server_kwargs(connect_kwargs))
    try:
        with conn.cursor() as cursor:
            if replace:
                cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
            elif _database_exists(cursor, name):
                raise ValueError(f"database {name!r} already exists; drop it first or pass replace=True")
            # The dump's tables carry their own charset; this is only the database default.
            cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb3 COLLATE utf8mb3_general_ci")
            try:
                conn.select_db(name)
                for dump in dumps:
                    _execute_dump(cursor, dump)
            except BaseException:
                # Leave nothing half-loaded behind: we created it, so it is ours to drop.
                cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
                raise
    finally:
        conn.close()


def drop_database(connect_kwargs: dict[str, Any], name: str) -> None:
    """Drop database ``name`` if it exists."""
    check_database_name(name)
    conn = pymysql.connect(**_server_kwargs(connect_kwargs))
    try:
        with conn.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        conn.close()


def load_sample_specs() -> list[dict[str, Any]]:
    """The 19 sample ``request_specs`` rows (``id``, ``instance_uuid``, ``spec``, ``features``...)."""
    with SAMPLE_SPECS_JSONL.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_sample_instance_flavors() -> list[dict[str, Any]]:
    """The real ``instance_extra`` rows (with their instance's states), as the README here describes."""
    with SAMPLE_INSTANCE_FLAVORS_JSONL.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    """``python -m nova_flavor_sync.demo --db-url URL [--replace] [--schema-only]``."""
    from nova_flavor_sync.dburl import parse_db_url  # only the CLI path needs URL parsing

    parser = argparse.ArgumentParser(
        prog="python -m nova_flavor_sync.demo",
        description="Create the demo cloud: a nova_api database and its three cell databases "
        "(<dbname>_cell0, _cell1, _cell2), with the real Nova schemas and the demo data.",
    )
    parser.add_argument("--db-url", required=True, help="mysql+pymysql://user@host:port/dbname (the API database)")
    parser.add_argument("--replace", action="store_true", help="drop the databases first if they exist")
    parser.add_argument("--schema-only", action="store_true", help="the nova_api schema only: empty tables, no cells")
    args = parser.parse_args(argv)

    params = parse_db_url(args.db_url)
    try:
        if args.schema_only:
            create_nova_api_database(params.connect_kwargs(), params.database, with_demo_data=False,
                                     replace=args.replace)
            print(f"Loaded the nova_api schema into {params}")
            return 0
        cells = create_demo_cloud(params.connect_kwargs(), params.database, replace=args.replace)
    except (ValueError, pymysql.MySQLError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print(f"Loaded the demo cloud: nova_api into {params}, cells " +
          ", ".join(f"{cell} into {database}" for cell, database in cells.items()))
    return 0
