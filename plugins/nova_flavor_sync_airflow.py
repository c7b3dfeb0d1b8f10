"""What only Airflow needs, in one place: everything the DAGs share that the engine does not.

- the database hook: the ``nova_api_db`` Connection as the engine's DbParams (UI,
  ``AIRFLOW_CONN_NOVA_API_DB`` as JSON or URI, or a secrets backend: Airflow looks it up),
  and the params that name Connections and pace writes;
- where the plans and backups live (``$NOVA_FLAVOR_SYNC_STORAGE``, a URL of any storage
  Airflow's ObjectStoragePath reaches, or the directory ``$NOVA_FLAVOR_SYNC_DIR``), shared
  by every worker;
- how a plan becomes mapped apply tasks (id ranges, the mapped-task limit, parallelism);
- the run's one digest over both copies, its approval body, and its outcome;
- an approval that records who answered, when and what, even on Reject, when Airflow's
  ApprovalOperator skips downstream tasks without writing any XCom.

The engine (``nova_flavor_sync``) imports nothing from here.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import BaseHook, ObjectStoragePath, Param
from airflow.sdk.exceptions import AirflowNotFoundException

from nova_flavor_sync import report
from nova_flavor_sync.airflow_conn import DEFAULT_CONN_ID, DEFAULT_DATABASE_CONN_ID, params_from_connection
from nova_flavor_sync.backup import API_DATABASE, HOME_DIR
from nova_flavor_sync.cells import CellSources
from nova_flavor_sync.dburl import DbParams
from nova_flavor_sync.errors import ConfigError, ExitCode, NovaFlavorSyncError
from nova_flavor_sync.plan import cloud_digest
from nova_flavor_sync.plan_file import load_plan_ids
from nova_flavor_sync.policy import RiskClass
from nova_flavor_sync.service import summed
from nova_flavor_sync.storage import StoragePath, as_path
from nova_flavor_sync.throttle import (  # one source for every pacing default and limit
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_REPLICA_LAG_S,
    DEFAULT_MAX_THREADS_RUNNING,
    DEFAULT_MAX_WAIT_S,
    DEFAULT_TARGET_BATCH_S,
    MAX_BATCH_SIZE,
    MAX_PAUSE_S,
    MAX_REPLICA_LAG_S,
    MAX_TARGET_BATCH_S,
    MAX_WAIT_S,
    PaceSettings,
)
from nova_flavor_sync.value_changes import (
    LINES_SHOWN,
    ValueChanges,
    ValueGroup,
    group_lines,
    markdown_text,
    short_where,
)

log = logging.getLogger(__name__)


class NovaApiDbHook(BaseHook):
    """The nova_api database of a Connection of type mysql, opened by the engine with PyMySQL."""

    conn_name_attr = "conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = "mysql"
    hook_name = "Nova API database (nova-flavor-sync)"

    def __init__(self, conn_id: str = DEFAULT_CONN_ID) -> None:
        super().__init__()
        self.conn_id = conn_id

    def get_db_params(self) -> DbParams:
        return params_from_connection(self.get_connection(self.conn_id))


def conn_id_param() -> Param:
    """The ``conn_id`` param every DAG takes: which Connection holds the nova_api database."""
    return Param(DEFAULT_CONN_ID, type="string", minLength=1, description="Airflow Connection (type mysql)")


def db_params(params: dict[str, Any]) -> DbParams:
    """The database of a run's ``conn_id`` param; call it inside a task, never at parse time."""
    return NovaApiDbHook(params["conn_id"]).get_db_params()


def database_conn_id_param() -> Param:
    """The ``database_conn_id`` param: which Connection holds Nova's [database] connection."""
    return Param(DEFAULT_DATABASE_CONN_ID, type="string", minLength=1,
                 description="Connection holding Nova's [database] connection (cell URL templates are filled "
                 "from it); optional")


