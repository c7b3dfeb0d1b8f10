"""Fill a nova_api database and two cell databases with ROWS instances, both flavor copies cloned from real Nova rows.

    .venv/bin/python bench/make_data.py --db-url mysql+pymysql://root@127.0.0.1:3306/nfs_bench \\
        --rows 1000000 --mix clone --seed 1 --replace

Every instance has both of the copies Nova keeps of its flavor: its RequestSpec
(``nova_api.request_specs.spec``) and its own copy (``instance_extra.flavor``, in its cell).

1. Creates the API database with the real Nova 34 schema and the demo cloud
   (``nova_flavor_sync.demo.create_nova_api_database(..., with_demo_data=True)``), and the
   cell databases ``<api>_cell0``, ``<api>_cell1``, ``<api>_cell2`` with Nova's cell schema
   (``nova_cell_schema.sql``); ``cell_mappings`` point at them (``point_cell_mappings``:
   cell2's stays a template, filled from the API database's URL). cell0 stays empty.
2. Reads the demo's 1,490 instances that are in a cell (their ``instances`` and
   ``instance_extra`` rows, as Nova wrote them, from the demo cell dumps) with their
   RequestSpecs, and sorts them with the engine's own planner (``--all-keys``) into templates:
   *stale* (active, both copies differ from the flavor), *in sync* (active, both copies equal
   it), *busy* (deleted, or in the middle of a resize or migration: the engine leaves both
   copies alone). Instances of the deleted flavor (orphans) are not used.
3. Replaces ``request_specs`` and ``instance_mappings`` with ROWS instances, and fills each
   cell's ``instances`` and ``instance_extra``: a seeded, exact ``round(ROWS * stale)`` of them
   cloned from stale templates, ``round(ROWS * busy)`` from busy ones, the rest in sync; each
   instance in cell1 or cell2 (seeded, half each). Each clone gets a new instance uuid wherever
   the template has its uuid (every column of all three rows, inside the JSON too), its new row
   ids (``request_specs.id`` and the spec's ``nova_object.data.id`` when it has one;
   ``instances.id`` = ``instance_extra.id``, and ``deleted`` = that id for a deleted one, as
   Nova soft-deletes); every other byte is the template's, as Nova wrote it. Deleted
   instances' mappings are ``queued_for_delete`` 1.

The mixes (``--mix``) stress the planner differently:

* ``clone``: as above, 45% stale, 5% busy, the demo's 22 flavors: few distinct flavor copies
  (the planner judges each distinct copy once), both copies of an instance agree.
* ``distinct``: the same, but over 5,000 flavors (clones of the demo's with new ``id``,
  ``flavorid`` and ``name``; their extra specs are the demo flavor's), each instance's two
  copies and ``instance_type_id`` naming one of them: ~100x more distinct flavor copies,
  more than the planner remembers (``RowPlanner.MAX_KNOWN_COPIES``), so many rows are parsed.
* ``stale95``: 95% stale, no busy instance: nearly every row of both tables is rewritten.
* ``disagree``: the stale instances' two copies disagree: half have a stale RequestSpec and
  an in-sync instance copy, half the reverse (each half pairs the RequestSpec of one demo
  instance with the instance rows of another of the same flavor).

``--stale-fraction``, ``--busy-fraction`` and ``--flavors`` override a mix's figure.

Fast: the templates are escaped once; rows are multi-row INSERTs of ``--chunk-rows`` rows,
one commit per chunk, ``unique_checks=0, foreign_key_checks=0`` in the session, the
statements are built in a second thread while the server inserts, and the secondary
indexes are dropped for the load and built again after it, each in one sort (except those a
foreign key needs; the tables' ``SHOW CREATE TABLE`` is checked to be Nova's again).
Reproducible: the same ``--seed``, ``--rows`` and mix give the same bytes.
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pymysql
from pymysql.converters import escape_item, escape_string

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "include"))  # run from a checkout

from nova_flavor_sync.db import NovaApiDb, instance_state_reason  # noqa: E402
from nova_flavor_sync.dburl import parse_db_url  # noqa: E402
from nova_flavor_sync.demo import (  # noqa: E402
    cell_database_name,
    create_nova_api_database,
    create_nova_cell_database,
    drop_database,
    point_cell_mappings,
)
from nova_flavor_sync.diff import IN_SYNC, RowPlanner  # noqa: E402
from nova_flavor_sync.plan import RowChange, SpecRow  # noqa: E402
from nova_flavor_sync.scope import Scope  # noqa: E402
from nova_flavor_sync.spec_json import INSTANCE_FLAVOR, REQUEST_SPEC  # noqa: E402

# Numbers and names no demo row contains, put where a new value goes, to find those spots.
_ROW_ID_SENTINEL = 918273645546372819  # the RequestSpec's own row id (saved specs)
_FLAVOR_ID_SENTINEL = 918273645546372001  # the flavor copy's "id" (flavors.id)
_FLAVOR_NAME_SENTINEL = "nfsbench-flavor-name-sentinel"
_FLAVORID_SENTINEL = "nfsbench-flavorid-sentinel"
_FIRST_CREATED_AT = datetime(2023, 1, 2, 8, 0, 0)
CELLS = ("cell1", "cell2")  # where instances go; cell0 (never scheduled) stays empty
ALL_CELLS = ("cell0",) + CELLS


@dataclass(frozen=True)
class Mix:
    """What a generated cloud looks like (``--mix``)."""

    stale: float  # share of instances with stale copies
    busy: float  # share of deleted or busy instances (both copies left alone)
    flavors: int  # 0: the demo's flavors; N: N clones of them, instances spread over them
    disagree: bool  # the stale instances' two copies disagree (one stale, one in sync)
    about: str


MIXES: dict[str, Mix] = {
    "clone": Mix(0.45, 0.05, 0, False, "45% stale, 5% busy, the demo's 22 flavors, both copies agree"),
    "distinct": Mix(0.45, 0.05, 5000, False, "as clone, over 5,000 flavors: ~100x more distinct copies"),
    "stale95": Mix(0.95, 0.0, 0, False, "95% stale, none busy: nearly every row of both tables rewritten"),
    "disagree": Mix(0.45, 0.05, 0, True, "45% stale in one copy only: half the RequestSpec, half the instance's"),
}


# -- templates -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cut:
    """A text (already escaped for SQL) cut where new values go: pieces between slots."""

    pieces: tuple[str, ...]
    slots: tuple[str, ...]

    def render(self, values: dict[str, str]) -> str:
        out = [self.pieces[0]]
        for slot, piece in zip(self.slots, self.pieces[1:], strict=True):
            out.append(values[slot])
            out.append(piece)
        return "".join(out)


def cut_text(text: str, tokens: dict[str, str]) -> tuple[list[str], list[str]]:
    """Cut ``text`` at every occurrence of each token (``{slot: token}``), remembering which."""
    pieces: list[str] = []
    slots: list[str] = []
    rest = text
    while True:
        hits = [(rest.find(token), name, token) for name, token in tokens.items() if token and token in rest]
        if not hits:
            pieces.append(rest)
            return pieces, slots
        pos, name, token = min(hits)
        pieces.append(rest[:pos])
        slots.append(name)
        rest = rest[pos + len(token):]


def join_cuts(parts: Sequence[tuple[list[str], list[str]] | str]) -> Cut:
    """Concatenate cut texts and plain text into one Cut."""
    pieces: list[str] = [""]
    slots: list[str] = []
    for part in parts:
        if isinstance(part, str):
            pieces[-1] += part
            continue
        p, s = part
        pieces[-1] += p[0]
        pieces.extend(p[1:])
        slots.extend(s)
    return Cut(tuple(pieces), tuple(slots))


def _with_flavor_sentinels(flavor_primitive: dict[str, Any]) -> dict[str, str]:
    """Put the sentinels into a flavor primitive's data; return what they stand for."""
    data = flavor_primitive["nova_object.data"]
    original = {"fid": str(data["id"]), "fname": data["name"], "fflavorid": data["flavorid"]}
    data["id"], data["name"], data["flavorid"] = _FLAVOR_ID_SENTINEL, _FLAVOR_NAME_SENTINEL, _FLAVORID_SENTINEL
    return original


