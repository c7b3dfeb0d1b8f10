"""The verbs the CLI and the DAGs call: connect, plan, back up, apply, verify, restore.

Each verb is one call with plain arguments and a plain result; none prints. Callers render
results with ``report`` and turn exceptions into exit codes or failed tasks. The verbs at
the end (``check_database`` to ``restore_backup``) are whole steps of a run that open their
own connections: one Airflow task calls one of them.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, TypeVar

from nova_flavor_sync import apply as apply_mod
from nova_flavor_sync import report
from nova_flavor_sync.apply import ApplyResult
from nova_flavor_sync.backup import (
    API_DATABASE,
    BackupInfo,
    BackupRecord,
    check_same_database,
    list_backups,
    open_backup,
    write_backup,
)
from nova_flavor_sync.cells import (
    DATABASE_CONNECTION_ENV,
    CellMapping,
    CellSources,
    instances_in_flux,
    instances_to_leave_alone,
    locate_cells,
    open_cells,
    read_cell_mappings,
)
from nova_flavor_sync.db import DEFAULT_PAGE_SIZE, NovaApiDb, NovaCellDb, NovaDb
from nova_flavor_sync.dburl import DbParams
from nova_flavor_sync.diff import IN_SYNC, PlanMerger, RowPlanner
from nova_flavor_sync.diff import make_plan as diff_make_plan
from nova_flavor_sync.errors import BackupError, ConfigError, NovaFlavorSyncError
from nova_flavor_sync.flavor import Flavor
from nova_flavor_sync.plan import CloudPlan, CopyPlan, Plan, RowChange, RowNote, SpecRow, batched
from nova_flavor_sync.plan_file import PlannedRow, SavedPlan, load_plan, save_plan
from nova_flavor_sync.plan_worker import PlanContext, PlanJob, PlanWorkers, split_ids
from nova_flavor_sync.progress import Progress
from nova_flavor_sync.restore import restore_targets
from nova_flavor_sync.scope import Scope, build_scope
from nova_flavor_sync.server_load import ReplicaDb
from nova_flavor_sync.spec_json import INSTANCE_FLAVOR, sha256_text
from nova_flavor_sync.spool import spool_directory
from nova_flavor_sync.storage import StoragePath, as_path
from nova_flavor_sync.throttle import MAX_BATCH_SIZE as MAX_BATCH_SIZE  # rows per batch, at most
from nova_flavor_sync.throttle import Pacer, PaceSettings
from nova_flavor_sync.value_changes import group_copies, group_lines, write_changes

log = logging.getLogger(__name__)
T = TypeVar("T")

def connect(params: DbParams) -> NovaApiDb:
    """Open the database and check it has what the tool needs; nothing is written."""
    db = NovaApiDb(params).open()
    try:
        db.check_schema()
    except BaseException:
        db.close()
        raise
    return db


def resolve_scope(
    db: NovaApiDb,
    *,
    flavor_selectors: Iterable[str] = (),
    instance_uuids: Iterable[str] = (),
    key_prefixes: Iterable[str] = (),
    all_keys: bool = False,
) -> tuple[dict[int, Flavor], Scope]:
    """Load the flavors once and turn the operator's selectors into a Scope."""
    flavors = db.load_flavors()
    scope = build_scope(
        flavors,
        flavor_selectors=flavor_selectors,
        instance_uuids=instance_uuids,
        key_prefixes=key_prefixes,
        all_keys=all_keys,
    )
    return flavors, scope


def make_plan(
    db: NovaApiDb,
    scope: Scope,
    *,
    flavors: dict[int, Flavor] | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    progress: Callable[[int, int], None] | None = None,
    left_alone: Mapping[str, str] | None = None,
) -> Plan:
    """Read every request spec in scope, page by page, in this process, and plan what to change.

    ``left_alone``: instances whose RequestSpecs must not be written, and why
    (``cells.instances_to_leave_alone``); by default those queued for delete.
    ``progress(rows_read, rows_expected)`` is called after every page. A whole cloud is
    planned by ``plan_copies``, which gives big copies to worker processes.
    """
    flavors = db.load_flavors() if flavors is None else flavors
    rows: Iterable[SpecRow] = _rows_in_scope(db, scope, page_size, left_alone=left_alone)
    if progress is not None:
        rows = _counted(rows, db.count_specs(), page_size, progress)
    return diff_make_plan(flavors, rows, scope)


def make_cell_plan(
    cell: NovaCellDb,
    scope: Scope,
    *,
    flavors: dict[int, Flavor],
    left_alone: Mapping[str, str] | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
) -> Plan:
    """Plan the instances' own flavor copies (``cur`` in instance_extra.flavor) of one cell, in this process.

    ``flavors`` come from nova_api (where flavors live); ``left_alone`` is
    ``cells.instances_to_leave_alone``. Instances that are deleted or in the middle of a
    resize or migration are left alone too, with the reason (``db.instance_state_reason``).
    """
    rows = _rows_in_scope(cell, scope, page_size, left_alone=left_alone)
    return diff_make_plan(flavors, rows, scope, layout=INSTANCE_FLAVOR)


@contextmanager
def open_cells_of(
    api: NovaApiDb, *, template_url: str | None = None, cell_urls: Mapping[str, str | DbParams] | None = None,
    sources: CellSources | None = None,
) -> Iterator[list[tuple[CellMapping, NovaCellDb]]]:
    """Every cell of ``api``'s cell_mappings, opened and checked, in mapping order; closed at the end.

    ``template_url`` is Nova's ``[database] connection`` (cell URL templates are filled from it;
    ``$NOVA_DATABASE_CONNECTION`` when None); ``cell_urls`` the operator's URL per cell name or
    uuid; ``sources`` both at once (what the DAG tasks pass). Raises, naming the cell, before
    anything is written (``cells.open_cells``).
    """
    if sources is not None:
        template_url, cell_urls = sources.template_url, sources.cell_urls
    template_url = template_url or os.environ.get(DATABASE_CONNECTION_ENV, "").strip() or None
    cells = locate_cells(read_cell_mappings(api), template_url=template_url, cell_urls=cell_urls)
    with open_cells(cells) as opened:
        yield [(cell.mapping, opened[cell.mapping.uuid]) for cell in cells]


