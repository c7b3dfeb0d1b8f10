"""The drift history and its page (plugins/nova_flavor_sync_drift.py), from real drift checks.

The drift check runs twice with dag.test() on the test's copy of the demo cloud: first with
the demo's drift, then after a sync and a flavor changed since (a little drift, one flavor).
Each run keeps its summary as an event of the asset ``nova_flavor_drift`` in Airflow's
metadata DB; the page is read from Airflow's own API server app, and drawn by headless
Chromium (through Selenium) from a real HTTP server, which also takes the README's
screenshot (docs/images/drift-history.png with NFS_UPDATE_SCREENSHOT=1, ``make screenshot``;
a temporary file otherwise, so that a test run leaves the checkout clean).
"""

from __future__ import annotations

import hashlib
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from approval_answer import REPO
from browser import headless_chromium, serving
from dbtools import connect, sync_both_copies
from ui_tokens import as_admin_api, as_ui, token

DRIFT = "nova_flavor_drift_check"
# Who may see these three: test_plugin_access.py.
PAGE = "/nova-flavor-sync-drift/history"
JSON = "/nova-flavor-sync-drift/history.json"
CHART_JS = "/nova-flavor-sync-drift/static/chart.umd.min.js"
STATIC_README = REPO / "plugins" / "static" / "README.md"  # the vendored file's version, source and sha256
SCREENSHOT = REPO / "docs" / "images" / "drift-history.png"
CHANGED_FLAVOR = "c5.medium"
CHANGED_KEY, CHANGED_VALUE = "quota:cpu_shares", "4096"  # a guest key: synced by default
WIDTH, HEIGHT = 1440, 1250


@pytest.fixture
def client(api_app):
    from fastapi.testclient import TestClient

    return TestClient(api_app)


def run_drift_check() -> dict:
    """One run of the drift check; what check_drift recorded."""
    from airflow.dag_processing.dagbag import DagBag

    dag_run = DagBag(dag_folder=str(REPO / "dags")).dags[DRIFT].test()
    (check,) = [ti for ti in dag_run.get_task_instances() if ti.task_id == "check_drift"]
    assert check.state == "success"
    return {"run_id": dag_run.run_id, "state": dag_run.state, **check.xcom_pull(task_ids="check_drift")}


def change_flavor(params) -> None:
    """The flavor gets a new extra spec after the sync: its instances' copies are stale again."""
    with connect(params) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO flavor_extra_specs (created_at, flavor_id, `key`, value) "
                    "SELECT NOW(), id, %s, %s FROM flavors WHERE name = %s",
                    (CHANGED_KEY, CHANGED_VALUE, CHANGED_FLAVOR))
        assert cur.rowcount == 1


@pytest.fixture
def two_checks(nova_env) -> list[dict]:
    """Two nights: the demo's drift; then, after a sync, one changed flavor's."""
    first = run_drift_check()
    sync_both_copies(nova_env, all_keys=False)
    change_flavor(nova_env)
    second = run_drift_check()
    return [first, second]


def ours(nights: list[dict], nova_env) -> list[dict]:
    """The nights of this test's cloud (the session's Airflow DB may hold other tests' checks)."""
    return [night for night in nights if night["database"] == f"127.0.0.1:{nova_env.port}/{nova_env.database}"]


