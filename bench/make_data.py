"""Fill a nova_api database with ROWS request specs cloned from the real demo specs.

    .venv/bin/python bench/make_data.py --db-url mysql+pymysql://root@127.0.0.1:3306/nfs_bench \\
        --rows 1000000 --stale-fraction 0.45 --seed 1 --replace

1. Creates the database with the real Nova 34 schema and the demo cloud
   (``nova_flavor_sync.demo.create_nova_api_database(..., with_demo_data=True)``).
2. Sorts the demo's 1,500 request specs with the engine's own planner (``--all-keys``) into
   templates: stale (its copy of the flavor's extra_specs differs from the flavor, the way
   the operator's changes left it) and in sync. Orphans (flavor deleted) are not used, so
   every generated row's embedded flavor is one of the demo's 23 flavors.
3. Replaces ``request_specs`` with ROWS rows: ids 1..ROWS; a seeded, exact
   ``round(ROWS * stale_fraction)`` of them cloned from stale templates, the rest from
   in-sync ones. Each clone gets a new instance uuid, in the column and everywhere the
   template's uuid appears in the JSON (``nova_object.data.instance_uuid``, the PCI
   requests' ``instance_uuid``); specs saved after creation also carry the row id
   (``nova_object.data.id``), which follows the new id. Every other byte is the template's,
   so a row is 2.8-5.3 KB (3.7 KB on average) and round-trips as Nova wrote it.
4. Adds one ``instance_mappings`` row per instance (``queued_for_delete`` 0, the spec's
   project and user), as a real cloud has: the engine's read joins that table
   (``--no-instance-mappings`` leaves it empty, as the demo does).

Fast: the templates are escaped once; rows are multi-row INSERTs of ``--chunk-rows`` rows,
one commit per chunk, ``unique_checks=0, foreign_key_checks=0`` in the session, the
statements are built in a second thread while the server inserts, and the secondary
(uuid) indexes are dropped for the load and built again after it, each in one sort (the
tables' ``SHOW CREATE TABLE`` is checked to be Nova's again). Reproducible: the same
``--seed``, ``--rows`` and ``--stale-fraction`` give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import re
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pymysql
from pymysql.converters import escape_string

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "include"))  # run from a checkout

from nova_flavor_sync.db import NovaApiDb  # noqa: E402
from nova_flavor_sync.dburl import parse_db_url  # noqa: E402
from nova_flavor_sync.demo import create_nova_api_database, drop_database  # noqa: E402
from nova_flavor_sync.diff import IN_SYNC, RowPlanner  # noqa: E402
from nova_flavor_sync.plan import RowChange, SpecRow  # noqa: E402
from nova_flavor_sync.scope import Scope  # noqa: E402

# A number no spec contains, put where a saved spec keeps its row id, to find that spot.
_ID_SENTINEL = 918273645546372819
_FIRST_CREATED_AT = datetime(2023, 1, 2, 8, 0, 0)


@dataclass(frozen=True)
class Template:
    """A demo spec, escaped for SQL once, cut where the instance uuid and row id go."""

    source_id: int
    stale: bool
    pieces: tuple[str, ...]  # escaped text between the slots
    slots: tuple[str, ...]  # "uuid" or "id", one per gap between pieces
    saved_after: timedelta | None  # updated_at - created_at in the demo (specs saved later)
    project_id: str
    user_id: str

    def sql_text(self, instance_uuid: str, row_id: int) -> str:
        values = {"uuid": instance_uuid, "id": str(row_id)}
        out = [self.pieces[0]]
        for slot, piece in zip(self.slots, self.pieces[1:]):
            out.append(values[slot])
            out.append(piece)
        return "".join(out)


def make_template(row_id: int, instance_uuid: str, spec: str, created_at, updated_at, stale: bool) -> Template:
    document = json.loads(spec)
    if json.dumps(document) != spec:
        raise ValueError(f"demo row {row_id} does not round-trip; cannot use it as a template")
    data = document["nova_object.data"]
    text = spec
    if data.get("id") is not None:
        if data["id"] != row_id:
            raise ValueError(f"demo row {row_id} carries id {data['id']}")
        data["id"] = _ID_SENTINEL
        text = json.dumps(document)
    # Cut at every uuid and sentinel, remembering which is which.
    pieces: list[str] = []
    slots: list[str] = []
    rest = text
    tokens = (("uuid", instance_uuid), ("id", str(_ID_SENTINEL)))
    while True:
        hits = [(rest.find(token), name, token) for name, token in tokens if token in rest]
        if not hits:
            pieces.append(rest)
            break
        pos, name, token = min(hits)
        pieces.append(rest[:pos])
        slots.append(name)
        rest = rest[pos + len(token):]
    if "uuid" not in slots:
        raise ValueError(f"demo row {row_id}: instance uuid not found in its spec")
    # uuids and digits need no escaping, so escaping the pieces apart equals escaping the whole.
    escaped = tuple(escape_string(p) for p in pieces)
    check = Template(row_id, stale, tuple(pieces), tuple(slots), None, "", "").sql_text(instance_uuid, row_id)
    if check != spec:
        raise ValueError(f"demo row {row_id}: template does not rebuild the original text")
    return Template(
        source_id=row_id,
        stale=stale,
        pieces=escaped,
        slots=tuple(slots),
        saved_after=(updated_at - created_at) if updated_at and created_at else None,
        project_id=str(data.get("project_id") or "project"),
        user_id=str(data.get("user_id") or "user"),
    )


def load_templates(db: NovaApiDb) -> tuple[list[Template], list[Template], int]:
    """(stale templates, in-sync templates, rows left out) from the demo's request specs."""
    planner = RowPlanner(db.load_flavors(), Scope(all_keys=True))
    stale: list[Template] = []
    in_sync: list[Template] = []
    left_out = 0
    with db.conn.cursor() as cur:
        cur.execute("SELECT id, instance_uuid, spec, created_at, updated_at FROM request_specs ORDER BY id")
        rows = cur.fetchall()
    for row_id, instance_uuid, spec, created_at, updated_at in rows:
        outcome = planner.plan_row(SpecRow(row_id, instance_uuid, spec, updated_at))
        if isinstance(outcome, RowChange):
            stale.append(make_template(row_id, instance_uuid, spec, created_at, updated_at, True))
        elif outcome == IN_SYNC:
            in_sync.append(make_template(row_id, instance_uuid, spec, created_at, updated_at, False))
        else:
            left_out += 1  # orphans: their flavor no longer exists
    return stale, in_sync, left_out