def plan_both_copies(
    api: NovaApiDb,
    cells: Sequence[tuple[CellMapping, NovaCellDb]],
    scope: Scope,
    *,
    flavors: dict[int, Flavor] | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> CloudPlan:
    """Plan both copies of every instance: the RequestSpecs in nova_api and each cell's instance copies.

    ``cells`` are the open cells in cell_mappings order; cell0's instances are counted, never
    planned. Both copies of an instance that must be left alone are (``instances_to_leave_alone``).
    Without ``flavors`` they are read now (a verify after writing reads everything again).
    ``progress`` and ``workers``: see plan_copies.
    """
    flavors = api.load_flavors() if flavors is None else flavors
    copies = plan_copies(api, cells, copy_keys(cells), scope, flavors=flavors, page_size=page_size,
                         progress=progress, workers=workers)
    never_written = {mapping.label: db.instance_counts()["total"] for mapping, db in cells if mapping.is_cell0}
    return CloudPlan(scope, copies, never_written)


def copy_keys(cells: Sequence[tuple[CellMapping, NovaCellDb]]) -> list[str]:
    """The copies a run plans, as CopyPlan.key names them: nova_api, then each cell but cell0, in order."""
    return [API_DATABASE] + [mapping.uuid for mapping, _ in cells if not mapping.is_cell0]


def plan_copy(
    api: NovaApiDb,
    cells: Sequence[tuple[CellMapping, NovaCellDb]],
    key: str,
    scope: Scope,
    *,
    flavors: dict[int, Flavor],
    left_alone: Mapping[str, str] | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> CopyPlan:
    """The plan of one copy: nova_api's RequestSpecs (``key`` "nova_api") or one cell's instance copies.

    The instances to leave alone are found over every cell (see plan_copies): the copies of
    one instance are planned with the same reasons whichever is planned first, or elsewhere.
    """
    return plan_copies(api, cells, [key], scope, flavors=flavors, left_alone=left_alone, page_size=page_size,
                       progress=progress, workers=workers)[0]


# Planning big copies: how many worker processes, from how many rows (by id) on. Two use
# both cores of a small machine; the database server needs its share too.
PLAN_WORKERS = 2
PLAN_WORKERS_FROM = 50_000
# A big copy is cut into this many id ranges per worker: a worker that finishes its range
# early takes the next one, of this copy or the next, instead of waiting for the others.
RANGES_PER_WORKER = 2


def plan_copies(
    api: NovaApiDb,
    cells: Sequence[tuple[CellMapping, NovaCellDb]],
    keys: Sequence[str],
    scope: Scope,
    *,
    flavors: dict[int, Flavor],
    left_alone: Mapping[str, str] | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> list[CopyPlan]:
    """The plans of these copies (``copy_keys``), in order: the one place that decides on plan workers.

    ``left_alone``: the instances whose copies must not be written, and why; by default
    found here (``cells.instances_to_leave_alone`` over every cell), while the workers
    already plan (``PlanWorkers.run``). When every copy is planned, the cells' come first,
    and the instances in flux their plans find go to the RequestSpecs' plan instead of a
    scan of every flavor (``cells.instances_in_flux``).
    When a copy is big (PLAN_WORKERS_FROM rows or more by id), the id ranges of every copy go
    to one set of PLAN_WORKERS worker processes (``plan_worker.PlanWorkers``), which stay
    busy from one copy to the next; each copy's ranges are merged into its plan
    (``diff.PlanMerger``, as they come in: the plan and digest one process would make). A
    small cloud, or an instance-uuid scope, is planned in this process. ``workers`` overrides the count (1:
    everything in this process). ``progress(rows, expected)`` follows the reading of the
    RequestSpecs when they are planned here, of every copy otherwise.
    """
    targets = [_copy_database(api, cells, key) for key in keys]
    bounds_of: dict[int, tuple[int, int]] = {}
    if scope.instance_uuids is None and workers != 1:
        for index, (_, _, db) in enumerate(targets):
            bounds = db.flavor_id_bounds() if isinstance(db, NovaCellDb) else db.spec_id_bounds()  # type: ignore[union-attr]
            if bounds is not None:
                bounds_of[index] = bounds
    big = any(high - low + 1 >= PLAN_WORKERS_FROM for low, high in bounds_of.values())
    count = workers or (PLAN_WORKERS if big else 1)
    if count == 1:
        bounds_of = {}

    # Planning every copy at once, the RequestSpecs wait for the cells' plans: those find the
    # instances in flux (old or new flavor set) as they read every flavor, which the scan for
    # the instances to leave alone would read again (cells.instances_in_flux).
    every_cell = {mapping.uuid for mapping, _ in cells if not mapping.is_cell0}
    flux_from_cells = left_alone is None and API_DATABASE in keys and every_cell <= set(keys)
    cells_first = sorted(range(len(targets)), key=lambda index: targets[index][1] is None)

    @functools.cache
    def find_left_alone() -> Mapping[str, str]:
        """What a cell's copies are planned with (and, unless flux_from_cells, the RequestSpecs)."""
        if left_alone is not None:
            return left_alone
        return instances_to_leave_alone(api, {mapping.uuid: db for mapping, db in cells}, in_flux=not flux_from_cells)

    def plan_here(index: int, reasons: Mapping[str, str]) -> Plan:
        db = targets[index][2]
        if isinstance(db, NovaCellDb):
            return make_cell_plan(db, scope, flavors=flavors, left_alone=reasons, page_size=page_size)
        return make_plan(db, scope, flavors=flavors, page_size=page_size, left_alone=reasons,  # type: ignore[arg-type]
                         progress=progress)

    planned: dict[int, Plan] = {}

    def flux_found() -> dict[str, str]:
        """The instances in flux the cells' plans found, once every cell's plan is made: the
        RequestSpecs are planned with them and ``find_left_alone()``."""
        for index in cells_first:
            if targets[index][1] is not None and index not in planned:  # no worker had it
                planned[index] = plan_here(index, find_left_alone())
        return instances_in_flux(planned[i] for i in cells_first if targets[i][1]) if flux_from_cells else {}

    with (spool_directory() as spool_dir,
          PlanWorkers(count if bounds_of else 0) as pool):
        # Once workers run, every copy goes to them, small ones too: planned here it would
        # wait for the workers' copies, or they for it. The cells' ranges come first.
        jobs: list[PlanJob] = []
        owners: list[int] = []  # jobs[i] is a range of targets[owners[i]]
        for index in cells_first:
            if index in bounds_of:
                db = targets[index][2]
                for ids in split_ids(bounds_of[index], count * RANGES_PER_WORKER):
                    jobs.append(PlanJob(db.params, ids, cell=isinstance(db, NovaCellDb)))
                    owners.append(index)
        if jobs:
            expected = sum(high - low + 1 for low, high in bounds_of.values())
            report = None if progress is None else (lambda done: progress(done, max(expected, done)))
            context = PlanContext(flavors, scope, page_size, spool_dir)
            merged = {index: PlanMerger(scope) for index in bounds_of}
            parts_left = Counter(owners)
            cell_jobs_left = sum(1 for owner in owners if targets[owner][1] is not None)
            # Without a cell's job, every cell is empty: none is in flux.
            parts = pool.run(context, jobs, left_alone=find_left_alone, progress=report,
                             in_flux=not (flux_from_cells and cell_jobs_left))
            for owner, part in zip(owners, parts, strict=True):
                merged[owner].add(part)
                parts_left[owner] -= 1
                if not parts_left[owner]:
                    planned[owner] = merged[owner].plan()
                if targets[owner][1] is not None:
                    cell_jobs_left -= 1
                    if flux_from_cells and not cell_jobs_left:  # the RequestSpecs' ranges wait for them
                        pool.send_instances_in_flux(flux_found())
            if progress is not None:
                read = sum(planned[index].rows_read for index in bounds_of)
                progress(read, read)
        for index in cells_first:
            if index not in planned:
                planned[index] = plan_here(index, find_left_alone() if targets[index][1]
                                           else {**find_left_alone(), **flux_found()})
    return [CopyPlan(where, cell_uuid, planned[index]) for index, (where, cell_uuid, _) in enumerate(targets)]


def _copy_database(
    api: NovaApiDb, cells: Sequence[tuple[CellMapping, NovaCellDb]], key: str
) -> tuple[str, str | None, NovaDb]:
    """Where a copy lives: (its name in reports, its cell's uuid or None for nova_api, its database)."""
    if key == API_DATABASE:
        return API_DATABASE, None, api
    for mapping, db in cells:
        if mapping.uuid == key and not mapping.is_cell0:
            return mapping.label, mapping.uuid, db
    raise ConfigError(f"no cell {key} in nova_api's cell_mappings (cell0 is never written)")


def _counted(rows: Iterable[SpecRow], expected: int, every: int, progress: Callable[[int, int], None]):
    done = 0
    for done, row in enumerate(rows, 1):
        yield row
        if done % every == 0:
            progress(done, max(expected, done))
    progress(done, max(expected, done))


# Where a run's copies live: "nova_api" and each cell's uuid (as CopyPlan.key and backups name them).
Databases = Mapping[str, NovaDb]


def databases_of(api: NovaApiDb, cells: Sequence[tuple[CellMapping, NovaCellDb]] = ()) -> dict[str, NovaDb]:
    """nova_api and every open cell but cell0 (never written), by the key backups use."""
    return {API_DATABASE: api, **{mapping.uuid: db for mapping, db in cells if not mapping.is_cell0}}


@dataclass
class BackupResult:
    info: BackupInfo
    # Rows changed since planning, by database: apply skips them (see back_up)
    diverged_by_database: dict[str, list[int]] = field(default_factory=dict)

    @property
    def diverged(self) -> list[int]:
        """nova_api's diverged rows (a run of the RequestSpecs only)."""
        return self.diverged_by_database.get(API_DATABASE, [])


def back_up(
    db: NovaApiDb,
    plan: Plan | SavedPlan,
    directory: StoragePath,
    *,
    backup_all: bool = False,
    page_size: int = DEFAULT_PAGE_SIZE,
) -> BackupResult:
    """Back up one plan of nova_api's RequestSpecs (``back_up_copies`` with a single copy)."""
    return back_up_copies({API_DATABASE: db}, [CopyPlan(API_DATABASE, None, plan)], directory,  # type: ignore[arg-type]
                          digest=plan.digest, scope=plan.scope, backup_all=backup_all, page_size=page_size)


def back_up_copies(
    databases: Databases,
    copies: Sequence[CopyPlan],
    directory: StoragePath,
    *,
    digest: str,
    scope: Scope,
    cell_names: Mapping[str, str | None] | None = None,
    backup_all: bool = False,
    page_size: int = DEFAULT_PAGE_SIZE,
) -> BackupResult:
    """Write the rows the plans change (or every row in scope) to ONE new backup file.

    ``copies``: one plan per database (nova_api's RequestSpecs, each cell's instance
    copies; a plan may be a SavedPlan), ``databases`` the open databases by CopyPlan.key,
    ``digest`` the run's plan digest (a CloudPlan's). Each record names its database.
    A row whose bytes are no longer those planned is still backed up as it is now, and
    listed in ``diverged_by_database``: applying it could overwrite bytes the backup does
    not hold.
    """
    diverged: dict[str, list[int]] = {}
    identities = {}
    for copy in copies:
        identity = databases[copy.key].server_identity()
        if copy.cell_uuid is not None:
            identity = {"cell": (cell_names or {}).get(copy.cell_uuid), **identity}
        identities[copy.key] = identity
    records = (
        record
        for copy in copies
        for record in _backup_records(databases[copy.key], copy, diverged.setdefault(copy.key, []),
                                      scope=scope, backup_all=backup_all, page_size=page_size)
    )
    info = write_backup(directory, records, databases=identities, plan_digest=digest, scope=scope.as_dict())
    log.info("Backup written: %s (%d records: %s)", info.path, info.record_count,
             ", ".join(f"{info.where(key)}={count}" for key, count in info.records_by_database.items()) or "none")
    return BackupResult(info, {key: ids for key, ids in diverged.items() if ids})


def _backup_records(
    db: NovaDb, copy: CopyPlan, diverged: list[int], *, scope: Scope, backup_all: bool, page_size: int
) -> Iterator[BackupRecord]:
    """One copy's backup records, in id order; both ways walk the plan a page at a time."""
    changes = copy.plan.changes

    def record(row_id, uuid, spec, updated_at, change) -> BackupRecord:
        backed_up = BackupRecord.of_row(row_id, uuid, spec, updated_at, change.new_sha256 if change else None,
                                        copy.key)
        if change is not None and backed_up.sha256 != change.old_sha256:
            diverged.append(row_id)
        return backed_up

    if backup_all:
        planned = iter(changes)
        change = next(planned, None)
        for row in _rows_in_scope(db, scope, page_size, with_updated_at=True):
            while change is not None and change.id < row.id:
                change = next(planned, None)
            yield record(row.id, row.instance_uuid, row.spec, row.updated_at,
                         change if change is not None and change.id == row.id else None)
    else:
        for batch, current in _read_ahead(db, batched(changes, page_size)):
            for change in batch:
                if change.id in current:
                    yield record(change.id, *current[change.id], change)


def apply_plan(
    db: NovaApiDb,
    plan: Plan,
    *,
    batch_size: int = apply_mod.DEFAULT_BATCH_SIZE,
    exclude_ids: Iterable[int] = (),
    progress: Callable[[ApplyResult, int], None] | None = None,
    pacer: Pacer | None = None,
) -> ApplyResult:
    """Write the plan's changes in compare-and-swap batches (sized and paced by ``pacer`` if given)."""
    return apply_mod.apply_plan(
        db, plan, batch_size=batch_size, exclude_ids=exclude_ids, progress=progress, pacer=pacer
    )


@dataclass
class CopyApplied:
    """What a run wrote into one copy, and why it did not write the rest."""

    copy: CopyPlan
    result: ApplyResult
    conflicts: list[RowNote]  # each conflict re-read and explained (explain_conflicts)


def apply_copies(
    databases: Databases,
    copies: Sequence[CopyPlan],
    *,
    batch_size: int = apply_mod.DEFAULT_BATCH_SIZE,
    exclude: Mapping[str, Iterable[int]] | None = None,
    pacer_for: Callable[[NovaDb], Pacer] | None = None,
    progress: Callable[[CopyPlan, ApplyResult, int], None] | None = None,
) -> list[CopyApplied]:
    """Write every copy's changes in compare-and-swap batches: the cells' instance copies first.

    Why cells first: Nova copies the instance's flavor into the RequestSpec (a cold
    migration does, and saves it), never the other way round. If a run stops between the
    two, the instances it reached have a fresh instance copy and a stale RequestSpec: the
    state before the sync for live migration and evacuate, and a cold migration heals the
    RequestSpec from the instance. The other order would leave a fresh RequestSpec that the
    next cold migration overwrites with the stale instance copy. ``--verify`` and the drift
    check report such instances (CloudPlan.disagreement); running again heals them.

    ``exclude``: rows by database not to write (the backup's diverged rows): reported as
    conflicts. ``pacer_for`` gives each database's pacer (``pacers``).
    """
    done = []
    for copy in sorted(copies, key=lambda c: c.cell_uuid is None):  # stable: cells in order, then nova_api
        if not copy.plan.changes:
            continue
        db = databases[copy.key]
        result = apply_plan(
            db, copy.plan, batch_size=batch_size, exclude_ids=(exclude or {}).get(copy.key, ()),
            pacer=pacer_for(db) if pacer_for else None,
            progress=(lambda r, total, copy=copy: progress(copy, r, total)) if progress else None,
        )
        # A cell database has no flavors: its conflicts are re-planned with nova_api's.
        flavors = databases[API_DATABASE].load_flavors() if copy.cell_uuid and result.conflicts else None  # type: ignore[attr-defined]
        done.append(CopyApplied(copy, result, explain_conflicts(db, copy.plan.scope, result.conflicts,
                                                                flavors=flavors)))
    return done


@contextmanager
def pacers(
    settings: PaceSettings, replicas: Sequence[DbParams] = (), *, pause_first: bool = False
) -> Iterator[Callable[[NovaDb], Pacer]]:
    """For one run's writes: a Pacer per database, watching its server's load and the replicas' lag.

    Each replica is opened and its lag read once here, so a URL that is no replica, or a
    user who may not read the replication status, is refused before anything is written.
    """
    opened: list[ReplicaDb] = []
    made: dict[int, Pacer] = {}

    def pacer_for(db: NovaDb) -> Pacer:
        if id(db) not in made:
            fitted = db.fit_pacing(settings)  # its write timeout; Galera's write-set limits
            made[id(db)] = Pacer(fitted, read_load=lambda: db.server_load(opened), pause_first=pause_first)
        return made[id(db)]

    try:
        for params in replicas:
            opened.append(ReplicaDb(params).open())
        yield pacer_for
    finally:
        for replica in opened:
            replica.close()


@contextmanager
def pacing(
    db: NovaDb, settings: PaceSettings, replicas: Sequence[DbParams] = (), *, pause_first: bool = False
) -> Iterator[Pacer]:
    """The Pacer of one database's writes (see pacers)."""
    with pacers(settings, replicas, pause_first=pause_first) as pacer_for:
        yield pacer_for(db)


def apply_saved_plan(
    db: NovaDb,
    saved: SavedPlan,
    *,
    first_id: int,
    last_id: int,
    flavors: dict[int, Flavor] | None = None,
    exclude_ids: Iterable[int] = (),
    batch_size: int = apply_mod.DEFAULT_BATCH_SIZE,
    progress: Callable[[ApplyResult, int], None] | None = None,
    pacer: Pacer | None = None,
) -> ApplyResult:
    """Apply the approved plan's rows with ids in [first_id, last_id] (one Airflow mapped task).

    Each row is planned again from what the database holds now, with the current flavors
    (``flavors``: nova_api's, read from ``db`` when it is nova_api), and written only if that
    gives exactly the approved bytes-before and bytes-after: a row Nova saved or a flavor
    changed since the approval is a conflict, never overwritten.
    """
    excluded = set(exclude_ids)
    rows = [r for r in saved.changes if first_id <= r.id <= last_id]
    flavors = db.load_flavors() if flavors is None else flavors  # type: ignore[attr-defined]
    planner = RowPlanner(flavors, saved.scope, db.COPY.layout)
    targets = [
        apply_mod.RowTarget(r.id, r.old_sha256, r.new_sha256, _approved_rewrite(planner, r), r.instance_uuid)
        for r in rows
        if r.id not in excluded
    ]
    result = apply_mod.apply_batches(
        db, targets, total=len(targets), batch_size=batch_size, pacer=pacer, progress=progress
    )
    result.conflicts = [r.id for r in rows if r.id in excluded] + result.conflicts
    return result


def _approved_rewrite(planner: RowPlanner, row: PlannedRow) -> Callable[[str], str | None]:
    """Rebuild a row from its current text, or None if that no longer gives the approved bytes."""

    def rewrite(text: str) -> str | None:
        fresh = planner.plan_row(SpecRow(row.id, row.instance_uuid, text))
        if not isinstance(fresh, RowChange) or fresh.new_sha256 != row.new_sha256:
            return None  # the flavor (or the row's scope) changed since the approval
        return apply_mod.target_writer(fresh.diff, planner.layout)(text)

    return rewrite


def explain_conflicts(
    db: NovaDb, scope: Scope, ids: Sequence[int], *, flavors: dict[int, Flavor] | None = None
) -> list[RowNote]:
    """Re-read and re-plan rows that changed under us: are they in sync now, or still stale?

    ``flavors``: nova_api's flavors (read from ``db`` when it is nova_api and none are given).
    """
    if not ids:
        return []
    planner = RowPlanner(db.load_flavors() if flavors is None else flavors, scope, db.COPY.layout)  # type: ignore[attr-defined]
    current = db.read_specs(ids)
    # only these rows' instances: explaining a few conflicts must not scan the whole cell
    busy = db.busy_instances([uuid for uuid, _, _ in current.values()]) if isinstance(db, NovaCellDb) else {}
    notes = []
    for row_id in ids:
        if row_id not in current:
            notes.append(RowNote(row_id, "", "changed since planned: row deleted"))
            continue
        uuid, spec, updated_at = current[row_id]
        outcome = planner.plan_row(SpecRow(row_id, uuid, spec, updated_at, busy.get(uuid, "")))
        state = (
            "now in sync" if outcome == IN_SYNC
            else "still out of sync: run again" if isinstance(outcome, RowChange)
            else f"now left alone: {outcome[1].reason}" if isinstance(outcome, tuple) and outcome[0] == "left_alone"
            else f"now {outcome[1].reason}" if isinstance(outcome, tuple)
            else "now out of scope"
        )
        notes.append(RowNote(row_id, uuid, f"changed since planned, not overwritten; {state}"))
    return notes


@dataclass
class RestoreResult:
    backup: BackupInfo
    run: bool
    restored: list[int] = field(default_factory=list)  # with run=False: would be restored
    skipped: list[RowNote] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)
    not_verified: list[int] = field(default_factory=list)  # restored, but read back different
    restored_by_database: dict[str, int] = field(default_factory=dict)  # "nova_api" / cell uuid -> rows


def restore(
    api: NovaApiDb,
    path: StoragePath,
    *,
    cells: Sequence[tuple[CellMapping, NovaCellDb]] = (),
    run: bool = False,
    force: bool = False,
    batch_size: int = apply_mod.DEFAULT_BATCH_SIZE,
    pacer_for: Callable[[NovaDb], Pacer] | None = None,
) -> RestoreResult:
    """Check a backup belongs here, then put its bytes back (or say what would be put back).

    A restore is an apply: each database's records become compare-and-swap targets (from
    the bytes the sync wrote, or with ``force`` from whatever the row holds) and go through
    ``apply.apply_batches``, paced by ``pacer_for`` like a sync, in the sync's order (cells
    first). Every database the backup names is checked to be the one it was taken from
    before anything is written; a cell the backup names that is not open is refused. The
    backup is checked whole first, then read again a database at a time (``backup.open_backup``):
    its records are never all in memory.
    """
    with open_backup(path) as backup:  # checked whole, then read a database at a time
        databases = databases_of(api, cells)
        for key in backup.info.databases:
            if key not in databases:
                raise BackupError(
                    f"backup {path.name} holds rows of cell {backup.info.where(key)}, which nova_api's "
                    "cell_mappings do not list (or which could not be opened): nothing was restored"
                )
            check_same_database(backup.info, databases[key].server_identity(), key)
        result = RestoreResult(backup.info, run)
        for key in sorted(backup.counts, key=lambda k: k == API_DATABASE):  # cells first, as a sync writes
            db = databases[key]
            outcome = apply_mod.apply_batches(
                db, restore_targets(backup.records(key), force=force), total=backup.counts[key],
                batch_size=batch_size, pacer=pacer_for(db) if (run and pacer_for) else None, write=run,
            )
            result.restored += outcome.updated
            result.restored_by_database[key] = len(outcome.updated)
            result.errors.update(outcome.errors)
            skipped, different = _looked_back(db, backup.records_by_id(key), outcome, verify=run)
            result.skipped += skipped
            result.not_verified += different
    return result


def _looked_back(
    db: NovaDb, records: Iterable[BackupRecord], outcome: ApplyResult, *, verify: bool
) -> tuple[list[RowNote], list[int]]:
    """After one database's restore: why each row it did not restore was skipped, and (``verify``)
    the rows it restored that read back different from their records.

    ``records``: the database's records, each id's once, in id order (``BackupFile.records_by_id``),
    read once more instead of kept from the restore: a big backup's records do not fit in memory.
    """
    skipped = set(outcome.already) | set(outcome.conflicts) | set(outcome.gone)
    restored = outcome.updated
    if any(a >= b for a, b in pairwise(restored)):  # in id order as written; a hand-made backup's may not be
        restored = sorted(set(restored))
    uuids: dict[int, str] = {}
    different: list[int] = []
    if skipped or (verify and restored):
        written = iter(restored)
        next_written = next(written, None)
        expected: dict[int, str] = {}  # a page of restored rows and the sha256 they must have
        for record in records:
            if record.id in skipped:
                uuids[record.id] = record.instance_uuid
            while next_written is not None and next_written < record.id:
                next_written = next(written, None)
            if verify and next_written == record.id:
                expected[record.id] = record.sha256
                if len(expected) == DEFAULT_PAGE_SIZE:
                    different += _read_back_different(db, expected)
                    expected = {}
        different += _read_back_different(db, expected)
    notes = (
        [RowNote(row_id, uuids[row_id], "already holds the backed-up spec") for row_id in outcome.already]
        + [RowNote(row_id, uuids[row_id], "changed since the sync wrote it (--force restores it anyway)")
           for row_id in outcome.conflicts]
        + [RowNote(row_id, uuids[row_id], "row no longer exists") for row_id in outcome.gone]
    )
    return notes, different


def _read_back_different(db: NovaDb, expected: Mapping[int, str]) -> list[int]:
    """The rows whose bytes are not those expected (by sha256), read a page at a time."""
    different = []
    for page in batched(sorted(expected), DEFAULT_PAGE_SIZE):
        current = db.read_specs(page, with_updated_at=False)
        different += [i for i in page if i not in current or sha256_text(current[i][1]) != expected[i]]
    return different


def _rows_in_scope(
    db: NovaDb,
    scope: Scope,
    page_size: int,
    *,
    with_updated_at: bool = False,
    left_alone: Mapping[str, str] | None = None,
) -> Iterator[SpecRow]:
    if isinstance(db, NovaCellDb):
        rows = db.iter_flavor_rows(page_size=page_size, with_updated_at=with_updated_at, left_alone=left_alone)
        wanted = scope.instance_uuids
        return rows if wanted is None else (row for row in rows if row.instance_uuid in wanted)
    uuids = sorted(scope.instance_uuids) if scope.instance_uuids is not None else None
    return db.iter_spec_rows(page_size=page_size, instance_uuids=uuids,  # type: ignore[attr-defined]
                             with_updated_at=with_updated_at, left_alone=left_alone)


def _read_ahead(db: NovaApiDb, batches: Iterable[list[T]]) -> Iterator[tuple[list[T], dict]]:
    """Each batch with its rows' current values, the next batch's read running meanwhile.

    The server reads batch n+1 from disk while this process encodes and writes batch n
    (at a million rows this took a backup from 33 s to about 20 s). One read at a time, in
    one other thread; the connection is not used by anything else until the batches end.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nova-flavor-sync-read-ahead") as reader:
        pending: tuple[list[T], Future] | None = None
        for batch in batches:
            ahead = (batch, reader.submit(db.read_specs, [row.id for row in batch]))  # type: ignore[attr-defined]
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = ahead
        if pending is not None:
            yield pending[0], pending[1].result()


# One step of a run each, opening its own connections from DbParams: what each Airflow task
# calls (dags/). Each returns a small JSON-ready dict; the plan travels between steps as a
# file (plan_file), the dict carries its path, digest and counts.

# The task logs say how far reading has got every this many rows.
PROGRESS_EVERY = 10_000


class DriftFoundError(NovaFlavorSyncError):
    """Verify found flavor copies still out of sync in scope: fails the task."""


def check_database(params: DbParams, *, cell_sources: CellSources | None = None) -> list[dict[str, str]]:
    """Connect, check the schema, open and check every cell; return the copies a run plans.

    ``cell_sources``: where the cell databases are beyond cell_mappings (a template's
    filling, a cell's own database); every function here that opens the cells takes it.
    The copies, in the order a run plans them: ``{"key": "nova_api" or the cell uuid, "where": ...}``
    (``copy_keys``); cell0 is counted here, never planned.
    """
    with connect(params) as db, open_cells_of(db, sources=cell_sources) as cells:
        labels = {mapping.uuid: mapping.label for mapping, _ in cells}
        for mapping, cell in cells:
            if mapping.is_cell0:
                log.info("Cell %s: %d instances that never scheduled; counted, never written", mapping.label,
                         cell.instance_counts()["total"])
        keys = copy_keys(cells)
    log.info("Connected to %s: nova_api schema checked; %d cells opened and checked", params.safe_url(), len(cells))
    return [{"key": key, "where": labels.get(key, key)} for key in keys]


def plan_copy_to_file(
    params: DbParams,
    work_dir: StoragePath,
    key: str,
    *,
    flavors: Sequence[str] = (),
    instances: Sequence[str] = (),
    key_prefixes: Sequence[str] = (),
    all_keys: bool = False,
    cell_sources: CellSources | None = None,
) -> dict[str, Any]:
    """Plan one copy (one mapped task per copy: nova_api's RequestSpecs, each cell's instance copies).

    Every cell is opened: both copies of an instance to leave alone (busy, deleted, being
    built, in cell0) are left alone whichever copy this task plans. The plan is saved to a
    file (``plan_file``); its digest goes into the run's digest (``combine_plans``).
    """
    with connect(params) as db, open_cells_of(db, sources=cell_sources) as cells:
        found, scope = resolve_scope(
            db, flavor_selectors=flavors, instance_uuids=instances, key_prefixes=key_prefixes, all_keys=all_keys
        )
        reading = Progress(f"Read {key}", every=PROGRESS_EVERY)
        copy = plan_copy(db, cells, key, scope, flavors=found, progress=reading.update)
    for line in (report.plan_lines(copy.plan, verbose=True) + report.summary_lines(copy.plan, what=copy.rows_named)
                 + report.value_change_lines([copy], verbose=True)):
        log.info("%s", line)
    path = save_plan(copy.plan, work_dir)
    log.info("Plan %s of %s saved to %s", copy.plan.digest, copy.where, path)
    # Every change by value, next to the plan: what the approval's plan view reads.
    changes_path = write_changes([copy], path.with_name(f"changes_{copy.plan.digest}_{copy.key}.jsonl"))
    groups = group_copies([copy]).groups()
    return {"key": copy.key, "where": copy.where, "what": copy.rows_named, "plan_path": str(path),
            "digest": copy.plan.digest, "summary": copy.plan.summary(), "changes_path": str(changes_path),
            "value_changes": [group.as_dict() for group in groups[:VALUE_GROUPS_KEPT]],
            "value_change_lines": len(groups)}


# How many of a copy's value changes (the largest) its plan task returns (XCom) for the approval.
VALUE_GROUPS_KEPT = 100


def back_up_plans(
    params: DbParams, combined: dict[str, Any], backup_dir: StoragePath, *, backup_all: bool = False,
    cell_sources: CellSources | None = None,
) -> dict[str, Any]:
    """Back up the rows every copy's saved plan changes, in one backup file; return it and the rows that moved on."""
    with connect(params) as db, open_cells_of(db, sources=cell_sources) as cells:
        saved = [(c, load_plan(c["plan_path"], expected_digest=c["digest"])) for c in combined["copies"]]
        copies = [CopyPlan(c["where"], None if c["key"] == API_DATABASE else c["key"], plan)  # type: ignore[arg-type]
                  for c, plan in saved]
        result = back_up_copies(
            databases_of(db, cells), copies, backup_dir, digest=combined["digest"], scope=saved[0][1].scope,
            cell_names={mapping.uuid: mapping.name for mapping, _ in cells}, backup_all=backup_all,
        )
    return {
        "backup_path": str(result.info.path),
        "records": result.info.record_count,
        "records_by_database": result.info.records_by_database,
        "diverged": result.diverged_by_database,
    }


def apply_range(
    params: DbParams,
    plan_path: str | StoragePath,
    approved_digest: str,
    *,
    first_id: int,
    last_id: int,
    key: str = API_DATABASE,
    cell_sources: CellSources | None = None,
    exclude_ids: Sequence[int] = (),
    batch_size: int,
    verbose: bool = False,
    pace: PaceSettings | None = None,
    replicas: Sequence[DbParams] = (),
    pause_first: bool = False,
) -> dict[str, Any]:
    """Apply the approved plan's rows in [first_id, last_id] of one copy; conflicts are reported, not written.

    ``key``: the copy's database, nova_api or a cell's uuid (opened through nova_api's
    cell_mappings and ``cell_sources``). With ``pace``, batches are sized and
    paced by it, watching ``replicas`` too; ``pause_first`` pauses before the first batch as
    well (every mapped task but the first).
    """
    saved = load_plan(plan_path, expected_digest=approved_digest, first_id=first_id, last_id=last_id)
    pace = pace or PaceSettings.fixed(batch_size)
    with connect(params) as api, open_cells_of(api, sources=cell_sources) as cells, \
            pacers(pace, replicas, pause_first=pause_first) as pacer_for:
        databases = databases_of(api, cells)
        if key not in databases:
            raise ConfigError(f"the plan is of cell {key}, which nova_api's cell_mappings no longer list")
        db, flavors = databases[key], api.load_flavors()
        pacer = pacer_for(db)
        log.info("Pacing: %s", pace.describe(len(replicas)))
        what = "Wrote request specs" if key == API_DATABASE else f"Wrote instance copies of {key}"
        result = apply_saved_plan(
            db, saved, first_id=first_id, last_id=last_id, flavors=flavors, exclude_ids=exclude_ids,
            batch_size=batch_size,
            progress=_progress_lines(what) if verbose else None,  # a log line after every write batch
            pacer=pacer,
        )
        log.info("Paced: %s", pacer.summary())
        conflicts = explain_conflicts(db, saved.scope, result.conflicts, flavors=flavors)
    for line in report.apply_lines(result, conflicts):
        log.info("%s", line)
    return _counts(result)


def verify(
    params: DbParams, plan_path: str | StoragePath, *, cell_sources: CellSources | None = None
) -> dict[str, Any]:
    """Read both copies in the plan's scope again; raise DriftFoundError if drift remains."""
    return fail_on_drift(drift_summary(params, scope_from=plan_path, cell_sources=cell_sources))


def drift_summary(
    params: DbParams, *, scope_from: str | StoragePath | None = None, all_keys: bool = False,
    cell_sources: CellSources | None = None,
) -> dict[str, Any]:
    """The drift check: plan both copies, log every stale instance and the summary; never writes.

    ``to_update``, ``by_flavor`` and ``by_key`` count both copies; ``copies`` has each copy's
    own summary (by where it is: nova_api, each cell); ``disagreeing``: instances stale in one
    copy only.
    """
    with connect(params) as db, open_cells_of(db, sources=cell_sources) as cells:
        if scope_from is not None:
            scope, found = load_plan(scope_from).scope, None  # flavors read again: a verify
        else:
            found, scope = resolve_scope(db, all_keys=all_keys)
        cloud = plan_both_copies(db, cells, scope, flavors=found)
    for line in report.cloud_plan_lines(cloud, verbose=True):
        log.info("%s", line)
    summaries = {copy.where: copy.plan.summary() for copy in cloud.copies}
    return {
        "value_changes": group_lines(group_copies(cloud.copies).groups(), more="the task log"),
        "digest": cloud.digest,
        "to_update": cloud.to_update,
        "disagreeing": cloud.disagreement(sample=0).count,
        "by_flavor": summed(s["by_flavor"] for s in summaries.values()),
        "by_key": summed(s["by_key"] for s in summaries.values()),
        "copies": {where: {k: v for k, v in s.items() if k != "scope"} for where, s in summaries.items()},
    }


def summed(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for part in counts:
        total.update(part)
    return dict(sorted(total.items()))


def fail_on_drift(summary: dict[str, Any]) -> dict[str, Any]:
    """Raise DriftFoundError (the task fails) when the summary counts stale flavor copies."""
    if summary["to_update"]:
        per_copy = ", ".join(f"{where}={s['to_update']}" for where, s in summary["copies"].items())
        raise DriftFoundError(
            f"{summary['to_update']} flavor copies are out of sync with their flavors ({per_copy}; "
            f"{summary['disagreeing']} instances whose two copies disagree; by flavor: {summary['by_flavor']}; "
            f"by key: {summary['by_key']})"
        )
    return summary


def restore_backup(
    params: DbParams, backup_path: str | StoragePath, *, run: bool, force: bool = False, batch_size: int = 500,
    pace: PaceSettings | None = None, replicas: Sequence[DbParams] = (), cell_sources: CellSources | None = None,
) -> dict[str, Any]:
    """Check a backup and restore it (``run``) or say what it would restore, in every database it names.

    With ``pace``, the writes are sized and paced as a sync's are (``pacers``), watching ``replicas`` too.
    """
    with connect(params) as db, open_cells_of(db, sources=cell_sources) as cells, \
            pacers(pace or PaceSettings.fixed(batch_size), replicas) as pacer_for:
        result = restore(db, as_path(backup_path), cells=cells, run=run, force=force, batch_size=batch_size,
                         pacer_for=pacer_for)
    for line in report.restore_lines(result, verbose=True):
        log.info("%s", line)
    if run and (result.errors or result.not_verified):
        raise NovaFlavorSyncError(
            f"restore incomplete: {len(result.errors)} errors, {len(result.not_verified)} rows read back different"
        )
    return {
        "backup_path": str(backup_path),
        "restored" if run else "would_restore": len(result.restored),
        "by_database": {result.backup.where(key): n for key, n in result.restored_by_database.items()},
        "skipped": len(result.skipped),
        "errors": len(result.errors),
        "plan_digest": result.backup.plan_digest,
    }


def backup_listing(backup_dir: StoragePath) -> list[dict[str, Any]]:
    """The backups in a directory, for the UI listing."""
    rows = []
    for entry in list_backups(backup_dir):
        if isinstance(entry, tuple):
            rows.append({"file": entry[0].name, "problem": entry[1]})
        else:
            rows.append({
                "file": entry.path.name, "path": str(entry.path), "records": entry.record_count,
                "created_at": entry.created_at, "plan_digest": entry.plan_digest,
                "schema": entry.database.get("schema"),
                "records_by_copy": {entry.where(key): n for key, n in entry.records_by_database.items()},
            })
    return rows


def _progress_lines(what: str) -> Callable[[ApplyResult, int], None]:
    lines = Progress(what, every=1)
    return lambda result, total: lines.update(result.done, total)


def _counts(result: ApplyResult) -> dict[str, Any]:
    return {
        "updated": len(result.updated),
        "already": len(result.already),
        "conflicts": len(result.conflicts),
        "gone": len(result.gone),
        "errors": len(result.errors),
        "retries": result.retries,
    }
