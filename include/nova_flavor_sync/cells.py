"""Nova's cells: which cell databases there are, where each one is, and opening them all.

``nova_api.cell_mappings`` lists the cells. A cell's ``database_connection`` may be a
template that Nova fills from ``[database] connection`` (``dburl.format_cell_db_url``); the
operator may also give a cell's URL directly (``--cell-db-url NAME_OR_UUID=URL``), which
wins. cell0 holds the instances that never scheduled: it is opened and counted, never
written. Every cell is opened and its schema checked before anything is written, so a cell
that cannot be reached, or is no Nova cell database, stops the run up front, named.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import pymysql

from nova_flavor_sync.db import CELL0_UUID, IN_FLUX, MISSING_INSTANCE_ROW, NovaApiDb, NovaCellDb, same_server
from nova_flavor_sync.dburl import DbParams, cell_db_params, parse_db_url, redact_url
from nova_flavor_sync.errors import ConfigError, NovaFlavorSyncError, UsageError
from nova_flavor_sync.plan import Plan

log = logging.getLogger(__name__)

# Nova's [database] connection from the environment, what cell URL templates are filled from
# when nothing else gives it (as NOVA_API_DB_URL gives the API database).
DATABASE_CONNECTION_ENV = "NOVA_DATABASE_CONNECTION"


@dataclass(frozen=True, slots=True)
class CellMapping:
    """A row of ``cell_mappings``; ``database_connection`` may hold a password: never log it as is."""

    uuid: str
    name: str | None
    database_connection: str
    disabled: bool = False

    @property
    def is_cell0(self) -> bool:
        return self.uuid == CELL0_UUID

    @property
    def label(self) -> str:
        """How messages name the cell: ``cell1 (835ce9b0-...)``."""
        return f"{self.name} ({self.uuid})" if self.name else self.uuid


@dataclass(frozen=True)
class CellSources:
    """Where the cells' databases are, beyond what cell_mappings says: what an operator gives.

    ``template_url``: Nova's ``[database] connection``, which cell URL templates are filled
    from (``$NOVA_DATABASE_CONNECTION`` when None). ``cell_urls``: a cell's own database, by
    cell name or uuid, as a URL or as DbParams (an Airflow Connection's); it wins over the
    cell's mapping.
    """

    template_url: str | None = None
    cell_urls: Mapping[str, str | DbParams] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Cell:
    """A cell and where its database is (``source`` says where that came from)."""

    mapping: CellMapping
    params: DbParams
    source: str


def read_cell_mappings(api: NovaApiDb) -> list[CellMapping]:
    """The cells nova_api knows, in the order Nova made them."""
    return [CellMapping(uuid, name, url, disabled) for uuid, name, url, disabled in api.cell_mappings()]


def parse_cell_urls(values: Iterable[str]) -> dict[str, str]:
    """``--cell-db-url NAME_OR_UUID=URL`` values as ``{name or uuid: URL}``; UsageError if malformed."""
    urls: dict[str, str] = {}
    for value in values:
        which, sep, url = value.partition("=")
        which, url = which.strip(), url.strip()
        if not sep or not which or not url or "://" in which:
            raise UsageError(
                f"--cell-db-url {redact_url(value)!r} must be CELL=URL, the cell by name or uuid, "
                "e.g. cell1=mysql+pymysql://nova:***@db1/nova_cell1"
            )
        if which in urls:
            raise UsageError(f"--cell-db-url names cell {which!r} twice")
        urls[which] = url
    return urls


def locate_cells(
    mappings: Sequence[CellMapping], *, template_url: str | None = None,
    cell_urls: Mapping[str, str | DbParams] | None = None,
) -> list[Cell]:
    """Where each cell's database is: the operator's URL for it, else its mapping as Nova fills it.

    ``template_url`` is ``[database] connection``, which Nova fills templates from.
    Raises UsageError for a ``cell_urls`` key that names no cell, or several, and
    ConfigError, naming the cell, for a mapping that gives no usable URL.
    """
    if not mappings:
        raise ConfigError("nova_api has no cell_mappings: Nova has no cells here (nova-manage cell_v2 list_cells)")
    chosen: dict[str, str | DbParams] = {}  # cell uuid -> the operator's URL
    for which, url in (cell_urls or {}).items():
        matches = [m for m in mappings if which in (m.uuid, m.name)]
        if not matches:
            known = ", ".join(m.label for m in mappings)
            raise UsageError(f"--cell-db-url {which}=...: no cell has that name or uuid (cells: {known})")
        if len(matches) > 1:
            raise UsageError(f"--cell-db-url {which}=...: several cells have that name: give its uuid")
        chosen[matches[0].uuid] = url
    cells = []
    for mapping in mappings:
        if mapping.uuid in chosen:
            given = chosen[mapping.uuid]
            source = f"--cell-db-url for cell {mapping.label}"
            if isinstance(given, DbParams):  # an Airflow Connection's
                cells.append(Cell(mapping, given, f"the Connection given for cell {mapping.label}"))
            else:
                cells.append(Cell(mapping, parse_db_url(given, source=source), source))
            continue
        source = f"cell {mapping.label} database_connection"
        is_template = "{" in mapping.database_connection
        if is_template and template_url is None:  # dburl would refuse too; this names the ways out
            raise ConfigError(
                f"{source} is a template ({redact_url(mapping.database_connection)}) that Nova fills from "
                f"[database] connection: give --nova-conf, or --cell-db-url {mapping.name or mapping.uuid}=URL"
            )
        params = cell_db_params(mapping.database_connection, template_url, source=source)
        cells.append(Cell(mapping, params, f"{source} filled from [database] connection" if is_template else source))
    return cells


def instances_to_leave_alone(
    api: NovaApiDb, cells: Mapping[str, NovaCellDb], *, in_flux: bool = True
) -> dict[str, str]:
    """Every instance whose copies (both) must not be written now, with the reason.

    Queued for delete, in no cell (still being built, no mapping, cell0), and each cell's
    deleted and busy instances. ``cells`` are the open cells by uuid (cell0's is skipped:
    its instances are left alone as a whole).

    ``in_flux=False``: without the instances whose flavor alone says they are busy (``old``
    or ``new`` set): finding them means reading every flavor of every cell, most of the
    servers' work here (at 100,000 instances, 0.6 of its 1.0 server seconds), and a plan of
    the cells' copies reads them anyway; ``instances_in_flux`` finds them in those plans.

    Every query runs at once, on a connection of its own, in a thread of its own: each
    cell's scan for busy instances (on the cell's connection), the anti-join of each cell's
    missing instances and the instances without a cell (each on a new connection to
    nova_api), the queued-for-delete uuids (on nova_api's). They are the servers' work (a
    million instances: each a few seconds, instance_extra's flavor column read through),
    and one after the other they added up. The reasons are the same, in the same order of
    precedence, as one query after the other would give.
    """
    scanned = {uuid: cell for uuid, cell in cells.items() if uuid != CELL0_UUID}
    same = {uuid: same_server(api.server_identity(), cell.server_identity()) for uuid, cell in scanned.items()}
    # A connection serves one thread at a time: each cell's busy scan alone uses that cell's
    # connection until its result is in; this thread alone uses nova_api's.
    with ThreadPoolExecutor(max_workers=2 * len(scanned) + 1, thread_name_prefix="leave-alone") as pool:
        busy = {uuid: pool.submit(cell.busy_instances, in_flux=in_flux) for uuid, cell in scanned.items()}
        missing = {uuid: pool.submit(_on_own_connection, api, _missing_by_join, uuid, cell.params.database)
                   for uuid, cell in scanned.items() if same[uuid]}
        without_a_cell = pool.submit(_on_own_connection, api, NovaApiDb.instances_without_a_cell)
        reasons = dict.fromkeys(api.queued_for_delete(), "instance is queued for delete")
        for uuid, reason in without_a_cell.result().items():
            reasons.setdefault(uuid, reason)
        for cell_uuid, cell in scanned.items():
            for uuid, reason in busy[cell_uuid].result().items():
                reasons.setdefault(uuid, reason)
            found = missing[cell_uuid].result() if cell_uuid in missing else None
            for uuid in instances_missing_from_cell(api, cell_uuid, cell) if found is None else found:
                reasons.setdefault(uuid, MISSING_FROM_CELL)
    return reasons


def instances_in_flux(cell_plans: Iterable[Plan]) -> dict[str, str]:
    """The instances the plans of every cell's copies left alone because their flavor has
    ``old`` or ``new`` set, with that reason: what ``instances_to_leave_alone`` adds to its
    ``in_flux=False`` answer when it scans every flavor for them, if the plans were made with
    that answer.

    Every other reason wins over this one in those plans, as it does there: an instance a
    plan notes as in flux is in that answer for no other reason. The two differ only where a
    cell contradicts nova_api: an instance_extra row without its instances row puts its
    instance in flux for the scan only, and an instance found in two cells may be given
    another of its reasons.
    """
    return {note.instance_uuid: note.reason for plan in cell_plans for note in plan.left_alone
            if note.reason == IN_FLUX}


def _on_own_connection(api: NovaApiDb, query, *args):
    """``query(db, *args)`` on a new connection to ``api``'s database, closed after."""
    with NovaApiDb(api.params) as db:
        return query(db, *args)


# Why an instance whose mapping names a cell that has no row for it is left alone (both copies).
MISSING_FROM_CELL = MISSING_INSTANCE_ROW  # the reason db.iter_flavor_rows gives such a row too


def _missing_by_join(api: NovaApiDb, cell_uuid: str, cell_schema: str) -> list[str] | None:
    """``instances_missing_from_cell`` in one anti-join from nova_api's connection, for a cell
    whose database (``cell_schema``) is on nova_api's server (as often); None where nova_api's
    user may not read it."""
    try:
        return api.mapped_instances_missing_from(cell_uuid, cell_schema)
    except pymysql.err.MySQLError as exc:  # no SELECT on the cell's schema, collations that do not compare
        log.debug("Cell %s: no anti-join from nova_api (%s); merging uuid lists instead", cell_uuid, exc)
        return None


def instances_missing_from_cell(api: NovaApiDb, cell_uuid: str, cell: NovaCellDb) -> Iterator[str]:
    """Instances instance_mappings places in this cell that have no instances row there.

    A merge of two uuid-ordered reads, one per database (they may be on different
    servers, so no join): memory stays flat however many instances the cell holds. Both
    columns sort case-insensitively, as lower() does for the ASCII of a uuid.
    """
    present = iter(cell.instance_uuids())
    here = next(present, None)
    for uuid in api.mapped_instances(cell_uuid):
        key = uuid.lower()
        while here is not None and here.lower() < key:
            here = next(present, None)
        if here is None or here.lower() != key:
            yield uuid


def _password_none_hint(cell: Cell) -> str:
    """Why a template filled from ``user@host`` fails: Nova fills its password with the text None."""
    if cell.params.password != "None" or "filled from [database] connection" not in cell.source:
        return ""
    return (
        ". Its template was filled, as Nova fills it, from a [database] connection without a password "
        "(user@host), which gives the password the text 'None': give the password there "
        "(user:password@host, or user:@host for an empty one), or this cell's own URL"
    )


@contextmanager
def open_cells(cells: Sequence[Cell]) -> Iterator[dict[str, NovaCellDb]]:
    """Every cell's database, opened and checked (``{cell uuid: NovaCellDb}``), closed at the end.

    All or nothing: a cell that cannot be reached or is no Nova cell database raises (its
    message names the cell) after the ones already opened are closed, before anything is
    written anywhere.
    """
    opened: dict[str, NovaCellDb] = {}
    try:
        for cell in cells:
            db = NovaCellDb(cell.params)
            try:
                db.open()
                db.check_schema()
            except NovaFlavorSyncError as exc:  # DatabaseUnavailableError, SchemaError: exit 4
                db.close()
                raise type(exc)(f"cell {cell.mapping.label}: {exc}{_password_none_hint(cell)}") from None
            except BaseException:
                db.close()
                raise
            opened[cell.mapping.uuid] = db
            log.debug("Cell %s: %s (%s)", cell.mapping.label, cell.params.safe_url(), cell.source)
        yield opened
    finally:
        for db in opened.values():
            db.close()