class Tables(HTMLParser):
    """The text of each table's body rows, table by table, and the page's text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[list[list[str]]] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self._in_body = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.tables[-1].append([])
        elif tag == "td" and self._in_body:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


@pytest.mark.timeout(300)
def test_each_drift_check_keeps_its_summary_and_the_page_shows_them(nova_env, two_checks, client):
    first, second = two_checks
    assert first["state"] == second["state"] == "failed"  # drift fails the run, as before
    assert first["summary"]["to_update"] > 600
    # Only the changed flavor drifted since the sync: its instances, in both copies.
    assert list(second["summary"]["by_flavor"]) == [CHANGED_FLAVOR]
    assert second["summary"]["by_key"] == {CHANGED_KEY: second["summary"]["to_update"]}

    # Airflow keeps one event per run, with the summary (what its REST API lists).
    events = client.get("/api/v2/assets/events", params={"limit": 1000}, headers=as_admin_api())
    assert events.status_code == 200, events.text
    kept = [e for e in events.json()["asset_events"]
            if e["uri"] == "nova_flavor_sync://drift" and e["source_run_id"] in (first["run_id"], second["run_id"])]
    assert [(e["source_run_id"], e["source_dag_id"], e["source_task_id"], e["extra"]["summary"]) for e in kept] == [
        (check["run_id"], DRIFT, "check_drift", check["summary"]) for check in two_checks]

    data = client.get(JSON, headers=as_ui()).json()
    nights = ours(data["nights"], nova_env)
    assert [(n["run_id"], n["to_update"], n["by_flavor"]) for n in nights] == [
        (check["run_id"], check["summary"]["to_update"], check["summary"]["by_flavor"]) for check in two_checks]
    assert nights[1]["by_copy"] == {where: copy["to_update"] for where, copy in second["summary"]["copies"].items()}
    assert data["last"]["run_id"] == second["run_id"] and data["last"]["summary"] == second["summary"]

    response = client.get(PAGE, headers=as_ui())
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    page = Tables(response.text)
    text = " ".join("".join(page.text).split())
    summary = second["summary"]
    assert (f"found {summary['to_update']} stale flavor copies and {summary['disagreeing']} instances whose two "
            "copies disagree") in text
    assert f"run {second['run_id']}, nova_api_db: 127.0.0.1:{nova_env.port}/{nova_env.database})" in text
    copies, by_flavor, by_key = page.tables
    assert copies == [[where, str(copy["to_update"]), str(copy["in_sync"]), str(copy["held_back_only"]),
                       str(copy["orphans"]), str(copy["errors"]), str(copy["left_alone"]), str(copy["rows_read"])]
                      for where, copy in summary["copies"].items()]
    assert by_flavor == [[CHANGED_FLAVOR, str(summary["to_update"])]]
    assert by_key == [[CHANGED_KEY, str(summary["to_update"])]]
    assert '<canvas id="by-flavor"' in response.text and '<script src="static/chart.umd.min.js">' in response.text

    library = client.get(CHART_JS, headers=as_ui())
    (row,) = [line for line in STATIC_README.read_text().splitlines() if line.startswith("| `chart.umd.min.js` |")]
    assert library.status_code == 200 and f"| `{hashlib.sha256(library.content).hexdigest()}` |" in row
    assert library.content.startswith(b"/*!\n * Chart.js v4.6.1\n") and "| 4.6.1 |" in row
    outside = "/nova-flavor-sync-drift/static/..%2Fnova_flavor_sync_drift.py"
    assert client.get(outside, headers=as_ui()).status_code == 404


def test_a_flavor_name_cannot_inject_markup(airflow_db):
    """Names come from Nova's database: they are escaped in the page and in its JSON island."""
    from nova_flavor_sync_drift import render_page

    nasty = '</script><img src=x onerror=alert(1)>{{7*7}}'
    summary = {"to_update": 1, "disagreeing": 0, "by_flavor": {nasty: 1}, "by_key": {nasty: 1},
               "copies": {nasty: {"to_update": 1}}}
    night = {"label": "2026-01-01 02:30", "by_flavor": {nasty: 1}, "by_copy": {nasty: 1}}
    page = render_page({"dag_id": DRIFT, "nights": [night], "ignored_events": 0,
                        "last": {"at": "2026-01-01T02:30:00", "run_id": nasty, "conn_id": nasty, "database": nasty,
                                 "all_keys": False, "summary": summary}})
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert page.count("<script") == page.count("</script>") == 3  # the JSON island stays closed
    assert "\\u003c/script\\u003e\\u003cimg" in page  # in it the name is JSON with <, > escaped
    assert "{{7*7}}" in page  # text, never evaluated


