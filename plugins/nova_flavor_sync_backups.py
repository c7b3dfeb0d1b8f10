"""The backups page of the Airflow UI: Browse > Flavor sync backups.

An Airflow 3 plugin: a small FastAPI app on the API server, under ``/nova-flavor-sync``, and
an external view that shows it inside the UI (in an iframe, at ``/plugin/nova-flavor-sync-backups``).

- ``GET /nova-flavor-sync/backups``: an HTML table of the backups the DAGs wrote in
  ``backups`` under ``$NOVA_FLAVOR_SYNC_STORAGE`` or ``$NOVA_FLAVOR_SYNC_DIR`` (file, records,
  records per copy: nova_api and each cell, taken at, plan digest, schema; a damaged or
  half-written file with its problem),
  read from storage on every request;
- ``GET /nova-flavor-sync/backups.json``: the same, as JSON;
- ``GET /nova-flavor-sync/plans/<run id>``: the plan of a ``nova_flavor_sync`` run, by value
  (``nova_flavor_sync_plan_view``), for users who may read that DAG.

Only metadata is served: a backup's header and trailer, never its records (they hold every
instance's request spec). Airflow does not authenticate the FastAPI apps of plugins (a
mounted app gets none of the core API's dependencies), so every route here does it: the
caller must be logged in to Airflow (the UI's ``_token`` cookie, which the iframe sends, or
``Authorization: Bearer <JWT>``) and may read the ``nova_flavor_restore`` DAG, the DAG that
restores a backup. Anything else gets 401 or 403.

The API server reads the directory itself: it must see the same storage as the workers
that write the backups, as the same user (backups are 0600 in a 0700 directory), with the
same ``NOVA_FLAVOR_SYNC_DIR``; on object storage, the same ``NOVA_FLAVOR_SYNC_STORAGE`` and
its Connection.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable
from typing import Annotated, Any

import nova_flavor_sync_plan_view as plan_view
from airflow.plugins_manager import AirflowPlugin
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from nova_flavor_sync_airflow import STORAGE_ENV, backups_dir

from nova_flavor_sync import service
from nova_flavor_sync.errors import NovaFlavorSyncError

URL_PREFIX = "/nova-flavor-sync"
URL_ROUTE = "nova-flavor-sync-backups"  # the UI page: /plugin/nova-flavor-sync-backups
RESTORE_DAG_ID = "nova_flavor_restore"
DIGEST_SHOWN = 12
NO_STORE = {"Cache-Control": "no-store"}

_bearer = HTTPBearer(auto_error=False)


async def _user(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Any:
    """The Airflow user of the request, as the core API finds it (bearer token, then cookie); else 401."""
    # Imported here, not at the top: every task process loads the plugins folder, and this
    # module pulls in the whole core API.
    from airflow.api_fastapi.core_api.security import get_user

    return await get_user(request, _oauth_token=None, bearer_credentials=credentials)


def may_read_dag(dag_id: str) -> Callable[..., None]:
    """A dependency: 401 unless logged in, 403 unless the user may read ``dag_id`` (sync: it may look
    the DAG's team up)."""

    def check(request: Request, user: Annotated[Any, Depends(_user)]) -> None:
        from airflow.api_fastapi.core_api.security import requires_access_dag

        requires_access_dag("GET", param_dag_id=dag_id)(request, user)

    return check


app = FastAPI(title="nova-flavor-sync backups", docs_url=None, redoc_url=None, openapi_url=None)
# Each page checks the DAG it is about: backups, the restore DAG; a run's plan, the sync DAG.
backups = APIRouter(dependencies=[Depends(may_read_dag(RESTORE_DAG_ID))])


def listing() -> dict[str, Any]:
    """The backup directory and its backups (service.backup_listing), read now; ``problem`` if it cannot be read."""
    directory: Any = os.environ.get(STORAGE_ENV, "")  # named on the page if the storage cannot even be opened
    try:
        directory = backups_dir()
        backups = service.backup_listing(directory)
    except NovaFlavorSyncError as exc:  # storage that does not answer, refuses the credentials, a missing Connection
        return {"directory": str(directory), "exists": False, "backups": [], "problem": str(exc)}
    return {"directory": str(directory), "exists": directory.is_dir(), "backups": backups}


@backups.get("/backups.json")
def backups_json() -> JSONResponse:
    return JSONResponse(listing(), headers=NO_STORE)


@backups.get("/backups", response_class=HTMLResponse)
def backups_page() -> HTMLResponse:
    return HTMLResponse(render(listing()), headers=NO_STORE)


app.include_router(backups)
app.include_router(plan_view.router, dependencies=[Depends(may_read_dag(plan_view.SYNC_DAG_ID))])


def _taken_at(created_at: str) -> str:
    """``2026-01-06T14:32:10Z`` -> ``2026-01-06 14:32:10 UTC``; anything else as it is."""
    found = re.fullmatch(r"(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d)Z", created_at or "")
    return f"{found[1]} {found[2]} UTC" if found else created_at


def _copies(by_copy: dict[str, int]) -> str:
    """Records per copy: ``nova_api 726, cell1 (835ce9b0-...) 409``."""
    return ", ".join(f"{where} {count}" for where, count in by_copy.items())


def render(data: dict[str, Any]) -> str:
    """The page (the template escapes every value: file names and problems come from disk)."""
    entries = [
        entry if "problem" in entry else {
            **entry,
            "per_copy": _copies(entry.get("records_by_copy") or {}),
            "taken_at": _taken_at(entry["created_at"]),
            "digest": entry.get("plan_digest") or "",
            "schema": "" if entry.get("schema") is None else entry["schema"],
        }
        for entry in data["backups"]
    ]
    good = sum("problem" not in entry for entry in entries)
    newest = [entry["path"] for entry in entries if "problem" not in entry][-1:]
    # The CLI has no Airflow Connections: it reads s3://bucket/... with credentials from its environment.
    cli_directory = re.sub(r"^([a-z0-9+.-]+://)[^@/]*@", r"\1", data["directory"])
    return plan_view.templates.get_template("nova_flavor_sync_backups.html").render(
        backups=entries, good=good, damaged=len(entries) - good, directory=data["directory"],
        exists=data["exists"], problem=data.get("problem") or "", newest=newest[0] if newest else "",
        digest_shown=DIGEST_SHOWN, restore_dag_id=RESTORE_DAG_ID, cli_directory=shlex.quote(cli_directory),
    )


class NovaFlavorSyncBackupsPlugin(AirflowPlugin):
    name = "nova_flavor_sync_backups"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "nova-flavor-sync backups"}]  # and plans
    external_views = [
        {
            "name": "Flavor sync backups",
            # Relative (no leading slash): the UI resolves it against its base URL, so it also
            # works when Airflow is served under a sub-path ([api] base_url).
            "href": f"{URL_PREFIX.lstrip('/')}/backups",
            "destination": "nav",
            "category": "browse",
            "url_route": URL_ROUTE,
        }
    ]