_FLAVOR_TOKENS = {"fid": str(_FLAVOR_ID_SENTINEL), "fname": _FLAVOR_NAME_SENTINEL, "fflavorid": _FLAVORID_SENTINEL}


def spec_cut(row_id: int, instance_uuid: str, spec: str) -> Cut:
    """The RequestSpec text with slots: uuid, its row id (``rsid``), and the flavor's id, name, flavorid."""
    document = json.loads(spec)
    if json.dumps(document) != spec:
        raise ValueError(f"demo request spec {row_id} does not round-trip; cannot use it as a template")
    data = document["nova_object.data"]
    values = {"uuid": instance_uuid, "rsid": str(row_id)}
    if data.get("id") is not None:
        if data["id"] != row_id:
            raise ValueError(f"demo request spec {row_id} carries id {data['id']}")
        data["id"] = _ROW_ID_SENTINEL
    values.update(_with_flavor_sentinels(data["flavor"]))
    tokens = {"uuid": instance_uuid, "rsid": str(_ROW_ID_SENTINEL), **_FLAVOR_TOKENS}
    pieces, slots = cut_text(json.dumps(document), tokens)
    if "uuid" not in slots:
        raise ValueError(f"demo request spec {row_id}: instance uuid not found in its spec")
    if Cut(tuple(pieces), tuple(slots)).render(values) != spec:
        raise ValueError(f"demo request spec {row_id}: template does not rebuild the original text")
    # uuids, digits and the sentinels need no escaping: escaping the pieces apart equals the whole.
    return Cut(tuple(escape_string(p) for p in pieces), tuple(slots))


