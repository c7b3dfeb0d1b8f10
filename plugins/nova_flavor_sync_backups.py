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

import html
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


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _taken_at(created_at: str) -> str:
    """``2026-01-06T14:32:10Z`` -> ``2026-01-06 14:32:10 UTC``; anything else as it is."""
    found = re.fullmatch(r"(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d)Z", created_at or "")
    return f"{found[1]} {found[2]} UTC" if found else created_at


def _row(entry: dict[str, Any]) -> str:
    if "problem" in entry:
        return (
            f'<tr class="damaged"><td><code>{_e(entry["file"])}</code></td>'
            f'<td colspan="5">{_e(entry["problem"])}</td></tr>'
        )
    digest = entry.get("plan_digest") or ""
    return (
        f'<tr><td><code title="{_e(entry["path"])}">{_e(entry["file"])}</code></td>'
        f'<td class="num">{_e(entry["records"])}</td>'
        f"<td>{_e(_copies(entry.get('records_by_copy') or {}))}</td>"
        f'<td title="{_e(entry["created_at"])}">{_e(_taken_at(entry["created_at"]))}</td>'
        f'<td><code title="{_e(digest)}">{_e(digest[:DIGEST_SHOWN])}</code></td>'
        f"<td>{_e(entry.get('schema'))}</td></tr>"
    )


def _copies(by_copy: dict[str, int]) -> str:
    """Records per copy: ``nova_api 726, cell1 (835ce9b0-...) 409``."""
    return ", ".join(f"{where} {count}" for where, count in by_copy.items())


def render(data: dict[str, Any]) -> str:
    """The page: every value escaped (file names and problems come from disk)."""
    entries = data["backups"]
    good = sum("problem" not in entry for entry in entries)
    directory = _e(data["directory"])
    newest = [entry["path"] for entry in entries if "problem" not in entry][-1:]
    example = f", e.g. <code>{_e(newest[0])}</code> for the newest" if newest else ""
    if entries:
        damaged = len(entries) - good
        counts = f"{good} backup{'' if good == 1 else 's'}" + (
            f" and {damaged} damaged or incomplete file{'' if damaged == 1 else 's'}" if damaged else ""
        )
        body = (
            f"<p>{counts} in <code>{directory}</code>, oldest first "
            "(as <code>nova-flavor-sync --list-backups</code> lists them).</p>"
            "<table><thead><tr><th>File</th><th>Records</th><th>Per copy</th><th>Taken at</th><th>Plan digest</th>"
            "<th>Schema</th></tr></thead><tbody>" + "".join(_row(entry) for entry in entries) + "</tbody></table>"
        )
    else:
        missing = "" if data["exists"] else " (the directory does not exist on the API server)"
        body = f"<p>No backups in <code>{directory}</code>{missing}.</p>"
        if data.get("problem"):
            body = f'<p class="problem">{_e(data["problem"])}</p>'
    # The CLI has no Airflow Connections: it reads s3://bucket/... with credentials from its environment.
    cli_directory = re.sub(r"^([a-z0-9+.-]+://)[^@/]*@", r"\1", data["directory"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Flavor sync backups</title>
<style>
:root {{ color-scheme: light dark; font-family: system-ui, sans-serif; font-size: 14px; }}
body {{ margin: 1rem 1.5rem; }}
h1 {{ font-size: 1.3rem; }}
table {{ border-collapse: collapse; }}
th, td {{ padding: .35rem .8rem; border-bottom: 1px solid #8884; text-align: left; vertical-align: top; }}
td.num {{ text-align: right; }}
tr.damaged td, p.problem {{ color: #c0392b; }}
code {{ font-size: .95em; }}
.note {{ max-width: 60rem; line-height: 1.5; }}
</style></head>
<body>
<h1>Flavor sync backups</h1>
{body}
<p class="note">To restore one, trigger the DAG <code>{RESTORE_DAG_ID}</code> with <code>backup_path</code> set to
the backup's full path: <code>{directory}/</code><i>file</i>{example}. It checks the backup and shows what it would put
back (<code>dry_run</code>, the default); with <code>dry_run</code> off it asks for an
approval, then restores. The file list is read from storage on every visit; backup contents are never shown here.
From a shell: <code>nova-flavor-sync --list-backups --backup-dir {_e(shlex.quote(cli_directory))}</code>.</p>
</body></html>
"""


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
