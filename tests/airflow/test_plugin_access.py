"""Who may see the plugins' pages: only Airflow users who may read the DAG each page is about.

The drift history (plugins/nova_flavor_sync_drift.py: the drift check DAG) and the backups
page (plugins/nova_flavor_sync_backups.py: the restore DAG), each page, its JSON and the drift
page's vendored script, from Airflow's own API server app (``api_app``) as the UI's iframe
fetches them: a session cookie, ``_token``.
"""

from __future__ import annotations

import pytest

from ui_tokens import as_admin_api, as_ui

DRIFT_URLS = ["/nova-flavor-sync-drift/history", "/nova-flavor-sync-drift/history.json",
              "/nova-flavor-sync-drift/static/chart.umd.min.js"]
BACKUPS_URLS = ["/nova-flavor-sync/backups", "/nova-flavor-sync/backups.json"]


@pytest.fixture
def client(api_app, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    monkeypatch.setenv("NOVA_FLAVOR_SYNC_DIR", str(tmp_path))  # the backups page reads this, never ~/.nova-flavor-fixes
    return TestClient(api_app)


@pytest.mark.parametrize("url", DRIFT_URLS + BACKUPS_URLS)
def test_only_airflow_users_who_may_read_the_pages_dag_see_it(client, url):
    assert client.get(url).status_code == 401  # anonymous
    assert client.get(url, headers={"Cookie": "_token=forged"}).status_code in (401, 403)
    assert client.get(url, headers=as_ui(role=None)).status_code == 403  # logged in, no permission
    assert client.get(url, headers=as_ui("viewer")).status_code == 200
    assert client.get(url, headers=as_admin_api()).status_code == 200  # the REST API's bearer token too


@pytest.mark.parametrize("prefix", ["/nova-flavor-sync-drift", "/nova-flavor-sync"])
def test_the_plugins_publish_no_api_document(client, prefix):
    assert client.get(f"{prefix}/openapi.json", headers=as_ui()).status_code == 404