def instance_flavor_cut(flavor: str, instance_uuid: str) -> tuple[list[str], list[str]]:
    """The instance_extra.flavor text as an escaped SQL literal, with the ``cur`` flavor's slots."""
    document = json.loads(flavor)
    if json.dumps(document) != flavor:
        raise ValueError(f"instance {instance_uuid}: its flavor column does not round-trip")
    values = _with_flavor_sentinels(document["cur"])
    pieces, slots = cut_text(json.dumps(document), {"uuid": instance_uuid, **_FLAVOR_TOKENS})
    if Cut(tuple(pieces), tuple(slots)).render({"uuid": instance_uuid, **values}) != flavor:
        raise ValueError(f"instance {instance_uuid}: flavor template does not rebuild the original text")
    pieces = [escape_string(p) for p in pieces]
    pieces[0] = "'" + pieces[0]
    pieces[-1] += "'"
    return pieces, slots


def row_cut(columns: Sequence[str], row: Sequence[Any], instance_uuid: str, flavor_column: str | None) -> Cut:
    """An ``(...)`` VALUES tuple of a cell row with slots: uuid, the row id (``cid``), the flavor."""
    parts: list[Any] = ["("]
    for index, (column, value) in enumerate(zip(columns, row, strict=True)):
        if index:
            parts.append(",")
        if column == "id":
            parts.append(([""] * 2, ["cid"]))
        elif column == "deleted" and value:
            parts.append(([""] * 2, ["cid"]))  # Nova soft-deletes by setting deleted = id
        elif column == "instance_type_id":
            parts.append(([""] * 2, ["fid"]))
        elif column == flavor_column and value is not None:
            parts.append(instance_flavor_cut(value, instance_uuid))
        else:
            literal = escape_item(value, "utf8")
            parts.append(cut_text(literal, {"uuid": instance_uuid}))
    parts.append(")")
    return join_cuts(parts)


@dataclass(frozen=True)
class Template:
    """One demo instance: its RequestSpec and its cell rows, cut where new values go."""

    uuid: str
    kind: str  # "stale", "sync", "busy"
    spec_stale: bool
    cell_stale: bool
    flavor_id: int  # the copies' flavor (flavors.id)
    spec: Cut
    instance: Cut
    extra: Cut
    saved_after: timedelta | None  # request_specs updated_at - created_at in the demo
    project_id: str
    user_id: str
    deleted: bool
    values: dict[str, str] = field(default_factory=dict)  # the demo's own flavor values
    spec_values: dict[str, str] | None = None  # the RequestSpec's flavor, when not cur's


