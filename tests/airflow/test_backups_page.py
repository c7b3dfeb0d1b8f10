"""The backups page (plugins/nova_flavor_sync_backups.py), served by Airflow's own API server app.

Real backups are written with ``backup.write_backup`` into ``$NOVA_FLAVOR_SYNC_DIR/backups``;
the pages are fetched from ``create_app()`` with a JWT the auth manager signs, sent as the
``_token`` cookie the way the UI's iframe sends it. The app is built once for the session
(``api_app``, about 4 s, nearly all of it importing and building Airflow's own routes). Who
may see the pages: test_plugin_access.py.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin

import pytest

from nova_flavor_sync import service
from nova_flavor_sync.backup import BackupRecord, write_backup
from nova_flavor_sync.spec_json import sha256_text
from s3tools import CONN_ID
from ui_tokens import as_admin_api, as_ui

PAGE = "/nova-flavor-sync/backups"
JSON = "/nova-flavor-sync/backups.json"
DAMAGED = "request_specs_20260101_000000_<b>.json"
# Linux allows any byte but "/" and NUL in a file name: this one would break out of an attribute.
NASTY_GOOD = 'request_specs_20260108_000000_"><img src=x onerror=alert(1)>.json'
DATABASE = {"host": "db", "port": 3306, "schema": "nova_api", "server_uuid": "3e11fa47-71ca-11e1-9e33-c80aa9429562"}
SECRET_SPEC = '{"nova_object.name": "RequestSpec", "marker": "do-not-serve-me"}'
TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "p", "code", "i", "table", "thead", "tbody", "tr",
        "th", "td"}


@pytest.fixture
def client(api_app):
    from fastapi.testclient import TestClient

    return TestClient(api_app)  # a new one per test: no cookie carried over


def digest(n: int) -> str:
    return sha256_text(f"plan {n}")


def records(n: int) -> list[BackupRecord]:
    return [
        BackupRecord.of_row(i, f"00000000-0000-0000-0000-{i:012d}", SECRET_SPEC, None, sha256_text(f"new {i}"))
        for i in range(1, n + 1)
    ]


@pytest.fixture
def backups(tmp_path, monkeypatch) -> Path:
    """Two good backups (2 and 3 records) and a damaged file with a nasty name; returns the directory."""
    monkeypatch.setenv("NOVA_FLAVOR_SYNC_DIR", str(tmp_path))
    directory = tmp_path / "backups"
    for n, (count, day) in enumerate([(2, 6), (3, 7)], start=1):
        write_backup(directory, records(count), databases={"nova_api": DATABASE}, plan_digest=digest(n),
                     scope={"all_keys": False}, now=datetime(2026, 1, day, 14, 32, 10, tzinfo=UTC))
    (directory / DAMAGED).write_text('{"format": "nova-flavor-sync-backup", "records": [\n{"id": 1')
    return directory


class Page(HTMLParser):
    """The tags of a page, and the body rows of its table as [(text, title), ...] per cell."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.rows: list[list[tuple[str, str | None]]] = []
        self.text: list[str] = []
        self._in_body = False
        self._cell: list | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        title = dict(attrs).get("title")
        if tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append([])
        elif tag == "td" and self._in_body:
            self._cell = ["", title]
            self.rows[-1].append(self._cell)
        elif title is not None and self._cell is not None:
            self._cell[1] = title  # the <code title=...> inside a cell

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell[0] += data


def test_the_page_lists_each_backup_and_the_damaged_file(client, backups):
    response = client.get(PAGE, headers=as_ui())
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["cache-control"] == "no-store"
    page = Page(response.text)
    first, second = (backups / f"flavor_copies_202601{day:02d}_143210.json" for day in (6, 7))
    assert [[tuple(cell) for cell in row] for row in page.rows] == [
        [(DAMAGED, None), (f"{DAMAGED}: damaged or not a backup", None)],
        [(first.name, str(first)), ("2", None), ("nova_api 2", None),
         ("2026-01-06 14:32:10 UTC", "2026-01-06T14:32:10Z"),
         (digest(1)[:12], digest(1)), ("nova_api", None)],
        [(second.name, str(second)), ("3", None), ("nova_api 3", None),
         ("2026-01-07 14:32:10 UTC", "2026-01-07T14:32:10Z"),
         (digest(2)[:12], digest(2)), ("nova_api", None)],
    ]
    assert "<b>" not in response.text and "&lt;b&gt;" in response.text
    assert page.tags <= TAGS
    text = " ".join("".join(page.text).split())
    assert f"2 backups and 1 damaged or incomplete file in {backups}" in text
    assert "trigger the DAG nova_flavor_restore with backup_path" in text
    assert str(second) in text  # the example path to restore: the newest
    assert "do-not-serve-me" not in response.text


def test_json_has_the_same_data(client, backups):
    response = client.get(JSON, headers=as_ui())
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["directory"] == str(backups) and data["exists"] is True
    assert data["backups"] == service.backup_listing(backups)
    assert [(b["file"], b.get("records"), b.get("plan_digest"), b.get("problem")) for b in data["backups"]] == [
        (DAMAGED, None, None, f"{DAMAGED}: damaged or not a backup"),
        ("flavor_copies_20260106_143210.json", 2, digest(1), None),
        ("flavor_copies_20260107_143210.json", 3, digest(2), None),
    ]
    assert data["backups"][1]["created_at"] == "2026-01-06T14:32:10Z" and data["backups"][1]["schema"] == "nova_api"
    page = Page(client.get(PAGE, headers=as_ui()).text)
    assert [row[0][0] for row in page.rows] == [b["file"] for b in data["backups"]]
    assert "do-not-serve-me" not in response.text


