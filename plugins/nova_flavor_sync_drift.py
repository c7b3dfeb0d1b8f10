"""The drift page of the Airflow UI: Browse > Flavor drift.

An Airflow 3 plugin, like ``nova_flavor_sync_backups``: a small FastAPI app on the API server,
under ``/nova-flavor-sync-drift``, shown inside the UI by an external view
(``/plugin/nova-flavor-sync-drift``).

- ``GET /nova-flavor-sync-drift/history``: charts of the stale flavor copies each drift check
  found, night by night, by flavor and by copy (nova_api, each cell), and the last check's
  details in tables;
- ``GET /nova-flavor-sync-drift/history.json``: the same data, as JSON.

The data are the events of the asset ``nova_flavor_drift`` (``nova_flavor_sync_reports``),
which Airflow keeps in its metadata DB, read on every request. The charts are drawn in the
browser by Chart.js, served from ``static/`` next to this file (see ``static/README.md``):
nothing is fetched from the internet. Only users logged in to Airflow who may read the
``nova_flavor_drift_check`` DAG see them (the backups page's dependency); others get 401 or 403.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import nova_flavor_sync_plan_view as plan_view
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from nova_flavor_sync_backups import NO_STORE, may_read_dag
from nova_flavor_sync_reports import DRIFT_DAG_ID, DRIFT_HISTORY, DRIFT_PAGE_ROUTE

URL_PREFIX = "/nova-flavor-sync-drift"
HERE = Path(__file__).resolve().parent
STATIC = {  # every file the page loads, by its URL name
    "chart.umd.min.js": HERE / "static" / "chart.umd.min.js",
    "nova_flavor_sync_drift.js": HERE / "static" / "nova_flavor_sync_drift.js",
}
MAX_NIGHTS = 90  # the newest checks charted
# The counts of each copy in the last check's table: (column, key of the copy's summary).
COPY_COLUMNS = [
    ("Stale (to update)", "to_update"), ("In sync", "in_sync"), ("Held back (risky keys only)", "held_back_only"),
    ("Orphans", "orphans"), ("Unreadable", "errors"), ("Left alone", "left_alone"), ("Rows read", "rows_read"),
]

app = FastAPI(
    title="nova-flavor-sync drift",
    dependencies=[Depends(may_read_dag(DRIFT_DAG_ID))],
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


def drift_events(limit: int = MAX_NIGHTS) -> list[tuple[datetime, dict[str, Any], str | None]]:
    """The newest ``limit`` events of DRIFT_HISTORY, oldest first: (timestamp, extra, source run id)."""
    # Imported here: every task process loads the plugins folder (see nova_flavor_sync_backups).
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    query = (
        select(AssetEvent.timestamp, AssetEvent.extra, AssetEvent.source_run_id)
        .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
        .where(AssetModel.name == DRIFT_HISTORY.name, AssetModel.uri == DRIFT_HISTORY.uri)
        .order_by(AssetEvent.timestamp.desc(), AssetEvent.id.desc())
        .limit(limit)
    )
    with create_session() as session:
        return [tuple(row) for row in reversed(session.execute(query).all())]


def history() -> dict[str, Any]:
    """One point per drift check (its counts by flavor and by copy), and the last check's whole record.

    Events that hold no drift summary (e.g. made by hand through the REST API) are counted, not charted.
    """
    nights, ignored, last = [], 0, None
    for at, extra, run_id in drift_events():
        summary = (extra or {}).get("summary")
        if not isinstance(summary, dict) or not isinstance(summary.get("copies"), dict):
            ignored += 1
            continue
        nights.append({
            "at": at.isoformat(), "label": at.strftime("%Y-%m-%d %H:%M"), "run_id": run_id,
            "database": extra.get("database"), "to_update": summary.get("to_update", 0),
            "by_flavor": summary.get("by_flavor", {}),
            "by_copy": {where: copy.get("to_update", 0) for where, copy in summary["copies"].items()},
        })
        last = {"at": at.isoformat(), "run_id": run_id, **extra}
    return {"dag_id": DRIFT_DAG_ID, "nights": nights, "ignored_events": ignored, "last": last}


@app.get("/history.json")
def history_json() -> JSONResponse:
    return JSONResponse(history(), headers=NO_STORE)


@app.get("/history", response_class=HTMLResponse)
def history_page() -> HTMLResponse:
    return HTMLResponse(render_page(history()), headers=NO_STORE)


def render_page(data: dict[str, Any]) -> str:
    """The page of ``history()``'s data, rendered as the other pages are (``plan_view.templates``:
    a name the template asks for and the data lack is an error, not a blank). The last check's
    record is completed first: one written by an earlier version of the DAG may lack a count
    (a copy's ``left_alone``, the instances that ``disagree``) or its connection, which the
    page leaves out."""
    last = data["last"]
    if last is not None:
        summary = {"to_update": 0, "disagreeing": None, "by_flavor": {}, "by_key": {}, **last["summary"]}
        summary["copies"] = {where: {key: copy.get(key, "") for _, key in COPY_COLUMNS}
                             for where, copy in summary["copies"].items()}
        last = {"conn_id": "", "database": "", "all_keys": False, **last, "summary": summary}
    return plan_view.templates.get_template("nova_flavor_sync_drift.html").render(
        data={**data, "last": last}, chart={"nights": data["nights"]}, copy_columns=COPY_COLUMNS)


@app.get("/static/{name}")
def static_file(name: str) -> FileResponse:
    if name not in STATIC:
        raise HTTPException(status_code=404, detail="Not Found")
    return FileResponse(STATIC[name], media_type="text/javascript", headers={"Cache-Control": "max-age=3600"})


class NovaFlavorSyncDriftPlugin(AirflowPlugin):
    name = "nova_flavor_sync_drift"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "nova-flavor-sync drift"}]
    external_views = [
        {
            "name": "Flavor drift",
            "href": f"{URL_PREFIX.lstrip('/')}/history",  # relative: see nova_flavor_sync_backups
            "destination": "nav",
            "category": "browse",
            "url_route": DRIFT_PAGE_ROUTE,
        }
    ]