def load_templates(api_db: NovaApiDb, cell_conns: dict[str, pymysql.connections.Connection]):
    """(templates, skipped counts, instance column names, instance_extra column names)."""
    flavors = api_db.load_flavors()
    scope = Scope(all_keys=True)
    spec_planner = RowPlanner(flavors, scope, REQUEST_SPEC)
    cell_planner = RowPlanner(flavors, scope, INSTANCE_FLAVOR)
    with api_db.conn.cursor() as cur:
        cur.execute("SELECT id, instance_uuid, spec, created_at, updated_at FROM request_specs")
        specs = {row[1]: row for row in cur.fetchall()}
    templates: list[Template] = []
    skipped: dict[str, int] = {}
    columns: dict[str, list[str]] = {}
    for conn in cell_conns.values():
        with conn.cursor() as cur:
            cur.execute("SELECT * FROM instances ORDER BY id")
            columns["instances"] = [d[0] for d in cur.description]
            instances = {row[columns["instances"].index("uuid")]: row for row in cur.fetchall()}
            cur.execute("SELECT * FROM instance_extra ORDER BY id")
            columns["instance_extra"] = [d[0] for d in cur.description]
            extras = cur.fetchall()
        icol = {c: i for i, c in enumerate(columns["instances"])}
        ecol = {c: i for i, c in enumerate(columns["instance_extra"])}
        for extra in extras:
            instance_uuid = extra[ecol["instance_uuid"]]
            instance = instances[instance_uuid]
            spec_row = specs.get(instance_uuid)
            if spec_row is None:
                skipped["no request spec"] = skipped.get("no request spec", 0) + 1
                continue
            rs_id, _, spec, created_at, updated_at = spec_row
            flavor = extra[ecol["flavor"]]
            spec_outcome = spec_planner.plan_row(SpecRow(rs_id, instance_uuid, spec))
            cell_outcome = cell_planner.plan_row(SpecRow(extra[ecol["id"]], instance_uuid, flavor))
            if not all(o == IN_SYNC or isinstance(o, RowChange) for o in (spec_outcome, cell_outcome)):
                what = "orphan or unreadable copy"
                skipped[what] = skipped.get(what, 0) + 1
                continue
            deleted = bool(instance[icol["deleted"]] or extra[ecol["deleted"]])
            busy = instance_state_reason(
                deleted, instance[icol["vm_state"]], instance[icol["task_state"]], flavor
            )
            spec_stale, cell_stale = isinstance(spec_outcome, RowChange), isinstance(cell_outcome, RowChange)
            kind = "busy" if busy else "stale" if spec_stale and cell_stale else "sync" if not (
                spec_stale or cell_stale) else "disagreeing"
            document = json.loads(flavor)
            cur_data = document["cur"]["nova_object.data"]
            values = {"fid": str(cur_data["id"]), "fname": cur_data["name"], "fflavorid": cur_data["flavorid"]}
            spec_data = json.loads(spec)["nova_object.data"]["flavor"]["nova_object.data"]
            spec_values = {"fid": str(spec_data["id"]), "fname": spec_data["name"], "fflavorid": spec_data["flavorid"]}
            if spec_values != values and not busy:
                reason = "active, copies of different flavors"
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            if instance[icol["instance_type_id"]] != cur_data["id"]:
                skipped["instance_type_id differs"] = skipped.get("instance_type_id differs", 0) + 1
                continue
            templates.append(
                Template(
                    uuid=instance_uuid,
                    kind=kind,
                    spec_stale=spec_stale,
                    cell_stale=cell_stale,
                    flavor_id=cur_data["id"],
                    spec=spec_cut(rs_id, instance_uuid, spec),
                    instance=row_cut(columns["instances"], instance, instance_uuid, None),
                    extra=row_cut(columns["instance_extra"], extra, instance_uuid, "flavor"),
                    saved_after=(updated_at - created_at) if updated_at and created_at else None,
                    project_id=str(instance[icol["project_id"]] or "project"),
                    user_id=str(instance[icol["user_id"]] or "user"),
                    deleted=deleted,
                    values=values,
                    # mid-resize, the RequestSpec may hold another flavor than cur: it keeps its own
                    spec_values=spec_values if spec_values != values else None,
                )
            )
    return templates, skipped, columns