def cell_template_url(params: dict[str, Any]) -> str | None:
    """Nova's [database] connection from the run's ``database_conn_id`` Connection, if there is one.

    The URL carries the password: it is handed to the engine, which fills templates with it
    and never logs it. It always has the ``user:password@`` form, so an empty password stays
    empty (Nova fills ``user@host`` with the password text ``None``). Call it inside a task,
    never at parse time.
    """
    try:
        conn = BaseHook.get_connection(params["database_conn_id"])
    except AirflowNotFoundException:
        return None
    db = params_from_connection(conn)
    host = f"[{db.host}]" if ":" in db.host else db.host
    return (f"mysql+pymysql://{quote(db.user, safe='')}:{quote(db.password or '', safe='')}@{host}:{db.port}/"
            f"{quote(db.database, safe='')}")


def cell_conn_ids_param() -> Param:
    """The ``cell_conn_ids`` param: a cell's own Connection, by cell name or uuid (optional)."""
    return Param({}, type="object", additionalProperties={"type": "string", "minLength": 1},
                 description="A cell's database as a Connection (type mysql), by cell name or uuid, e.g. "
                 '{"cell1": "nova_cell1_db"}; wins over its cell_mappings URL. Empty: cell_mappings, '
                 "templates filled from database_conn_id")


def cell_sources(params: dict[str, Any]) -> CellSources:
    """Where a run's cell databases are: the template filling (``database_conn_id``) and each
    cell's own Connection (``cell_conn_ids``). Call it inside a task, never at parse time."""
    return CellSources(
        template_url=cell_template_url(params),
        cell_urls={cell: NovaApiDbHook(conn_id).get_db_params()
                   for cell, conn_id in (params.get("cell_conn_ids") or {}).items()},
    )


def pacing_params() -> dict[str, Param]:
    """The params that pace writes (the sync's and the restore's), their defaults and limits from ``throttle``."""
    return {
        "batch_size": Param(DEFAULT_BATCH_SIZE, type="integer", minimum=1, maximum=MAX_BATCH_SIZE,
                            description="Rows per write transaction (the first one, when batch_seconds is set)"),
        "batch_seconds": Param(DEFAULT_TARGET_BATCH_S, type="number", minimum=0, maximum=MAX_TARGET_BATCH_S,
                               description="Size the batches so each takes about this long; 0 = fixed batch_size"),
        "pause_seconds": Param(0, type="number", minimum=0, maximum=MAX_PAUSE_S,
                               description="Sleep between two batches"),
        "max_threads_running": Param(DEFAULT_MAX_THREADS_RUNNING, type="integer", minimum=0, maximum=1_000_000,
                                     description="Wait while the server's Threads_running is above this; 0 = off"),
        "replica_conn_ids": Param([], type="array", items={"type": "string", "minLength": 1},
                                  description="Connections (type mysql) of replicas to watch"),
        "max_replica_lag": Param(DEFAULT_MAX_REPLICA_LAG_S, type="number", minimum=0, maximum=MAX_REPLICA_LAG_S,
                                 description="Wait while a replica is more seconds behind than this"),
        "flow_control_pause": Param(True, type="boolean", description="Wait while Galera flow control is active"),
        "max_load_wait": Param(DEFAULT_MAX_WAIT_S, type="number", minimum=1, maximum=MAX_WAIT_S,
                               description="Fail the batch if the server stays loaded longer than this (seconds)"),
    }


def replica_params(params: dict[str, Any]) -> list[DbParams]:
    """The replicas a run's writes watch (``replica_conn_ids``); call it inside a task."""
    return [NovaApiDbHook(conn_id).get_db_params() for conn_id in params.get("replica_conn_ids") or ()]


# Where the DAGs keep plans and backups; shared storage when several workers run tasks.
DATA_DIR_ENV = "NOVA_FLAVOR_SYNC_DIR"


DEFAULT_DATA_DIR = str(HOME_DIR)


# Or a URL of object storage, which wins: s3://<conn_id>@bucket/prefix (the Amazon provider
# with that Connection), gs://, abfs://... (see storage and the README). Unset: the directory.
STORAGE_ENV = "NOVA_FLAVOR_SYNC_STORAGE"