def test_a_check_recorded_by_an_earlier_version_shows_what_it_has_and_leaves_the_rest_blank(airflow_db):
    """An event's summary may lack counts added since (a copy's left alone rows, the instances
    whose copies disagree), and the event its connection and database."""
    from nova_flavor_sync_drift import render_page

    summary = {"to_update": 7, "by_flavor": {"m1.small": 7}, "copies": {"nova_api": {"to_update": 7, "in_sync": 3}}}
    page = render_page({"dag_id": DRIFT, "nights": [], "ignored_events": 0,
                        "last": {"at": "2026-01-01T02:30:00", "run_id": "scheduled__1", "summary": summary}})
    run = '<a href="../dags/nova_flavor_drift_check/runs/scheduled__1" target="_top"><code>scheduled__1</code></a>'
    assert f'(run {run}), found\n<span class="stale">7 stale flavor copies</span>.' in page
    (row,) = re.findall(r"<tr><td>nova_api</td>(.*?)</tr>", page)
    assert re.findall(r'<td class="num">(.*?)</td>', row) == ["7", "3", "", "", "", "", ""]
    assert "<code>m1.small</code>" in page and "Key changes by key</h2>\n<p>None.</p>" in page


def test_the_plugin_is_registered_with_its_nav_entry(client):
    auth = as_admin_api()
    plugins = client.get("/api/v2/plugins", headers=auth).json()["plugins"]
    (plugin,) = [p for p in plugins if p["name"] == "nova_flavor_sync_drift"]
    (view,) = plugin["external_views"]
    assert (view["name"], view["href"], view["category"], view["url_route"]) == (
        "Flavor drift", "nova-flavor-sync-drift/history", "browse", "nova-flavor-sync-drift")
    errors = client.get("/api/v2/plugins/importErrors", headers=auth).json()["import_errors"]
    assert not [e for e in errors if "nova_flavor_sync" in e["source"]]


# -- the page in a browser ---------------------------------------------------------------------


# What Chart.js drew: each chart's datasets (its public Chart.getChart), and how many of the
# canvas's pixels are painted.
CHARTS_SCRIPT = """
return ["by-flavor", "by-copy"].map((id) => {
  const chart = Chart.getChart(id);
  const canvas = document.getElementById(id);
  const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let painted = 0;
  for (let i = 3; i < pixels.length; i += 4) if (pixels[i]) painted++;
  return {labels: chart ? chart.data.labels : null, painted,
          datasets: chart ? chart.data.datasets.map((d) => [d.label, d.data]) : null};
});
"""


@pytest.mark.timeout(300)
def test_the_page_draws_the_charts_in_a_browser_and_its_screenshot_is_taken(nova_env, two_checks, api_app, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    first, second = two_checks
    sync_both_copies(nova_env, all_keys=False)
    third = run_drift_check()  # a clean night
    assert third["state"] == "success" and third["summary"]["to_update"] == 0
    target = SCREENSHOT if os.environ.get("NFS_UPDATE_SCREENSHOT") == "1" else tmp_path / SCREENSHOT.name
    log_file = tmp_path / "chromedriver.log"
    with serving(api_app) as base, headless_chromium(log_file, width=WIDTH, height=HEIGHT) as browser:
        browser.get(base + PAGE)
        assert "Not authenticated" in browser.page_source  # no cookie yet: 401
        browser.add_cookie({"name": "_token", "value": token("viewer"), "path": "/"})
        browser.get(base + PAGE)
        WebDriverWait(browser, 30).until(
            lambda b: b.execute_script("return !!(window.Chart && Chart.getChart('by-copy'))"))
        by_flavor, by_copy = browser.execute_script(CHARTS_SCRIPT)
        target.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(target))

    # Our two nights are the newest two bars; stacked, their segments add up to each night's total.
    for chart in (by_flavor, by_copy):
        assert chart["painted"] > 10_000, chart  # the canvas is drawn on, not blank
        totals = [sum(data[i] for _, data in chart["datasets"]) for i in range(len(chart["labels"]))]
        assert totals[-3:] == [first["summary"]["to_update"], second["summary"]["to_update"], 0]
    flavors = dict(by_flavor["datasets"])
    assert flavors[CHANGED_FLAVOR][-3:] == [first["summary"]["by_flavor"][CHANGED_FLAVOR],
                                            second["summary"]["by_flavor"][CHANGED_FLAVOR], 0]
    assert set(dict(by_copy["datasets"])) >= set(second["summary"]["copies"])
    png = Path(target).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