# -- flavors (the distinct mix) ---------------------------------------------------------------


@dataclass(frozen=True)
class FlavorVariant:
    base_id: int
    values: dict[str, str]  # fid, fname, fflavorid


def make_flavor_variants(conn, count: int) -> dict[int, list[FlavorVariant]]:
    """Clone the demo's flavors ``count`` times in all (new id, flavorid, name; same extra specs)."""
    with conn.cursor() as cur:
        cur.execute("SELECT * FROM flavors ORDER BY id")
        columns = [d[0] for d in cur.description]
        flavors = cur.fetchall()
        cur.execute("SELECT flavor_id, `key`, value FROM flavor_extra_specs ORDER BY flavor_id, `key`")
        specs: dict[int, list[tuple[str, str]]] = {}
        for flavor_id, key, value in cur.fetchall():
            specs.setdefault(flavor_id, []).append((key, value))
    col = {c: i for i, c in enumerate(columns)}
    first_id = max(f[col["id"]] for f in flavors) + 1000
    variants: dict[int, list[FlavorVariant]] = {}
    flavor_rows: list[str] = []
    spec_rows: list[str] = []
    for k in range(count):
        base = flavors[k % len(flavors)]
        new_id = first_id + k
        values = {"fid": str(new_id), "fname": f"{base[col['name']]}.v{k}",
                  "fflavorid": f"{base[col['flavorid']]}-v{k}"}
        row = list(base)
        row[col["id"]], row[col["name"]], row[col["flavorid"]] = new_id, values["fname"], values["fflavorid"]
        flavor_rows.append("(" + ",".join(escape_item(v, "utf8") for v in row) + ")")
        spec_rows.extend(
            f"({new_id},{escape_item(key, 'utf8')},{escape_item(value, 'utf8')})" for key, value in specs.get(
                base[col["id"]], ())
        )
        variants.setdefault(base[col["id"]], []).append(FlavorVariant(base[col["id"]], values))
    with conn.cursor() as cur:
        for start in range(0, len(flavor_rows), 1000):
            cur.execute(f"INSERT INTO flavors ({', '.join(f'`{c}`' for c in columns)}) VALUES "
                        + ",".join(flavor_rows[start:start + 1000]))
        for start in range(0, len(spec_rows), 2000):
            cur.execute("INSERT INTO flavor_extra_specs (flavor_id, `key`, value) VALUES "
                        + ",".join(spec_rows[start:start + 2000]))
    conn.commit()
    return variants


# -- the rows ---------------------------------------------------------------------------------


@dataclass
class Chunk:
    specs: list[str] = field(default_factory=list)
    mappings: list[str] = field(default_factory=list)
    instances: dict[str, list[str]] = field(default_factory=lambda: {c: [] for c in CELLS})
    extras: dict[str, list[str]] = field(default_factory=lambda: {c: [] for c in CELLS})
    rows: int = 0


def plan_kinds(rows: int, stale: float, busy: float, rng: random.Random) -> bytearray:
    """Per instance: 0 in sync, 1 stale, 2 busy; exact seeded counts."""
    kinds = bytearray(rows)
    stale_count, busy_count = round(rows * stale), round(rows * busy)
    if stale_count + busy_count > rows:
        raise ValueError("--stale-fraction + --busy-fraction must be at most 1")
    chosen = rng.sample(range(rows), stale_count + busy_count)
    for index in chosen[:stale_count]:
        kinds[index] = 1
    for index in chosen[stale_count:]:
        kinds[index] = 2
    return kinds