def build_statements(
    templates: tuple[list[Template], list[Template]],
    rows: int,
    stale_fraction: float,
    seed: int,
    chunk_rows: int,
    instance_mappings: bool,
):
    """Yield (request_specs INSERT, instance_mappings INSERT or None, rows in it), in id order."""
    stale_templates, sync_templates = templates
    rng = random.Random(seed)
    stale_count = round(rows * stale_fraction)
    flags = bytearray(rows)
    for index in rng.sample(range(rows), stale_count):
        flags[index] = 1
    seen: set[int] = set()
    for start in range(0, rows, chunk_rows):
        specs: list[str] = []
        mappings: list[str] = []
        for index in range(start, min(start + chunk_rows, rows)):
            row_id = index + 1
            template = rng.choice(stale_templates if flags[index] else sync_templates)
            while True:
                bits = rng.getrandbits(128)
                if bits not in seen:
                    seen.add(bits)
                    break
            instance_uuid = str(uuid.UUID(int=bits, version=4))
            created = _FIRST_CREATED_AT + timedelta(seconds=37 * row_id)
            updated = f"'{created + template.saved_after}'" if template.saved_after is not None else "NULL"
            specs.append(
                f"({row_id},'{instance_uuid}','{template.sql_text(instance_uuid, row_id)}','{created}',{updated})"
            )
            if instance_mappings:
                mappings.append(
                    f"('{created}',NULL,{row_id},'{instance_uuid}',NULL,"
                    f"'{escape_string(template.project_id)}',0,'{escape_string(template.user_id)}')"
                )
        spec_sql = (
            "INSERT INTO request_specs (id, instance_uuid, spec, created_at, updated_at) VALUES "
            + ",".join(specs)
        )
        mapping_sql = (
            "INSERT INTO instance_mappings (created_at, updated_at, id, instance_uuid, cell_id, "
            "project_id, queued_for_delete, user_id) VALUES " + ",".join(mappings)
            if instance_mappings
            else None
        )
        yield spec_sql, mapping_sql, len(specs)