def data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


def storage_root() -> StoragePath:
    """``$NOVA_FLAVOR_SYNC_STORAGE``, else ``$NOVA_FLAVOR_SYNC_DIR`` (default ``~/.nova-flavor-fixes``).

    A Connection the URL names must exist: without it Airflow would go on with no credentials.
    """
    root = stored(os.environ.get(STORAGE_ENV, "").strip() or str(data_dir()))
    conn_id = getattr(root, "conn_id", None)
    if conn_id:
        try:
            BaseHook.get_connection(conn_id)
        except AirflowNotFoundException:
            raise ConfigError(f"{STORAGE_ENV}={root} names the Airflow Connection {conn_id!r}, which does not "
                              "exist: create it (type aws for s3://) or fix the URL") from None
    return root


def stored(location: str | StoragePath) -> StoragePath:
    """A plan's or backup's location (a local path, or a URL as ``str()`` of an ObjectStoragePath
    gives it, with its ``conn_id@``) as the path object the engine reads and writes."""
    return as_path(location, remote=ObjectStoragePath)


def stored_plans(combined: dict[str, Any]) -> dict[str, Any]:
    """``combine_plans``' result with each copy's ``plan_path`` as a path object (``stored``)."""
    return {**combined, "copies": [{**copy, "plan_path": stored(copy["plan_path"])} for copy in combined["copies"]]}


def plans_dir() -> StoragePath:
    return storage_root() / "plans"


def backups_dir() -> StoragePath:
    return storage_root() / "backups"


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


def combine_plans(copies: Sequence[dict[str, Any]], run_id: str = "") -> dict[str, Any]:
    """The run's one plan over both copies: its digest (what the approval binds), counts, approval body.

    ``copies``: what ``plan_copy_to_file`` returned for each copy, in plan order (nova_api first);
    ``run_id``: the run's, for the approval body's link to its plan view.
    """
    copies = sorted(copies, key=lambda c: c["key"] != API_DATABASE)  # mapped results come in map order
    digest = cloud_digest((c["key"], c["digest"]) for c in copies)
    to_update = sum(c["summary"]["to_update"] for c in copies)
    summary = {"digest": digest, "to_update": to_update,
               "copies": {c["where"]: c["summary"]["to_update"] for c in copies}}
    log.info("Both copies: %d to update (%s); plan digest %s", to_update,
             ", ".join(f"{c['where']}={c['summary']['to_update']}" for c in copies), digest)
    value_changes = merged_value_changes(copies)
    return {"digest": digest, "summary": summary, "copies": list(copies),
            "value_changes": group_lines(value_changes.groups(), more=plan_view_path(run_id)),
            "approval_body": approval_body(copies, digest, run_id)}


# The plan view of a run (plugins/nova_flavor_sync_plan_view.py), relative to the UI's base URL.
PLAN_VIEW = "nova-flavor-sync/plans/{run_id}"


def plan_view_path(run_id: str) -> str:
    return "/" + PLAN_VIEW.format(run_id=quote(run_id, safe=""))


def merged_value_changes(copies: Sequence[dict[str, Any]]) -> ValueChanges:
    """Every copy's value changes (the largest ones its plan task kept: service.VALUE_GROUPS_KEPT), merged."""
    merged = ValueChanges()
    for copy in copies:
        for raw in copy.get("value_changes") or ():
            merged.add_group(ValueGroup.from_dict(raw))
    return merged


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
    ids = load_plan_ids(stored(plan_path))
    per_task = max(MAX_BATCH_SIZE if auto_tune else batch_size, math.ceil(len(ids) / max_tasks))
    return [
        {"first_id": chunk[0], "last_id": chunk[-1], "rows": len(chunk)}
        for chunk in (ids[i : i + per_task] for i in range(0, len(ids), per_task))
    ]


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
    elif answer is None:  # approve failed or was marked by hand (a timeout answers with its default)
        outcome, line = "not_approved", (
            "FAILED: the approve task ended without passing on an answer (see its log); nothing was written")
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
    value_changes = (plan or {}).get("value_changes") or []
    if value_changes:
        log.info("The plan's changes by value (flavor: key old -> new [risk class]: flavor copies (per copy)):")
        for change in value_changes:
            log.info("  %s", change)
    if outcome not in SUCCESSFUL_OUTCOMES:
        raise SyncFailedError(line)
    return {"outcome": outcome, "message": line, "digest": summary["digest"], **counts,
            "value_changes": value_changes}


