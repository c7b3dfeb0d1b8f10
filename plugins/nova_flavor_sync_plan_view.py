"""The plan view: what a ``nova_flavor_sync`` run would write, by value, for the approver to read.

``GET /nova-flavor-sync/plans/<run id>`` on Airflow's API server (mounted by the backups
plugin's app, ``nova_flavor_sync_backups``, with the same authentication; the user must be
allowed to read the ``nova_flavor_sync`` DAG):

- the run's plan digest and, per copy (nova_api's RequestSpecs, each cell's instance copies),
  what is read, to update, in sync, held back, orphaned, left alone and unreadable;
- every line of the plan by value (flavor, key, ``old -> new``, risk class, flavor copies per
  copy), as ``value_changes`` groups them, held-back keys last;
- ``?line=N&page=P``: the flavor copies behind line N (instance, copy, row), a page at a time;
- the rows never written, with their reasons: orphans, left alone, unreadable
  (``?rows=orphan|left_alone|error&page=P`` for all of them).

What it reads: the run's ``combine_plans`` XCom, through Airflow's own models (each copy's
changes file, which its ``make_plan`` task wrote next to its plan file, and its counts), then
those files, streaming: the plan's lines and first untouched rows once while the files stay
as they are (``plan_summary``), a line's or a kind's rows on each request for them. As for
the backups page, the API server must see
``$NOVA_FLAVOR_SYNC_DIR`` (or ``$NOVA_FLAVOR_SYNC_STORAGE``) as the workers do; a file outside
its ``plans`` directory is never read.
Rendered by Jinja2 with autoescaping (``templates/nova_flavor_sync_plan_view.html``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import jinja2
from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import HTMLResponse
from nova_flavor_sync_airflow import plans_dir, stored

from nova_flavor_sync.errors import BackupError
from nova_flavor_sync.storage import StoragePath, local_path
from nova_flavor_sync.value_changes import (
    ERROR,
    LEFT_ALONE,
    ORPHAN,
    ValueGroup,
    group_records,
    read_changes,
    record_change,
    short_where,
)

SYNC_DAG_ID = "nova_flavor_sync"
PAGE_SIZE = 50  # flavor copies or rows per page
PREVIEW = 10  # untouched rows of each kind on the plan's own page
NO_STORE = {"Cache-Control": "no-store"}
UNTOUCHED = {
    ORPHAN: "Orphans: the flavor was deleted or re-created; never written",
    LEFT_ALONE: "Left alone: the instance is busy, deleted, being built or queued for delete",
    ERROR: "Unreadable rows: never written",
}
COUNTS = [("read", "rows_read"), ("to update", "to_update"), ("in sync", "in_sync"),
          ("held back (risky keys only)", "held_back_only"), ("orphans", "orphans"), ("left alone", "left_alone"),
          ("unreadable", "errors")]

router = APIRouter()  # included by the backups plugin's app, with the sync DAG's read check
# Every page of these plugins (the plan view, the backups page, the drift page) renders with
# this environment: a name a template asks for and its data lack is an error, not a blank.
templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=True,  # every value from the plan (flavor names, keys, values, reasons) is text
    undefined=jinja2.StrictUndefined,
)


@dataclass
class Listing:
    """A page of records: the ones on it, how many there are in all, which page."""

    title: str
    page: int
    records: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // PAGE_SIZE))

    def offer(self, record: dict[str, Any]) -> None:
        """Count ``record``; keep it if it falls on this page."""
        if (self.page - 1) * PAGE_SIZE <= self.total < self.page * PAGE_SIZE:
            self.records.append(record)
        self.total += 1


@router.get("/plans/{run_id}", response_class=HTMLResponse)
def plan_page(
    run_id: str,
    line: Annotated[int | None, Query(ge=1, description="a line of the plan: its flavor copies")] = None,
    rows: Annotated[Literal["orphan", "left_alone", "error"] | None, Query(description="untouched rows")] = None,
    page: Annotated[int, Query(ge=1)] = 1,
) -> HTMLResponse:
    state, combined = run_plan(run_id)
    context: dict[str, Any] = {"run_id": run_id, "dag_id": SYNC_DAG_ID, "state": state, "plan": combined,
                               "line": line, "rows": rows, "page_size": PAGE_SIZE, "counts": COUNTS}
    if combined is not None:
        context.update(plan_context(combined, line=line, rows=rows, page=page))
    return HTMLResponse(templates.get_template("nova_flavor_sync_plan_view.html").render(context), headers=NO_STORE)


def run_plan(run_id: str) -> tuple[str, dict[str, Any] | None]:
    """The run's state and its ``combine_plans`` result (None until planning finished); 404 without such a run."""
    # Imported here: every task process loads the plugins folder, and these pull in the ORM.
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        run = session.scalar(select(DagRun).where(DagRun.dag_id == SYNC_DAG_ID, DagRun.run_id == run_id))
        if run is None:
            raise HTTPException(404, f"{SYNC_DAG_ID} has no run {run_id!r}")
        found = session.scalars(XComModel.get_many(
            run_id=run_id, key="return_value", task_ids="combine_plans", dag_ids=SYNC_DAG_ID, map_indexes=-1,
            limit=1)).first()
        return str(run.state), XComModel.deserialize_value(found) if found is not None else None


