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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nova_flavor_sync import report, service
from nova_flavor_sync.apply import ApplyResult
from nova_flavor_sync.backup import list_backups
from nova_flavor_sync.dburl import DbParams
from nova_flavor_sync.errors import ExitCode, NovaFlavorSyncError
from nova_flavor_sync.plan import Plan
from nova_flavor_sync.plan_file import load_plan, load_plan_ids, save_plan
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
DEFAULT_DATA_DIR = "~/.nova-flavor-fixes"


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


# Said by the DAGs until they write the instances' own copies too (the CLI does).
INSTANCE_COPIES_NOT_WRITTEN = (
    "Instance copies (instance_extra.flavor in the cells) are reported, not yet written by the DAGs: this run "
    "writes the RequestSpecs (the command line writes both copies)"
)


class DriftFoundError(NovaFlavorSyncError):
    """Verify found RequestSpecs still out of sync in scope: fails the task."""


def check_database(params: DbParams, *, template_url: str | None = None) -> dict[str, Any]:
    """Connect, check the schema, open and check every cell; return the server identity.

    ``template_url``: Nova's [database] connection, which cell URL templates are filled from.
    """
    with service.connect(params) as db, service.open_cells_of(db, template_url=template_url) as cells:
        identity = db.server_identity()
    log.info("Connected to %s: nova_api schema checked; %d cells opened and checked", params.safe_url(), len(cells))
    return identity


def plan_to_file(
    params: DbParams,
    work_dir: Path,
    *,
    flavors: Sequence[str] = (),
    instances: Sequence[str] = (),
    key_prefixes: Sequence[str] = (),
    all_keys: bool = False,
    template_url: str | None = None,
) -> dict[str, Any]:
    """Plan, log every changed instance and its key changes, save the plan to a file.

    Every cell is opened: the RequestSpecs of instances to leave alone (busy, deleted, being
    built, in cell0) are not planned, and each cell's instance copies are reported.
    """
    with service.connect(params) as db, service.open_cells_of(db, template_url=template_url) as cells:
        found, scope = service.resolve_scope(
            db, flavor_selectors=flavors, instance_uuids=instances, key_prefixes=key_prefixes, all_keys=all_keys
        )
        reading = Progress("Read request specs", every=PROGRESS_EVERY)
        both = service.plan_both_copies(db, cells, scope, flavors=found, progress=reading.update)
    plan = both.copies[0].plan
    lines = report.plan_lines(plan, verbose=True) + report.summary_lines(plan) + report.both_copies_lines(both)[1:-2]
    for line in lines + [INSTANCE_COPIES_NOT_WRITTEN]:
        log.info("%s", line)
    path = save_plan(plan, work_dir)
    log.info("Plan %s saved to %s", plan.digest, path)
    return {"plan_path": str(path), "summary": plan.summary(), "approval_body": approval_body(plan)}


def back_up_plan(params: DbParams, plan_path: str, backup_dir: Path, *, backup_all: bool = False) -> dict[str, Any]:
    """Back up the rows the saved plan changes; return the file and the rows that moved on."""
    saved = load_plan(Path(plan_path))
    with service.connect(params) as db:
        result = service.back_up(db, saved, backup_dir, backup_all=backup_all)
    return {
        "backup_path": str(result.info.path),
        "records": result.info.record_count,
        "diverged": result.diverged,
    }


def apply_ranges(plan_path: str, batch_size: int, *, auto_tune: bool = False) -> list[dict[str, Any]]:
    """Split the plan's rows into id ranges, one per mapped apply task (at most MAX_APPLY_TASKS).

    A task gets ``batch_size`` rows, or, when its batches are auto-tuned, as many as the
    largest batch may hold: the tuning happens within a task and needs room to grow.
    """
    ids = load_plan_ids(Path(plan_path))
    per_task = max(MAX_BATCH_SIZE if auto_tune else batch_size, math.ceil(len(ids) / MAX_APPLY_TASKS))
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
    exclude_ids: Sequence[int] = (),
    batch_size: int,
    verbose: bool = False,
    pace: PaceSettings | None = None,
    replicas: Sequence[DbParams] = (),
    pause_first: bool = False,
) -> dict[str, Any]:
    """Apply the approved plan's rows in [first_id, last_id]; conflicts are reported, not written.

    With ``pace``, batches are sized and paced by it, watching ``replicas`` too;
    ``pause_first`` pauses before the first batch as well (every mapped task but the first).
    """
    saved = load_plan(Path(plan_path), expected_digest=approved_digest, first_id=first_id, last_id=last_id)
    pace = pace or PaceSettings(batch_size=batch_size, target_batch_s=None, max_threads_running=None,
                                max_replica_lag_s=None, pause_on_flow_control=False)
    with service.connect(params) as db, service.pacing(db, pace, replicas, pause_first=pause_first) as pacer:
        log.info("Pacing: %s", pace.describe(len(replicas)))
        result = service.apply_saved_plan(
            db, saved, first_id=first_id, last_id=last_id, exclude_ids=exclude_ids, batch_size=batch_size,
            # a log line after every write batch
            progress=_progress_lines("Wrote request specs") if verbose else None,
            pacer=pacer,
        )
        log.info("Paced: %s", pacer.summary())
        conflicts = service.explain_conflicts(db, saved.scope, result.conflicts)
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