def approval_body(copies: Sequence[dict[str, Any]], digest: str, run_id: str = "") -> str:
    """Markdown for the approval page: what will change in each copy, by value, what is left, the digest.

    ``copies``: each copy's plan_copy_to_file result (its ``where``, ``summary`` and ``value_changes``);
    ``run_id``: the run, whose plan view the body links to.
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
    lines += value_changes_markdown(copies, run_id)
    for title, key in (
        ("To update by flavor (both copies)", "by_flavor"),
        ("Key changes by key (both copies)", "by_key"),
        ("Key changes by risk class (both copies)", "by_risk"),
        ("Held back (placement/topology keys; not written)", "held_back_by_key"),
    ):
        counts = summed(s[key] for s in summaries)
        if counts:
            lines += ["", f"**{title}**", ""] + [f"- `{name}`: {count}" for name, count in counts.items()]
    if any(c["key"] != API_DATABASE and c["summary"]["by_risk"].get(RiskClass.GUEST.value) for c in copies):
        lines += ["", markdown_text(report.GUEST_KEYS_TAKE_EFFECT + ".")]  # quota:* is no emphasis
    lines += ["", "Approve writes these rows in compare-and-swap batches; Reject writes nothing."]
    return "\n".join(lines)


def value_changes_markdown(copies: Sequence[dict[str, Any]], run_id: str) -> list[str]:
    """The approval body's table of value changes: a row per (flavor, key, old -> new), the largest
    LINES_SHOWN, a column of flavor copies per copy, every value escaped; and the link to the plan view."""
    groups = merged_value_changes(copies).groups()
    link = f"[the plan view]({PLAN_VIEW.format(run_id=quote(run_id, safe=''))})" if run_id else "the plan view"
    if not groups:
        return []
    shown = groups[:LINES_SHOWN]
    # A copy with more lines than its task kept: the merged lines are not all there is.
    cut = any(c.get("value_change_lines", 0) > len(c.get("value_changes") or ()) for c in copies)
    wheres = [c["where"] for c in copies]
    lines = ["", f"**What changes, by value** (every line, and the instances behind each: {link})", "",
             "| flavor | key | old -> new | risk class | " + " | ".join(markdown_text(short_where(w)) for w in wheres)
             + " |", "| --- | --- | --- | --- |" + " ---: |" * len(wheres)]
    for group in shown:
        change = group.change
        risk = change.risk + (" (held back: not written)" if change.held_back else "")
        cells = [change.flavor, change.key, change.shown(), risk]
        lines.append("| " + " | ".join(markdown_text(cell) for cell in cells) + " | "
                     + " | ".join(str(group.counts.get(where, 0)) for where in wheres) + " |")
    if cut or len(groups) > len(shown):
        lines += ["", f"... and {'at least ' if cut else ''}{len(groups) - len(shown)} more lines: see {link}."]
    return lines


class RecordedApprovalOperator(ApprovalOperator):
    """ApprovalOperator that logs the answer and pushes it as XCom ``answer`` before acting on it."""

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        if "error" not in event:
            user = event.get("responded_by_user") or {}
            answer = {
                "choice": (event.get("chosen_options") or ["?"])[0],
                "by": user.get("name") or user.get("id") or "nobody: the response timeout chose the default",
                "at": str(event.get("responded_at")),
                "subject": self.subject,
            }
            self.log.info("Answer: %(choice)s by %(by)s at %(at)s for: %(subject)s", answer)
            context["ti"].xcom_push(key="answer", value=answer)
        return super().execute_complete(context, event)