def plan_context(combined: dict[str, Any], *, line: int | None, rows: str | None, page: int) -> dict[str, Any]:
    """What the template shows of a plan: its copies, its lines, and the page asked for."""
    copies = combined["copies"]
    files, problems = changes_files(copies)
    wheres = [copy["where"] for copy in copies]
    groups, untouched = plan_summary(files) if rows is None else _read_plan(files, rows, page)
    listing = untouched[rows] if rows else None
    if line is not None:
        if line > len(groups):
            raise HTTPException(404, f"line {line}: this plan has {len(groups)} lines")
        wanted = groups[line - 1].change
        listing = Listing(f"Line {line}", page)
        for record in _records(files):
            if record["status"] in ("change", "held_back") and record_change(record) == wanted:
                listing.offer(record)
    if listing is not None and page > listing.pages:
        raise HTTPException(404, f"page {page}: there are {listing.pages} pages")
    return {
        "copies": copies, "wheres": wheres, "short_where": short_where, "problems": problems,
        "groups": [_group_row(group, wheres) for group in groups], "listing": listing,
        "selected": groups[line - 1] if line is not None else None,
        "untouched": untouched,
    }


# The summaries of the plans viewed last (plan_summary), by their files' identities.
SUMMARIES_KEPT = 8
_summaries: dict[tuple, tuple[list[ValueGroup], dict[str, Listing]]] = {}
_summaries_lock = threading.Lock()  # FastAPI runs these handlers in threads


def plan_summary(files: list[StoragePath]) -> tuple[list[ValueGroup], dict[str, Listing]]:
    """A plan's lines (``ValueGroup``) and the first PREVIEW rows of each kind it leaves
    untouched, with their counts: one read of its changes files.

    At a million instances those are millions of lines, seconds to read: what a read gives is
    kept for the next requests (the SUMMARIES_KEPT plans viewed last) as long as every file is
    local and has the same size and time of change. The files of a plan are written once.
    """
    identity = _identity(files)
    with _summaries_lock:
        kept = _summaries.get(identity) if identity is not None else None
    if kept is not None:
        return kept
    summary = _read_plan(files, None, 1)
    if identity is not None:
        with _summaries_lock:
            _summaries[identity] = summary
            while len(_summaries) > SUMMARIES_KEPT:
                del _summaries[next(iter(_summaries))]
    return summary


def _read_plan(files: list[StoragePath], rows: str | None, page: int) -> tuple[list[ValueGroup], dict[str, Listing]]:
    """The plan's lines and its untouched rows: of the kind ``rows`` all counted and page
    ``page`` kept; of the others (every kind without ``rows``) the first PREVIEW."""
    untouched = {status: Listing(title, page if status == rows else 1) for status, title in UNTOUCHED.items()}
    grouped = group_records(_untouched_counted(_records(files), untouched, keep=PREVIEW if rows is None else None))
    return grouped.groups(), untouched


def _identity(files: list[StoragePath]) -> tuple | None:
    """The files' paths, sizes and times of change; None if one is not local (object storage)."""
    identity = []
    for path in files:
        local = local_path(path)
        if local is None:
            return None
        try:
            stat = local.stat()
        except OSError:
            return None
        identity.append((str(local), stat.st_size, stat.st_mtime_ns))
    return tuple(identity)


def changes_files(copies: list[dict[str, Any]]) -> tuple[list[StoragePath], list[str]]:
    """The changes files the copies name that are in the plans directory and readable; what is wrong with the rest."""
    plans = _resolved(plans_dir())
    files, problems = [], []
    for copy in copies:
        raw = copy.get("changes_path")
        if not raw:
            problems.append(f"{copy['where']}: its plan task recorded no changes file (planned before the plan view)")
            continue
        path = _resolved(stored(raw))
        if not str(path).startswith(str(plans).rstrip("/") + "/") or "/../" in str(path):
            problems.append(f"{copy['where']}: {raw} is not in the plans directory {plans}; not read")
        elif not path.is_file():
            problems.append(f"{copy['where']}: {path} is not on the API server (it must see the workers' "
                            "$NOVA_FLAVOR_SYNC_DIR)")
        else:
            files.append(path)
    return files, problems


def _resolved(path: StoragePath) -> StoragePath:
    """A local path without symlinks and ``..``; a URL of object storage as it is."""
    return path.resolve() if local_path(path) is not None else path


def _records(files: list[StoragePath]) -> Iterator[dict[str, Any]]:
    for path in files:
        try:
            yield from read_changes(path)
        except BackupError as exc:
            raise HTTPException(500, str(exc)) from None


def _untouched_counted(records, untouched: dict[str, Listing], *, keep: int | None) -> Iterator[dict[str, Any]]:
    """The records, passing on the changes; the untouched ones are offered to their listing (the
    first ``keep`` kept, or its page when None)."""
    for record in records:
        listing = untouched.get(record["status"])
        if listing is None:
            yield record
        elif keep is None or listing.total < keep:
            listing.offer(record)
        else:
            listing.total += 1


def _group_row(group: ValueGroup, wheres: list[str]) -> dict[str, Any]:
    return {"change": group.change, "shown": group.change.shown(), "total": group.total,
            "counts": [group.counts.get(where, 0) for where in wheres], "examples": group.examples}
