"""Values, not only counts: the approval body's table of value changes, and the plan view
(plugins/nova_flavor_sync_plan_view.py) of a real run, served by Airflow's own API server app.

The run is a real ``nova_flavor_sync`` dry run (dag.test()) on the demo cloud, one of whose
flavors gained a value made to break Markdown and HTML. The page is fetched from
``create_app()`` as the backups page's tests fetch theirs (a JWT the auth manager signs, sent as
the UI's ``_token`` cookie), then shown in headless Chromium through Selenium for the README's
screenshot (docs/images/plan-view.png with NFS_UPDATE_SCREENSHOT=1, a temporary file otherwise).
"""

from __future__ import annotations

import json
import os
import re
import struct
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pytest
from nova_flavor_sync_airflow import approval_body

from approval_answer import run_with_answer
from browser import headless_chromium, serving, set_viewport
from dbtools import connect
from nova_flavor_sync import value_changes
from ui_tokens import as_ui, token

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "docs" / "images" / "plan-view.png"
WIDTH = 1440
NASTY = '<script>alert(1)</script> | `tick` *bold* [x](y)'
NASTY_KEY = "aggregate_instance_extra_specs:note"
TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "a", "b", "code", "table", "thead",
        "tbody", "tr", "th", "td"}


# -- the approval body (no run needed) ------------------------------------------------------


def copy_result(where: str, key: str, groups: list[dict], lines: int | None = None) -> dict:
    summary = {"to_update": 5, "rows_read": 9, "in_sync": 1, "held_back_only": 0, "orphans": 0, "errors": 0,
               "left_alone": 0, "by_flavor": {}, "by_key": {}, "by_risk": {}, "held_back_by_key": {}}
    return {"key": key, "where": where, "summary": summary, "value_changes": groups,
            "value_change_lines": len(groups) if lines is None else lines}


def group(flavor: str, key: str, old, new, counts: dict, risk: str = "scheduling", held: bool = False) -> dict:
    return {"flavor": flavor, "key": key, "old": old, "new": new, "risk": risk, "held_back": held, "counts": counts,
            "examples": []}


def test_the_approval_body_shows_values_escaped_capped_and_links_the_plan_view():
    cell1 = "cell1 (835ce9b0-6a5b-5709-b701-5eb36f22fdca)"
    storage = "aggregate_instance_extra_specs:storage_type"
    api = [group("c5.large", storage, "nvme", "ceph", {"nova_api": 61}), group("m1|x", NASTY_KEY, None, NASTY,
                                                                               {"nova_api": 3})]
    api += [group("r5.small", f"quota:k{n:02d}", "1", "2", {"nova_api": 1}, risk="guest") for n in range(30)]
    cell = [group("c5.large", storage, "nvme", "ceph", {cell1: 8})]

    body = approval_body([copy_result("nova_api", "nova_api", api), copy_result(cell1, "835ce9b0", cell)],
                         "d" * 64, "manual__2026-12-03T10:00:00+00:00")

    lines = body.splitlines()
    link = "[the plan view](nova-flavor-sync/plans/manual__2026-12-03T10%3A00%3A00%2B00%3A00)"
    assert f"**What changes, by value** (every line, and the instances behind each: {link})" in lines
    start = lines.index(r"| flavor | key | old -> new | risk class | nova\_api | cell1 |")
    assert lines[start + 1] == "| --- | --- | --- | --- | ---: | ---: |"
    table = lines[start + 2 : lines.index("", start)]
    assert table[0] == (r"| c5\.large | aggregate\_instance\_extra\_specs\:storage\_type | "
                        r'\"nvme\" \-\> \"ceph\" | scheduling | 61 | 8 |')
    assert table[1] == (r"| m1\|x | aggregate\_instance\_extra\_specs\:note | added \"\<script\>alert\(1\)"
                        r"\</script\> \| \`tick\` \*bold\* \[x\]\(y\)\" | scheduling | 3 | 0 |")
    assert len(table) == 20 and table[-1].startswith(r"| r5\.small | quota\:k17 | ")
    assert f"... and 12 more lines: see {link}." in lines
    assert "<script>" not in body


def test_a_copy_whose_lines_were_cut_makes_the_count_a_lower_bound():
    groups = [group("c5.large", f"k{n:02d}", "1", "2", {"nova_api": 1}) for n in range(25)]
    body = approval_body([copy_result("nova_api", "nova_api", groups, lines=300)], "d" * 64, "r")
    assert "... and at least 5 more lines: see [the plan view](nova-flavor-sync/plans/r)." in body.splitlines()