def verify(params: DbParams, plan_path: str, *, template_url: str | None = None) -> dict[str, Any]:
    """Read everything in the plan's scope again; raise DriftFoundError if drift remains."""
    return fail_on_drift(drift_summary(params, scope_from=plan_path, template_url=template_url))


def drift_summary(
    params: DbParams, *, scope_from: str | None = None, all_keys: bool = False, template_url: str | None = None
) -> dict[str, Any]:
    """The drift check: plan and log every stale instance and the summary; never writes.

    The summary is the RequestSpecs'; ``instance_copies`` adds each cell's stale instance copies.
    """
    with service.connect(params) as db, service.open_cells_of(db, template_url=template_url) as cells:
        if scope_from is not None:
            scope, found = load_plan(Path(scope_from)).scope, None  # flavors read again: a verify
        else:
            found, scope = service.resolve_scope(db, all_keys=all_keys)
        both = service.plan_both_copies(db, cells, scope, flavors=found)
    plan = both.copies[0].plan
    lines = report.plan_lines(plan, verbose=True) + report.summary_lines(plan) + report.both_copies_lines(both)[1:-2]
    for line in lines:
        log.info("%s", line)
    return {**plan.summary(), "instance_copies": {c.where: len(c.plan.changes) for c in both.copies[1:]}}


def fail_on_drift(summary: dict[str, Any]) -> dict[str, Any]:
    """Raise DriftFoundError (the task fails) when the summary counts stale RequestSpecs."""
    if summary["to_update"]:
        raise DriftFoundError(
            f"{summary['to_update']} request specs are out of sync with their flavors "
            f"(by flavor: {summary['by_flavor']}; by key: {summary['by_key']})"
        )
    return summary


def restore_backup(
    params: DbParams, backup_path: str, *, run: bool, force: bool = False, batch_size: int = 500
) -> dict[str, Any]:
    """Check a backup and restore it (``run``) or say what it would restore."""
    with service.connect(params) as db:
        result = service.restore(db, Path(backup_path), run=run, force=force, batch_size=batch_size)
    for line in report.restore_lines(result, verbose=True):
        log.info("%s", line)
    if run and (result.errors or result.not_verified):
        raise NovaFlavorSyncError(
            f"restore incomplete: {len(result.errors)} errors, {len(result.not_verified)} rows read back different"
        )
    return {
        "backup_path": backup_path,
        "restored" if run else "would_restore": len(result.restored),
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
        line = f"DRY RUN: {summary['to_update']} RequestSpecs would be rewritten; nothing was written"
    elif not summary["to_update"]:
        outcome, line = "in_sync", "NOTHING TO DO: every RequestSpec in scope is in sync"
    elif backed_up is None:
        outcome, line = "backup_failed", "FAILED: the backup could not be written; nothing was written"
    elif answer is None:
        outcome, line = "not_approved", "FAILED: the approval ended without an answer; nothing was written"
    elif answer["choice"] != "Approve":
        outcome, line = "rejected", f"REJECTED by {answer['by']} at {answer['at']}: nothing was written"
    elif verified is None:
        outcome, line = "failed", (
            f"FAILED: approved by {answer['by']} at {answer['at']}, but applying or verifying failed: "
            f"{counts.get('updated', 0)} rows written; see the failed task's log, then run again"
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


def approval_body(plan: Plan) -> str:
    """Markdown for the approval page: what will change, what is held back, the digest."""
    summary = plan.summary()
    lines = [
        f"**{len(plan.changes)} RequestSpecs will be rewritten** (only their flavor's extra_specs).",
        "",
        f"Plan digest: `{plan.digest}`",
        "",
        "| | |",
        "| --- | --- |",
        f"| read | {plan.rows_read} |",
        f"| to update | {len(plan.changes)} |",
        f"| in sync | {plan.in_sync} |",
        f"| held back (risky keys only) | {len(plan.held_back)} |",
        f"| orphans (flavor deleted or re-created) | {len(plan.orphans)} |",
        f"| unreadable rows | {len(plan.errors)} |",
        f"| left alone (instance busy, deleted or queued for delete) | {len(plan.left_alone)} |",
    ]
    for title, counts in (
        ("To update by flavor", summary["by_flavor"]),
        ("Key changes by key", summary["by_key"]),
        ("Key changes by risk class", summary["by_risk"]),
        ("Held back (placement/topology keys; not written)", summary["held_back_by_key"]),
    ):
        if counts:
            lines += ["", f"**{title}**", ""] + [f"- `{name}`: {count}" for name, count in counts.items()]
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