def build_chunks(
    templates: list[Template],
    rows: int,
    mix: Mix,
    seed: int,
    chunk_rows: int,
    cell_ids: dict[str, int],
    variants: dict[int, list[FlavorVariant]],
) -> Iterator[Chunk]:
    """The rows of every table, ``chunk_rows`` instances at a time, in id order."""
    rng = random.Random(seed)
    kinds = plan_kinds(rows, mix.stale, mix.busy, rng)
    sync = [t for t in templates if t.kind == "sync"]
    stale = [t for t in templates if t.kind == "stale"]
    busy = [t for t in templates if t.kind == "busy"]
    by_flavor: dict[int, list[Template]] = {}
    for t in sync:
        by_flavor.setdefault(t.flavor_id, []).append(t)
    # disagree: a stale template of a flavor that also has in-sync ones, paired with one of them.
    stale_pairable = [t for t in stale if t.flavor_id in by_flavor]
    next_id = dict.fromkeys(CELLS, 0)
    seen: set[int] = set()
    chunk = Chunk()
    for index in range(rows):
        row_id = index + 1
        kind = kinds[index]
        if kind == 2:
            spec_t = cell_t = rng.choice(busy)
        elif kind == 1 and mix.disagree:
            stale_t = rng.choice(stale_pairable)
            sync_t = rng.choice(by_flavor[stale_t.flavor_id])
            spec_t, cell_t = (stale_t, sync_t) if rng.random() < 0.5 else (sync_t, stale_t)
        else:
            spec_t = cell_t = rng.choice(stale if kind == 1 else sync)
        while True:
            bits = rng.getrandbits(128)
            if bits not in seen:
                seen.add(bits)
                break
        instance_uuid = str(uuid.UUID(int=bits, version=4))
        cell = CELLS[rng.getrandbits(1)]
        next_id[cell] += 1
        choices = variants.get(cell_t.flavor_id)
        flavor_values = rng.choice(choices).values if choices else cell_t.values
        values = {"uuid": instance_uuid, "rsid": str(row_id), "cid": str(next_id[cell]), **flavor_values}
        created = _FIRST_CREATED_AT + timedelta(seconds=37 * row_id)
        updated = f"'{created + spec_t.saved_after}'" if spec_t.saved_after is not None else "NULL"
        spec_values = values if spec_t.spec_values is None else {**values, **spec_t.spec_values}
        chunk.specs.append(f"({row_id},'{instance_uuid}','{spec_t.spec.render(spec_values)}','{created}',{updated})")
        chunk.mappings.append(
            f"('{created}',NULL,{row_id},'{instance_uuid}',{cell_ids[cell]},"
            f"'{escape_string(cell_t.project_id)}',{int(cell_t.deleted)},'{escape_string(cell_t.user_id)}')"
        )
        chunk.instances[cell].append(cell_t.instance.render(values))
        chunk.extras[cell].append(cell_t.extra.render(values))
        chunk.rows += 1
        if chunk.rows == chunk_rows:
            yield chunk
            chunk = Chunk()
    if chunk.rows:
        yield chunk


# -- indexes ------------------------------------------------------------------------------------


def _table_ddl(cur, table: str) -> str:
    cur.execute(f"SHOW CREATE TABLE `{table}`")
    return re.sub(r" AUTO_INCREMENT=\d+", "", cur.fetchone()[1])


def defer_secondary_indexes(cur, tables: Sequence[str]) -> dict[str, tuple[str, list[str]]]:
    """Drop the tables' secondary indexes (not those a foreign key needs); return how to re-add them.

    Inserting 10^6 random uuids into uuid indexes that do not fit the buffer pool is
    random I/O; building them once after the load is a sort. The schema is the same after.
    Kept: indexes led by a column of this table's foreign keys, and the unique key of a
    column another table's foreign keys reference (``instances.uuid``).
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
            "SELECT DISTINCT referenced_column_name FROM information_schema.KEY_COLUMN_USAGE "
            "WHERE table_schema = DATABASE() AND referenced_table_name = %s",
            (table,),
        )
        referenced = {c for (c,) in cur.fetchall()}
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
            lead = parts[0].strip("`").split("`")[0]
            if lead in fk_columns or (unique and len(parts) == 1 and lead in referenced):
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


# -- main ---------------------------------------------------------------------------------------


def cell_names(api_database: str) -> dict[str, str]:
    """{cell: database}: the bench's cells are named after its API database."""
    return {cell: cell_database_name(api_database, cell) for cell in ALL_CELLS}