def _table_ddl(cur, table: str) -> str:
    cur.execute(f"SHOW CREATE TABLE `{table}`")
    return re.sub(r" AUTO_INCREMENT=\d+", "", cur.fetchone()[1])


def defer_secondary_indexes(cur, tables: Sequence[str]) -> dict[str, tuple[str, list[str]]]:
    """Drop the tables' secondary indexes (not those a foreign key needs); return how to re-add them.

    Inserting 10^6 random uuids into four uuid indexes that do not fit the buffer pool is
    random I/O; building them once after the load is a sort. The schema is the same after.
    """
    deferred: dict[str, tuple[str, list[str]]] = {}
    for table in tables:
        ddl = _table_ddl(cur, table)
        cur.execute(
            "SELECT column_name FROM information_schema.KEY_COLUMN_USAGE WHERE table_schema = DATABASE() "
            "AND table_name = %s AND referenced_table_name IS NOT NULL",
            (table,),
        )
        fk_columns = {c for (c,) in cur.fetchall()}
        cur.execute(
            "SELECT index_name, non_unique, column_name, sub_part FROM information_schema.STATISTICS "
            "WHERE table_schema = DATABASE() AND table_name = %s AND index_name <> 'PRIMARY' "
            "ORDER BY index_name, seq_in_index",
            (table,),
        )
        indexes: dict[str, tuple[bool, list[str]]] = {}
        for name, non_unique, column, sub_part in cur.fetchall():
            part = f"`{column}`" + (f"({sub_part})" if sub_part else "")
            indexes.setdefault(name, (not non_unique, []))[1].append(part)
        # Re-add them in the order SHOW CREATE TABLE lists them.
        order = sorted(indexes, key=lambda n: ddl.find(f"KEY `{n}`"))
        adds = []
        for name in order:
            unique, parts = indexes[name]
            if parts[0].strip("`") in fk_columns:
                continue
            adds.append(f"ADD {'UNIQUE ' if unique else ''}KEY `{name}` ({', '.join(parts)})")
        drops = [a.split("KEY ", 1)[1].split(" (")[0] for a in adds]
        if drops:
            cur.execute(f"ALTER TABLE `{table}` " + ", ".join(f"DROP KEY {d}" for d in drops))
        deferred[table] = (ddl, adds)
    return deferred


def restore_secondary_indexes(cur, deferred: dict[str, tuple[str, list[str]]]) -> None:
    """Build the deferred indexes, and check each table's definition is what it was."""
    for table, (ddl, adds) in deferred.items():
        if adds:
            cur.execute(f"ALTER TABLE `{table}` " + ", ".join(adds))
        if _table_ddl(cur, table) != ddl:
            raise RuntimeError(f"{table}: the definition after the load differs from Nova's schema")


