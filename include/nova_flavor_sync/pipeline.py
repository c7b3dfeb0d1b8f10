"""One call per Airflow task: each takes plain values, returns a small JSON-ready dict.

The DAGs in ``dags/`` fetch the Airflow Connection, turn it into DbParams
(``airflow_conn``) and call one function here. The plan travels between tasks as a file
in ``work_dir`` (``plan_file``); XCom carries only its path, digest and counts. With more
than one worker (Celery, Kubernetes), ``work_dir`` and the backup directory must be on
storage every worker sees.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nova_flavor_sync import report, service
from nova_flavor_sync.apply import ApplyResult
from nova_flavor_sync.backup import API_DATABASE, HOME_DIR, list_backups
from nova_flavor_sync.cells import CellSources, instances_to_leave_alone
from nova_flavor_sync.dburl import DbParams
from nova_flavor_sync.errors import ConfigError, ExitCode, NovaFlavorSyncError
from nova_flavor_sync.plan import CopyPlan, cloud_digest
from nova_flavor_sync.plan_file import load_plan, load_plan_ids, save_plan
from nova_flavor_sync.policy import RiskClass
from nova_flavor_sync.progress import Progress
from nova_flavor_sync.throttle import (
    DEFAULT_MAX_REPLICA_LAG_S,
    DEFAULT_MAX_THREADS_RUNNING,
    DEFAULT_MAX_WAIT_S,
    DEFAULT_TARGET_BATCH_S,
    MAX_BATCH_SIZE,
    PaceSettings,
)

log = logging.getLogger(__name__)

# Where the DAGs keep plans and backups; shared storage when several workers run tasks.
DATA_DIR_ENV = "NOVA_FLAVOR_SYNC_DIR"
DEFAULT_DATA_DIR = str(HOME_DIR)


def data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


def plans_dir() -> Path:
    return data_dir() / "plans"


def backups_dir() -> Path:
    return data_dir() / "backups"


# The task logs say how far reading has got every this many rows.
PROGRESS_EVERY = 10_000

# Airflow creates at most core.max_map_length (1024 by default) mapped tasks: stay below.
MAX_APPLY_TASKS = 1000

# How many apply_batch tasks of one run may write at once (read when the DAG is parsed).
# 1, the default, is one paced writer. More run disjoint id ranges side by side, on as many
# workers (CeleryExecutor, KubernetesExecutor): no two touch the same row, each paces
# itself, and each sees the others' load in Threads_running.
APPLY_PARALLELISM_ENV = "NOVA_FLAVOR_SYNC_APPLY_PARALLELISM"
MAX_APPLY_PARALLELISM = 32


def apply_parallelism() -> int:
    """``$NOVA_FLAVOR_SYNC_APPLY_PARALLELISM`` (1 to 32, default 1); a bad value fails the DAG's import."""
    raw = os.environ.get(APPLY_PARALLELISM_ENV, "").strip() or "1"
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_APPLY_PARALLELISM:
        raise ValueError(
            f"{APPLY_PARALLELISM_ENV} must be a whole number from 1 to {MAX_APPLY_PARALLELISM}, not {raw!r}"
        )
    return int(raw)


class DriftFoundError(NovaFlavorSyncError):
    """Verify found flavor copies still out of sync in scope: fails the task."""


def check_database(params: DbParams, *, cell_sources: CellSources | None = None) -> list[dict[str, str]]:
    """Connect, check the schema, open and check every cell; return the copies a run plans.

    ``cell_sources``: where the cell databases are beyond cell_mappings (a template's
    filling, a cell's own database); every function here that opens the cells takes it.
    The copies, in the order a run plans them: ``{"key": "nova_api" or the cell uuid, "where": ...}``
    (``service.copy_keys``); cell0 is counted here, never planned.
    """
    with service.connect(params) as db, service.open_cells_of(db, sources=cell_sources) as cells:
        labels = {mapping.uuid: mapping.label for mapping, _ in cells}
        for mapping, cell in cells:
            if mapping.is_cell0:
                log.info("Cell %s: %d instances that never scheduled; counted, never written", mapping.label,
                         cell.instance_counts()["total"])
        keys = service.copy_keys(cells)
    log.info("Connected to %s: nova_api schema checked; %d cells opened and checked", params.safe_url(), len(cells))
    return [{"key": key, "where": labels.get(key, key)} for key in keys]