def test_every_value_is_escaped_also_in_attributes_and_read_on_each_request(client, backups):
    before = Page(client.get(PAGE, headers=as_ui()).text)
    shutil.copy(backups / "flavor_copies_20260107_143210.json", backups / NASTY_GOOD)  # a valid backup
    response = client.get(PAGE, headers=as_ui())
    page = Page(response.text)
    assert len(page.rows) == len(before.rows) + 1
    assert page.rows[-1][0] == [NASTY_GOOD, str(backups / NASTY_GOOD)]
    assert page.tags <= TAGS and "<img" not in response.text


def test_an_empty_or_missing_directory_says_so(client, tmp_path, monkeypatch):
    monkeypatch.setenv("NOVA_FLAVOR_SYNC_DIR", str(tmp_path / "nowhere"))
    response = client.get(PAGE, headers=as_ui())
    assert response.status_code == 200
    text = " ".join("".join(Page(response.text).text).split())
    assert f"No backups in {tmp_path / 'nowhere' / 'backups'} (the directory does not exist on the API server)" in text
    assert client.get(JSON, headers=as_ui()).json() == {
        "directory": str(tmp_path / "nowhere" / "backups"), "exists": False, "backups": []}


def test_on_s3_the_bucket_is_listed_afresh_on_every_request(client, bucket):
    s3, name = bucket
    directory = f"s3://{CONN_ID}@{name}/nova/backups"
    from nova_flavor_sync_airflow import backups_dir

    write_backup(backups_dir(), records(2), databases={"nova_api": DATABASE}, plan_digest=digest(1),
                 scope={"all_keys": False}, now=datetime(2026, 1, 6, 14, 32, 10, tzinfo=UTC))
    first = client.get(PAGE, headers=as_ui())
    assert first.status_code == 200, first.text
    assert [row[0] for row in Page(first.text).rows] == [
        ["flavor_copies_20260106_143210.json", f"{directory}/flavor_copies_20260106_143210.json"]]

    # another worker's backup, written after the page listed the bucket once
    s3.copy_object(Bucket=name, Key="nova/backups/flavor_copies_20260107_143210.json",
                   CopySource={"Bucket": name, "Key": "nova/backups/flavor_copies_20260106_143210.json"})
    second = client.get(PAGE, headers=as_ui())

    page = Page(second.text)
    assert [row[0][0] for row in page.rows] == ["flavor_copies_20260106_143210.json",
                                                "flavor_copies_20260107_143210.json"]
    text = " ".join("".join(page.text).split())
    assert f"2 backups in {directory}, oldest first" in text
    assert f"backup_path set to the backup's full path: {directory}/file, e.g. {directory}/flavor_copies_2026" in text
    # the CLI reads the bucket with its own credentials (AWS_*): no Connection id in its URL
    assert f"nova-flavor-sync --list-backups --backup-dir s3://{name}/nova/backups." in text
    assert "do-not-serve-me" not in second.text


def test_storage_that_cannot_be_read_is_said_on_the_page(client, monkeypatch):
    monkeypatch.setenv("NOVA_FLAVOR_SYNC_STORAGE", "s3://nova_s3_down@nfs-backups/nova")
    monkeypatch.setenv("AIRFLOW_CONN_NOVA_S3_DOWN", json.dumps({  # nothing listens on port 9
        "conn_type": "aws", "login": "fake", "password": "fake",
        # One try per call: the default retries with back-off took about 20 s to give up.
        "extra": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1",
                  "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}, "connect_timeout": 2}}}))

    response = client.get(PAGE, headers=as_ui())

    assert response.status_code == 200, response.text
    text = " ".join("".join(Page(response.text).text).split())
    assert "cannot list the backups in s3://nova_s3_down@nfs-backups/nova/backups: " in text
    assert client.get(JSON, headers=as_ui()).json()["problem"].startswith("cannot list the backups in s3://")


def test_a_storage_url_naming_a_missing_connection_is_said_on_the_page(client, monkeypatch):
    monkeypatch.setenv("NOVA_FLAVOR_SYNC_STORAGE", "s3://no_such_conn@nfs-backups/nova")

    response = client.get(PAGE, headers=as_ui())

    assert response.status_code == 200, response.text
    text = " ".join("".join(Page(response.text).text).split())
    assert ("NOVA_FLAVOR_SYNC_STORAGE=s3://no_such_conn@nfs-backups/nova names the Airflow Connection "
            "'no_such_conn', which does not exist") in text


def test_the_plugin_is_registered_with_its_nav_entry(client):
    auth = as_admin_api()
    response = client.get("/api/v2/plugins", headers=auth)
    assert response.status_code == 200, response.text
    (plugin,) = [p for p in response.json()["plugins"] if p["name"] == "nova_flavor_sync_backups"]
    (view,) = plugin["external_views"]
    assert view == {
        "name": "Flavor sync backups", "href": "nova-flavor-sync/backups", "destination": "nav",
        "category": "browse", "url_route": "nova-flavor-sync-backups", "icon": None, "icon_dark_mode": None,
        "nav_top_level": False,
    }
    assert urljoin("/", view["href"]) == PAGE  # where the UI's iframe, under <base href="/">, loads it from
    assert [(a["name"], a["url_prefix"]) for a in plugin["fastapi_apps"]] == [
        ("nova-flavor-sync backups", "/nova-flavor-sync")]
    errors = client.get("/api/v2/plugins/importErrors", headers=auth).json()["import_errors"]
    assert not [e for e in errors if "nova_flavor_sync" in e["source"]]
    # The UI page that shows it (the single-page app answers every such path).
    assert client.get("/plugin/nova-flavor-sync-backups").status_code == 200