def _produce(generator, out: queue.Queue) -> None:
    try:
        for item in generator:
            out.put(item)
    except BaseException as exc:  # hand it to the consumer, which raises it
        out.put(exc)
        return
    out.put(None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/make_data.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--db-url", required=True, help="mysql+pymysql://root@127.0.0.1:3306/nfs_bench")
    parser.add_argument("--rows", type=int, help="request specs to create")
    parser.add_argument("--stale-fraction", type=float, default=0.45, help="share of stale rows (default 0.45)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--replace", action="store_true", help="drop the database first if it exists")
    parser.add_argument("--chunk-rows", type=int, default=1000, help="rows per INSERT and per commit (default 1000)")
    parser.add_argument(
        "--no-instance-mappings", action="store_true", help="leave instance_mappings empty, as the demo does"
    )
    parser.add_argument("--drop", action="store_true", help="drop the database and stop (they are big)")
    args = parser.parse_args(argv)
    params = parse_db_url(args.db_url)
    if args.drop:
        drop_database(params.connect_kwargs(), params.database)
        print(f"dropped {params.database}")
        return 0
    if args.rows is None:
        parser.error("--rows is required")
    if args.rows < 1 or not 0.0 <= args.stale_fraction <= 1.0 or args.chunk_rows < 1:
        parser.error("--rows and --chunk-rows must be positive, --stale-fraction in [0, 1]")

    started = time.monotonic()
    try:
        create_nova_api_database(params.connect_kwargs(), params.database, with_demo_data=True, replace=args.replace)
    except ValueError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    db = NovaApiDb(params).open()
    stale, in_sync, left_out = load_templates(db)
    db.close()
    print(
        f"{params.database}: schema and demo loaded in {time.monotonic() - started:.1f} s; templates: "
        f"{len(stale)} stale, {len(in_sync)} in sync ({left_out} orphans left out)"
    )
    if (args.stale_fraction > 0 and not stale) or (args.stale_fraction < 1 and not in_sync):
        print("Error: the demo has no template of a kind this fraction needs", file=sys.stderr)
        return 1

    conn = pymysql.connect(**params.connect_kwargs(), autocommit=False, max_allowed_packet=64 << 20)
    with conn.cursor() as cur:
        cur.execute("SET SESSION unique_checks = 0, foreign_key_checks = 0")
        cur.execute("DELETE FROM request_specs")  # the demo's 1,500: replaced by the clones
        cur.execute("DELETE FROM instance_mappings")
        conn.commit()
        deferred = defer_secondary_indexes(cur, ("request_specs", "instance_mappings"))

    statements = build_statements(
        (stale, in_sync), args.rows, args.stale_fraction, args.seed, args.chunk_rows, not args.no_instance_mappings
    )
    handoff: queue.Queue = queue.Queue(maxsize=4)
    producer = threading.Thread(target=_produce, args=(statements, handoff), daemon=True)
    load_started = time.monotonic()
    producer.start()
    done = spec_bytes = 0
    next_report = max(args.rows // 10, 1)
    with conn.cursor() as cur:
        while True:
            item = handoff.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            spec_sql, mapping_sql, count = item
            cur.execute(spec_sql)
            if mapping_sql:
                cur.execute(mapping_sql)
            conn.commit()
            done += count
            spec_bytes += len(spec_sql)
            if done >= next_report or done == args.rows:
                elapsed = time.monotonic() - load_started
                print(f"  {done:>10,} rows  {elapsed:7.1f} s  {done / elapsed:8,.0f} rows/s  "
                      f"{spec_bytes / elapsed / 1e6:6.1f} MB/s", flush=True)
                next_report += max(args.rows // 10, 1)
    producer.join()
    insert_s = time.monotonic() - load_started
    with conn.cursor() as cur:
        restore_secondary_indexes(cur, deferred)
    load_s = time.monotonic() - load_started
    print(f"  inserts {insert_s:.1f} s, secondary indexes built in {load_s - insert_s:.1f} s", flush=True)
    with conn.cursor() as cur:
        cur.execute("ANALYZE TABLE request_specs, instance_mappings")
        cur.fetchall()
        cur.execute("SELECT COUNT(*), AVG(LENGTH(spec)), MIN(LENGTH(spec)), MAX(LENGTH(spec)) FROM request_specs")
        count, avg_len, min_len, max_len = cur.fetchone()
    conn.close()
    stale_count = round(args.rows * args.stale_fraction)
    print(
        f"{params.database}: {count:,} request specs ({stale_count:,} stale, seed {args.seed}), "
        f"spec {int(min_len):,}-{int(max_len):,} bytes, {float(avg_len):,.0f} on average; "
        f"inserted in {load_s:.1f} s = {args.rows / load_s:,.0f} rows/s "
        f"({spec_bytes / load_s / 1e6:.1f} MB/s); total {time.monotonic() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