def plan_copy_to_file(
    params: DbParams,
    work_dir: Path,
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
    with service.connect(params) as db, service.open_cells_of(db, sources=cell_sources) as cells:
        found, scope = service.resolve_scope(
            db, flavor_selectors=flavors, instance_uuids=instances, key_prefixes=key_prefixes, all_keys=all_keys
        )
        left_alone = instances_to_leave_alone(db, {mapping.uuid: cell for mapping, cell in cells})
        reading = Progress(f"Read {key}", every=PROGRESS_EVERY)
        copy = service.plan_copy(db, cells, key, scope, flavors=found, left_alone=left_alone,
                                 progress=reading.update)
    for line in report.plan_lines(copy.plan, verbose=True) + report.summary_lines(copy.plan, what=copy.rows_named):
        log.info("%s", line)
    path = save_plan(copy.plan, work_dir)
    log.info("Plan %s of %s saved to %s", copy.plan.digest, copy.where, path)
    return {"key": copy.key, "where": copy.where, "what": copy.rows_named, "plan_path": str(path),
            "digest": copy.plan.digest, "summary": copy.plan.summary()}


def combine_plans(copies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run's one plan over both copies: its digest (what the approval binds), counts, approval body.

    ``copies``: what ``plan_copy_to_file`` returned for each copy, in plan order (nova_api first).
    """
    copies = sorted(copies, key=lambda c: c["key"] != API_DATABASE)  # mapped results come in map order
    digest = cloud_digest((c["key"], c["digest"]) for c in copies)
    to_update = sum(c["summary"]["to_update"] for c in copies)
    summary = {"digest": digest, "to_update": to_update,
               "copies": {c["where"]: c["summary"]["to_update"] for c in copies}}
    log.info("Both copies: %d to update (%s); plan digest %s", to_update,
             ", ".join(f"{c['where']}={c['summary']['to_update']}" for c in copies), digest)
    return {"digest": digest, "summary": summary, "copies": list(copies),
            "approval_body": approval_body(copies, digest)}


def back_up_plans(
    params: DbParams, combined: dict[str, Any], backup_dir: Path, *, backup_all: bool = False,
    cell_sources: CellSources | None = None,
) -> dict[str, Any]:
    """Back up the rows every copy's saved plan changes, in one backup file; return it and the rows that moved on."""
    with service.connect(params) as db, service.open_cells_of(db, sources=cell_sources) as cells:
        saved = [(c, load_plan(Path(c["plan_path"]), expected_digest=c["digest"])) for c in combined["copies"]]
        copies = [CopyPlan(c["where"], None if c["key"] == API_DATABASE else c["key"], plan)  # type: ignore[arg-type]
                  for c, plan in saved]
        result = service.back_up_copies(
            service.databases_of(db, cells), copies, backup_dir, digest=combined["digest"], scope=saved[0][1].scope,
            cell_names={mapping.uuid: mapping.name for mapping, _ in cells}, backup_all=backup_all,
        )
    return {
        "backup_path": str(result.info.path),
        "records": result.info.record_count,
        "records_by_database": result.info.records_by_database,
        "diverged": result.diverged_by_database,
    }


def copy_ranges(
    combined: dict[str, Any], batch_size: int, *, cells: bool, auto_tune: bool = False
) -> list[dict[str, Any]]:
    """One mapped apply task's worth of work each: an id range of one copy, of the cells
    (``cells``, written first) or of nova_api. Only that group's plan files are read.

    The group stays under MAX_APPLY_TASKS tasks, shared among its copies.
    """
    copies = [c for c in combined["copies"] if (c["key"] != API_DATABASE) == cells]
    budget = max(1, MAX_APPLY_TASKS // max(1, len(copies)))
    return [
        {"key": copy["key"], "where": copy["where"], "plan_path": copy["plan_path"], "digest": copy["digest"],
         **id_range}
        for copy in copies if copy["summary"]["to_update"]
        for id_range in apply_ranges(copy["plan_path"], batch_size, auto_tune=auto_tune, max_tasks=budget)
    ]


def apply_ranges(
    plan_path: str, batch_size: int, *, auto_tune: bool = False, max_tasks: int = MAX_APPLY_TASKS
) -> list[dict[str, Any]]:
    """Split a plan file's rows into id ranges, one per mapped apply task (at most ``max_tasks``).

    A task gets ``batch_size`` rows, or, when its batches are auto-tuned, as many as the
    largest batch may hold: the tuning happens within a task and needs room to grow.
    """
    ids = load_plan_ids(Path(plan_path))
    per_task = max(MAX_BATCH_SIZE if auto_tune else batch_size, math.ceil(len(ids) / max_tasks))
    return [
        {"first_id": chunk[0], "last_id": chunk[-1], "rows": len(chunk)}
        for chunk in (ids[i : i + per_task] for i in range(0, len(ids), per_task))
    ]


def apply_range(
    params: DbParams,
    plan_path: str,
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
    saved = load_plan(Path(plan_path), expected_digest=approved_digest, first_id=first_id, last_id=last_id)
    pace = pace or PaceSettings(batch_size=batch_size, target_batch_s=None, max_threads_running=None,
                                max_replica_lag_s=None, pause_on_flow_control=False)
    with service.connect(params) as api, service.open_cells_of(api, sources=cell_sources) as cells, \
            service.pacers(pace, replicas, pause_first=pause_first) as pacer_for:
        databases = service.databases_of(api, cells)
        if key not in databases:
            raise ConfigError(f"the plan is of cell {key}, which nova_api's cell_mappings no longer list")
        db, flavors = databases[key], api.load_flavors()
        pacer = pacer_for(db)
        log.info("Pacing: %s", pace.describe(len(replicas)))
        what = "Wrote request specs" if key == API_DATABASE else f"Wrote instance copies of {key}"
        result = service.apply_saved_plan(
            db, saved, first_id=first_id, last_id=last_id, flavors=flavors, exclude_ids=exclude_ids,
            batch_size=batch_size,
            progress=_progress_lines(what) if verbose else None,  # a log line after every write batch
            pacer=pacer,
        )
        log.info("Paced: %s", pacer.summary())
        conflicts = service.explain_conflicts(db, saved.scope, result.conflicts, flavors=flavors)
    for line in report.apply_lines(result, conflicts):
        log.info("%s", line)
    return _counts(result)


def pace_settings(params: Mapping[str, Any]) -> PaceSettings:
    """PaceSettings from the nova_flavor_sync DAG's params (UsageError, failing the task, if unusable).

    ``batch_seconds`` 0 keeps ``batch_size`` fixed; ``max_threads_running`` 0 does not check it.
    """
    target = params.get("batch_seconds", DEFAULT_TARGET_BATCH_S)
    threads = params.get("max_threads_running", DEFAULT_MAX_THREADS_RUNNING)
    return PaceSettings(
        batch_size=params["batch_size"],
        target_batch_s=target or None,
        pause_s=params.get("pause_seconds", 0.0),
        max_threads_running=threads or None,
        max_replica_lag_s=params.get("max_replica_lag", DEFAULT_MAX_REPLICA_LAG_S),
        pause_on_flow_control=params.get("flow_control_pause", True),
        max_wait_s=params.get("max_load_wait", DEFAULT_MAX_WAIT_S),
    )


def verify(params: DbParams, plan_path: str, *, cell_sources: CellSources | None = None) -> dict[str, Any]:
    """Read both copies in the plan's scope again; raise DriftFoundError if drift remains."""
    return fail_on_drift(drift_summary(params, scope_from=plan_path, cell_sources=cell_sources))


def drift_summary(
    params: DbParams, *, scope_from: str | None = None, all_keys: bool = False, cell_sources: CellSources | None = None
) -> dict[str, Any]:
    """The drift check: plan both copies, log every stale instance and the summary; never writes.

    ``to_update``, ``by_flavor`` and ``by_key`` count both copies; ``copies`` has each copy's
    own summary (by where it is: nova_api, each cell); ``disagreeing``: instances stale in one
    copy only.
    """
    with service.connect(params) as db, service.open_cells_of(db, sources=cell_sources) as cells:
        if scope_from is not None:
            scope, found = load_plan(Path(scope_from)).scope, None  # flavors read again: a verify
        else:
            found, scope = service.resolve_scope(db, all_keys=all_keys)
        cloud = service.plan_both_copies(db, cells, scope, flavors=found)
    for line in report.cloud_plan_lines(cloud, verbose=True):
        log.info("%s", line)
    summaries = {copy.where: copy.plan.summary() for copy in cloud.copies}
    return {
        "digest": cloud.digest,
        "to_update": cloud.to_update,
        "disagreeing": len(cloud.disagreeing_instances()),
        "by_flavor": _summed(s["by_flavor"] for s in summaries.values()),
        "by_key": _summed(s["by_key"] for s in summaries.values()),
        "copies": {where: {k: v for k, v in s.items() if k != "scope"} for where, s in summaries.items()},
    }


def _summed(counts: Iterable[dict[str, int]]) -> dict[str, int]:
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
    params: DbParams, backup_path: str, *, run: bool, force: bool = False, batch_size: int = 500,
    cell_sources: CellSources | None = None,
) -> dict[str, Any]:
    """Check a backup and restore it (``run``) or say what it would restore, in every database it names."""
    with service.connect(params) as db, service.open_cells_of(db, sources=cell_sources) as cells:
        result = service.restore(db, Path(backup_path), cells=cells, run=run, force=force, batch_size=batch_size)
    for line in report.restore_lines(result, verbose=True):
        log.info("%s", line)
    if run and (result.errors or result.not_verified):
        raise NovaFlavorSyncError(
            f"restore incomplete: {len(result.errors)} errors, {len(result.not_verified)} rows read back different"
        )
    return {
        "backup_path": backup_path,
        "restored" if run else "would_restore": len(result.restored),
        "by_database": {result.backup.where(key): n for key, n in result.restored_by_database.items()},
        "skipped": len(result.skipped),
        "errors": len(result.errors),
        "plan_digest": result.backup.plan_digest,
    }


def backups(backup_dir: Path) -> list[dict[str, Any]]:
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


class SyncFailedError(NovaFlavorSyncError):
    """A sync run whose planning, backup, approval, writes or verify failed: fails the run."""

    exit_code = ExitCode.INCOMPLETE


# The outcomes of a nova_flavor_sync run that leave it green; any other fails the run.
SUCCESSFUL_OUTCOMES = frozenset({"dry_run", "in_sync", "rejected", "applied"})


def sync_outcome(
    plan: dict[str, Any] | None,
    *,
    dry_run: bool,
    backed_up: dict[str, Any] | None,
    answer: dict[str, Any] | None,
    applied: Sequence[dict[str, Any]] | dict[str, Any] | None,
    verified: dict[str, Any] | None,
) -> dict[str, Any]:
    """What a nova_flavor_sync run did, in one unmistakable line (logged, returned).

    The arguments are what the run's tasks returned (None: the task failed or never ran).
    Raises SyncFailedError, after logging the line, unless the run planned only, found
    nothing to do, was rejected, or applied the plan and verify found no drift: Airflow
    judges a run by its last task, and this is it, so a failed write never ends green.
    ``applied`` is what the mapped apply tasks returned: Airflow's xcom_pull gives a list,
    or the value itself when the plan needed a single task.
    """
    counts: dict[str, int] = {}
    if isinstance(applied, dict):
        applied = [applied]
    for result in applied or ():
        for key, value in result.items():
            counts[key] = counts.get(key, 0) + value
    summary = plan["summary"] if plan else {"to_update": 0, "digest": None}
    if plan is None:
        outcome, line = "plan_failed", "FAILED: checking the database or planning failed; nothing was written"
    elif dry_run:
        outcome = "dry_run"
        line = f"DRY RUN: {summary['to_update']} flavor copies would be rewritten; nothing was written"
    elif not summary["to_update"]:
        outcome, line = "in_sync", "NOTHING TO DO: both copies of every instance in scope are in sync"
    elif backed_up is None:
        outcome, line = "backup_failed", "FAILED: the backup could not be written; nothing was written"
    elif answer is None:
        outcome, line = "not_approved", "FAILED: the approval ended without an answer; nothing was written"
    elif answer["choice"] != "Approve":
        outcome, line = "rejected", f"REJECTED by {answer['by']} at {answer['at']}: nothing was written"
    elif verified is None:
        outcome, line = "failed", (
            f"FAILED: approved by {answer['by']} at {answer['at']}, but applying or verifying failed: "
            f"{counts.get('updated', 0)} flavor copies written; see the failed task's log, then run again "
            "(a run that stopped between an instance's two copies leaves them disagreeing: a rerun heals them)"
        )
    else:
        outcome, line = "applied", (
            f"APPLIED plan {summary['digest']} approved by {answer['by']} at {answer['at']}: "
            f"{counts.get('updated', 0)} rewritten, {counts.get('already', 0)} already done, "
            f"{counts.get('conflicts', 0)} conflicts, {counts.get('errors', 0)} errors; verify found no drift"
        )
    log.info("%s", line)
    if outcome not in SUCCESSFUL_OUTCOMES:
        raise SyncFailedError(line)
    return {"outcome": outcome, "message": line, "digest": summary["digest"], **counts}


def approval_body(copies: Sequence[dict[str, Any]], digest: str) -> str:
    """Markdown for the approval page: what will change in each copy, what is left, the digest.

    ``copies``: each copy's plan_copy_to_file result (its ``where`` and ``summary``).
    """
    summaries = [c["summary"] for c in copies]
    total = sum(s["to_update"] for s in summaries)
    api = sum(s["to_update"] for c, s in zip(copies, summaries, strict=True) if c["key"] == API_DATABASE)
    rows = [
        ("read", "rows_read"), ("to update", "to_update"), ("in sync", "in_sync"),
        ("held back (risky keys only)", "held_back_only"), ("orphans (flavor deleted or re-created)", "orphans"),
        ("unreadable rows", "errors"), ("left alone (instance busy, deleted or queued for delete)", "left_alone"),
    ]
    lines = [
        f"**{total} flavor copies will be rewritten**: {api} RequestSpecs and {total - api} instance copies "
        "(only their flavor's extra_specs). The instance copies in each cell are written first, then the "
        "RequestSpecs.",
        "",
        f"Plan digest: `{digest}`",
        "",
        "| | " + " | ".join(c["where"] for c in copies) + " |",
        "| --- |" + " --- |" * len(copies),
    ]
    lines += [f"| {label} | " + " | ".join(str(s[key]) for s in summaries) + " |" for label, key in rows]
    for title, key in (
        ("To update by flavor (both copies)", "by_flavor"),
        ("Key changes by key (both copies)", "by_key"),
        ("Key changes by risk class (both copies)", "by_risk"),
        ("Held back (placement/topology keys; not written)", "held_back_by_key"),
    ):
        counts = _summed(s[key] for s in summaries)
        if counts:
            lines += ["", f"**{title}**", ""] + [f"- `{name}`: {count}" for name, count in counts.items()]
    if any(c["key"] != API_DATABASE and c["summary"]["by_risk"].get(RiskClass.GUEST.value) for c in copies):
        lines += ["", report.GUEST_KEYS_TAKE_EFFECT + "."]
    lines += ["", "Approve writes these rows in compare-and-swap batches; Reject writes nothing."]
    return "\n".join(lines)


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