# -- the plan view of a real run --------------------------------------------------------------


class Page(HTMLParser):
    """The tags, the text, the links and the body rows (cell texts) of a page."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.text: list[str] = []
        self.links: list[str] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "a":
            self.links.append(dict(attrs)["href"])
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = [""]
            self.rows[-1].append(self._cell)

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1][-1] = " ".join(self._cell[0].split())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell[0] += data

    @property
    def words(self) -> str:
        return " ".join("".join(self.text).split())


def flavor_gains_a_nasty_value(params) -> None:
    """i3.medium (a flavor of few instances) gets a new scheduling key whose value would break HTML and Markdown."""
    with connect(params) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO flavor_extra_specs (created_at, flavor_id, `key`, value) "
                    "SELECT NOW(), id, %s, %s FROM flavors WHERE name = 'i3.medium'", (NASTY_KEY, NASTY))
        assert cur.rowcount == 1


@pytest.mark.timeout(300)
def changes_line(status: str, row: int, **fields) -> str:
    record = {"instance": f"uuid-{row}", "copy": "nova_api", "row": row, "flavor": "m1.small", "key": None,
              "old": None, "new": None, "risk": None, "status": status, "reason": None, **fields}
    return json.dumps(record) + "\n"


def test_a_plans_lines_are_read_once_while_its_changes_file_stays_as_it_is(tmp_path, monkeypatch):
    # A million-instance plan's changes files are millions of lines: seconds for each view.
    import nova_flavor_sync_plan_view as plan_view

    reads = []
    monkeypatch.setattr(plan_view, "read_changes", lambda path: reads.append(path) or real_read(path))
    real_read = value_changes.read_changes
    path = tmp_path / "changes_0_nova_api.jsonl"
    change = {"key": "quota:cpu_shares", "old": "1024", "new": "2048", "risk": "guest"}
    path.write_text("".join(changes_line("change", row, **change) for row in (1, 2))
                    + changes_line("left_alone", 3, reason="instance is deleted"))
    first = plan_view.plan_summary([path])
    assert plan_view.plan_summary([path]) is first and len(reads) == 1
    (line,) = first[0]
    assert (line.change.key, line.total, first[1]["left_alone"].total) == ("quota:cpu_shares", 2, 1)
    path.write_text(path.read_text() + changes_line("change", 4, **change))  # another plan under the same name
    (line,) = plan_view.plan_summary([path])[0]
    assert line.total == 3 and len(reads) == 2


def test_the_plan_view_of_a_real_run(api_app, nova_env, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    monkeypatch.delenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS")  # nova_env's: here roles matter
    flavor_gains_a_nasty_value(nova_env)
    dag_run, states, _ = run_with_answer("nova_flavor_sync", {"dry_run": True}, None)
    assert dag_run.state == "success", states
    combined = dag_run.get_task_instance("combine_plans").xcom_pull(task_ids="combine_plans")
    client = TestClient(api_app)
    url = f"/nova-flavor-sync/plans/{quote(dag_run.run_id, safe='')}"

    # Who may see it: the backups page's checks, for the sync DAG.
    assert client.get(url).status_code == 401
    assert client.get(url, headers=as_ui(role=None)).status_code == 403
    response = client.get(url, headers=as_ui())
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"

    page = Page(response.text)
    assert page.tags <= TAGS, page.tags - TAGS
    assert "<script>" not in response.text and "&lt;script&gt;" in response.text
    words = page.words
    assert f"Flavor sync plan of run {dag_run.run_id}" in words
    assert f"Plan digest {combined['digest']}: {combined['summary']['to_update']} flavor copies to rewrite" in words
    header = next(row for row in page.rows if row[:2] == ["#", "Flavor"])
    assert header == ["#", "Flavor", "Key", "Old -> new", "Risk class", "nova_api", "cell1", "cell2", "Flavor copies"]
    lines = [row for row in page.rows if len(row) == len(header) and row[0].isdigit()]
    more = re.fullmatch(r"\.\.\. and (\d+) more lines: see /nova-flavor-sync/plans/.+", combined["value_changes"][-1])
    assert len(lines) == 20 + int(more[1])  # every line, where the approval and the log show 20
    assert combined["value_changes"][0].startswith(f"{lines[0][1]}: {lines[0][2]} {lines[0][3]} [{lines[0][4]}]")
    (avx_row,) = [row for row in lines if row[2] == "trait:HW_CPU_X86_AVX512F"]
    assert avx_row[1:] == ["c5.large", "trait:HW_CPU_X86_AVX512F", '"forbidden" -> "required"', "scheduling", "61",
                           "38", "23", "122 flavor copies"]
    (nasty,) = [row for row in lines if row[2] == NASTY_KEY]
    assert nasty[3] == f'added "{NASTY.replace(chr(34), chr(92) + chr(34))}"' and nasty[4] == "scheduling"
    assert [row[4] for row in lines][-2:] == ["placement (held back: not written)"] * 2
    for title in ("Orphans: the flavor was deleted or re-created; never written (120)",
                  "Left alone: the instance is busy, deleted, being built or queued for delete (364)"):
        assert title in words
    assert "?rows=orphan" in page.links and "?rows=left_alone" in page.links

    # The flavor copies behind a line, a page at a time.
    avx = int(avx_row[0])
    first = Page(client.get(f"{url}?line={avx}", headers=as_ui()).text)
    second = Page(client.get(f"{url}?line={avx}&page=3", headers=as_ui()).text)
    assert "(122 flavor copies)" in first.words and "Page 1 of 3" in first.words and "Page 3 of 3" in second.words
    behind = [row for row in first.rows + second.rows if len(row) == 3 and row[0] != "Instance"]
    assert len(behind) == 50 + 22 and len({tuple(row[:2]) for row in behind}) == 72
    assert f"?line={avx}&page=2" in first.links
    orphans = Page(client.get(f"{url}?rows=orphan&page=3", headers=as_ui()).text)
    assert "Page 3 of 3" in orphans.words and "no longer exists" in orphans.words

    # Bad requests say what is wrong.
    assert client.get(f"{url}?line=999", headers=as_ui()).json() == {
        "detail": f"line 999: this plan has {len(lines)} lines"}
    assert client.get(f"{url}?line={avx}&page=4", headers=as_ui()).json() == {"detail": "page 4: there are 3 pages"}
    assert client.get(f"{url}?page=0", headers=as_ui()).status_code == 422
    assert client.get(f"{url}?rows=everything", headers=as_ui()).status_code == 422
    assert client.get("/nova-flavor-sync/plans/no-such-run", headers=as_ui()).json() == {
        "detail": "nova_flavor_sync has no run 'no-such-run'"}

    # The approval body links it, and shows the same values (escaped: test_the_approval_body_...).
    body = combined["approval_body"]
    assert f"(nova-flavor-sync/plans/{quote(dag_run.run_id, safe='')})" in body
    assert "| c5\\.large | trait\\:HW\\_CPU\\_X86\\_AVX512F | \\\"forbidden\\\" \\-\\> \\\"required\\\" | " \
           "scheduling | 61 | 38 | 23 |" in body

    # The same page in headless Chromium: the README's screenshot.
    png = screenshot(api_app, url, token("viewer"), tmp_path)
    width, height = struct.unpack(">II", png[16:24])
    assert png[12:16] == b"IHDR" and width == WIDTH and height > 800, (width, height)


# -- the screenshot -----------------------------------------------------------------------------


def screenshot(app, path: str, session_token: str, tmp_path: Path) -> bytes:
    """Serve ``app``, open ``path`` logged in, in headless Chromium, and save a PNG of the whole page."""
    with serving(app) as base, headless_chromium(tmp_path / "chromedriver.log", width=WIDTH) as driver:
        driver.get(f"{base}{path}")  # 401 without the cookie: the cookie needs the origin open
        driver.add_cookie({"name": "_token", "value": session_token, "path": "/"})
        driver.get(f"{base}{path}")
        assert "What changes, by value" in driver.find_element("tag name", "body").text
        set_viewport(driver, WIDTH, driver.execute_script("return document.documentElement.scrollHeight"))
        target = SCREENSHOT if os.environ.get("NFS_UPDATE_SCREENSHOT") == "1" else tmp_path / SCREENSHOT.name
        png = driver.get_screenshot_as_png()
        target.write_bytes(png)
        print(f"\nwrote {target}: {len(png)} bytes")
        return png