def drop_all(params) -> None:
    for name in (params.database, *cell_names(params.database).values()):
        drop_database(params.connect_kwargs(), name)
        print(f"dropped {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/make_data.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--db-url", required=True, help="the API database: mysql+pymysql://root@127.0.0.1:3306/nfs_bench")
    parser.add_argument("--rows", type=int, help="instances to create (a RequestSpec and an instance copy each)")
    parser.add_argument("--mix", choices=sorted(MIXES), default="clone",
                        help="what the cloud looks like (default clone)")
    parser.add_argument("--stale-fraction", type=float, help="share of stale instances (default: the mix's)")
    parser.add_argument("--busy-fraction", type=float, help="share of deleted or busy instances (default: the mix's)")
    parser.add_argument("--flavors", type=int, help="clones of the demo's flavors to spread instances over")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--replace", action="store_true", help="drop the databases first if they exist")
    parser.add_argument("--chunk-rows", type=int, default=1000, help="instances per INSERT and commit (default 1000)")
    parser.add_argument("--drop", action="store_true", help="drop the API database and its cells and stop")
    args = parser.parse_args(argv)
    params = parse_db_url(args.db_url)
    if args.drop:
        drop_all(params)
        return 0
    if args.rows is None:
        parser.error("--rows is required")
    mix = MIXES[args.mix]
    mix = replace(
        mix,
        stale=mix.stale if args.stale_fraction is None else args.stale_fraction,
        busy=mix.busy if args.busy_fraction is None else args.busy_fraction,
        flavors=mix.flavors if args.flavors is None else args.flavors,
    )
    if args.rows < 1 or args.chunk_rows < 1 or not (0 <= mix.stale <= 1 and 0 <= mix.busy <= 1) or mix.flavors < 0:
        parser.error("--rows and --chunk-rows must be positive, the fractions in [0, 1]")
    if mix.stale + mix.busy > 1:
        parser.error("--stale-fraction + --busy-fraction must be at most 1")

    started = time.monotonic()
    kwargs = params.connect_kwargs()
    cells = cell_names(params.database)
    try:
        create_nova_api_database(kwargs, params.database, with_demo_data=True, replace=args.replace)
        for cell, database in cells.items():
            # The demo's cells first (the templates), replaced by empty ones once read.
            create_nova_cell_database(kwargs, database, demo_cell=cell, replace=args.replace)
    except ValueError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    point_cell_mappings(kwargs, params.database, cells)
    api_db = NovaApiDb(params).open()
    cell_conns = {c: pymysql.connect(**{**kwargs, "database": cells[c]}) for c in CELLS}
    templates, skipped, _columns = load_templates(api_db, cell_conns)
    api_db.close()
    for conn in cell_conns.values():
        conn.close()
    counts = {k: sum(1 for t in templates if t.kind == k) for k in ("stale", "sync", "busy", "disagreeing")}
    print(f"{params.database}: demo loaded in {time.monotonic() - started:.1f} s; templates: "
          + ", ".join(f"{v} {k}" for k, v in counts.items())
          + f"; left out: {', '.join(f'{v} {k}' for k, v in skipped.items()) or 'none'}")
    for database in cells.values():
        create_nova_cell_database(kwargs, database, demo_cell=None, replace=True)
    if (mix.stale and not counts["stale"]) or (mix.busy and not counts["busy"]) or not counts["sync"]:
        print("Error: the demo has no template of a kind this mix needs", file=sys.stderr)
        return 1

    api = pymysql.connect(**kwargs, autocommit=False, max_allowed_packet=64 << 20)
    cell_db = {c: pymysql.connect(**{**kwargs, "database": cells[c]}, autocommit=False,
                                  max_allowed_packet=64 << 20) for c in CELLS}
    with api.cursor() as cur:
        cur.execute("SELECT name, id FROM cell_mappings")
        cell_ids = dict(cur.fetchall())
    variants = make_flavor_variants(api, mix.flavors) if mix.flavors else {}
    deferred: dict[Any, dict] = {}
    for conn, tables in ((api, ("request_specs", "instance_mappings")),
                         *((cell_db[c], ("instances", "instance_extra")) for c in CELLS)):
        with conn.cursor() as cur:
            cur.execute("SET SESSION unique_checks = 0, foreign_key_checks = 0")
            if conn is api:
                cur.execute("DELETE FROM request_specs")  # the demo's 1,500: replaced by the clones
                cur.execute("DELETE FROM instance_mappings")
                cur.execute("DELETE FROM build_requests")  # their instances are not in the bench
            conn.commit()
            deferred[conn] = defer_secondary_indexes(cur, tables)

    rs_cols = "INSERT INTO request_specs (id, instance_uuid, spec, created_at, updated_at) VALUES "
    im_cols = ("INSERT INTO instance_mappings (created_at, updated_at, id, instance_uuid, cell_id, "
               "project_id, queued_for_delete, user_id) VALUES ")
    in_cols = f"INSERT INTO instances ({', '.join(f'`{c}`' for c in _columns['instances'])}) VALUES "
    ex_cols = f"INSERT INTO instance_extra ({', '.join(f'`{c}`' for c in _columns['instance_extra'])}) VALUES "
    chunks = build_chunks(templates, args.rows, mix, args.seed, args.chunk_rows, cell_ids, variants)
    handoff: queue.Queue = queue.Queue(maxsize=4)
    producer = threading.Thread(target=_produce, args=(chunks, handoff), daemon=True)
    load_started = time.monotonic()
    producer.start()
    done = sent_bytes = 0
    next_report = max(args.rows // 10, 1)
    while True:
        item = handoff.get()
        if item is None:
            break
        if isinstance(item, BaseException):
            raise item
        statements = [(api, rs_cols + ",".join(item.specs)), (api, im_cols + ",".join(item.mappings))]
        for c in CELLS:
            if item.instances[c]:
                statements.append((cell_db[c], in_cols + ",".join(item.instances[c])))
                statements.append((cell_db[c], ex_cols + ",".join(item.extras[c])))
        for conn, sql in statements:
            with conn.cursor() as cur:
                cur.execute(sql)
            sent_bytes += len(sql)
        for conn in (api, *cell_db.values()):
            conn.commit()
        done += item.rows
        if done >= next_report or done == args.rows:
            elapsed = time.monotonic() - load_started
            print(f"  {done:>10,} instances  {elapsed:7.1f} s  {done / elapsed:8,.0f} /s  "
                  f"{sent_bytes / elapsed / 1e6:6.1f} MB/s", flush=True)
            next_report += max(args.rows // 10, 1)
    producer.join()
    insert_s = time.monotonic() - load_started
    for conn, tables in deferred.items():
        with conn.cursor() as cur:
            restore_secondary_indexes(cur, tables)
    load_s = time.monotonic() - load_started
    print(f"  inserts {insert_s:.1f} s, secondary indexes built in {load_s - insert_s:.1f} s", flush=True)
    summary = []
    with api.cursor() as cur:
        cur.execute("ANALYZE TABLE request_specs, instance_mappings")
        cur.fetchall()
        cur.execute("SELECT COUNT(*), AVG(LENGTH(spec)) FROM request_specs")
        count, avg_len = cur.fetchone()
        summary.append(f"{count:,} request specs ({float(avg_len):,.0f} bytes on average)")
    for c in CELLS:
        with cell_db[c].cursor() as cur:
            cur.execute("ANALYZE TABLE instances, instance_extra")
            cur.fetchall()
            cur.execute("SELECT COUNT(*), AVG(LENGTH(flavor)) FROM instance_extra")
            count, avg_len = cur.fetchone()
            summary.append(f"{c}: {count:,} instances ({float(avg_len):,.0f} bytes of flavor on average)")
    for conn in (api, *cell_db.values()):
        conn.close()
    print(f"{params.database} (mix {args.mix}: stale {mix.stale:g}, busy {mix.busy:g}, flavors "
          f"{mix.flavors or 22}, disagree {mix.disagree}; seed {args.seed}): " + "; ".join(summary)
          + f"; loaded in {load_s:.1f} s = {args.rows / load_s:,.0f} instances/s "
          f"({sent_bytes / load_s / 1e6:.1f} MB/s); total {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
