"""``make demo`` and ``make stop``, and the README's screenshot of the approval page.

The module starts the demo once, as ``make demo`` does (the demo loader, then
``scripts/demo_airflow.py start``, each a subprocess), but on a free port, in a temporary
AIRFLOW_HOME and against a fresh database of its own, never 8080, .demo or nova_api_demo.
The Airflow it leaves running is shared by the tests below, in order: the first start and its
dry-run summary; the approval page of a real run in headless Chromium (the PNG the README
shows, docs/images/approval-page.png); a second ``start`` that reuses it (and fails the run
left waiting for approval); a ``start`` after a component died, which restarts it; and
``stop``, after which no process of it is left. The module's teardown stops it in any case.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import local_airflow
import psutil
import pytest
from demo_airflow import SYNC, USERNAME, demo_airflow
from local_airflow import Airflow, free_port
from selenium.webdriver.common.by import By

from browser import headless_chromium, log_in, option_button, page_text, required_action_path, set_viewport, wait
from dbtools import new_database_name, plan_request_specs, stale_copies
from nova_flavor_sync.demo import DEMO_CELLS, cell_database_name, drop_database
from operator_rest import hitl_detail, wait_for_input

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "demo_airflow.py"
# The README's screenshot. A normal run writes it to a temporary directory, so that `make test`
# leaves the checkout clean; `make screenshot` runs this test with NFS_UPDATE_SCREENSHOT=1.
SCREENSHOT = REPO / "docs" / "images" / "approval-page.png"
WIDTH = 1440


@dataclass
class Demo:
    home: Path
    data: Path
    port: int
    db_url: str
    database: str
    outputs: list[subprocess.CompletedProcess[str]] = field(default_factory=list)

    def airflow(self) -> Airflow:
        """The launcher's view of this demo's Airflow (same settings as the script's)."""
        return demo_airflow(self.home, self.port, self.data)

    def start(self, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        args = ["start", "--home", str(self.home), "--port", str(self.port), "--db-url", self.db_url,
                "--data-dir", str(self.data), *extra]
        result = script(*args, timeout=timeout)
        self.outputs.append(result)
        return result

    def pids(self) -> dict[str, int]:
        state = json.loads((self.home / "pids.json").read_text())
        return {name: record["pid"] for name, record in state["components"].items()}


def script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run scripts/demo_airflow.py as make does (no AIRFLOW* setting of the test session leaks in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "NOVA_"))}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


def shown(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"


def processes_in(home: Path) -> list[str]:
    """Every live process working in ``home`` (the components run there; their children too)."""
    found = []
    for proc in psutil.process_iter(["pid", "cwd", "cmdline", "status"]):
        cwd = proc.info["cwd"] or ""
        if proc.info["status"] != psutil.STATUS_ZOMBIE and (cwd == str(home) or cwd.startswith(f"{home}/")):
            found.append(f"{proc.info['pid']} {' '.join(proc.info['cmdline'] or [])[:150]}")
    return found


def to_update(server_kwargs, database: str) -> tuple[int, int]:
    """What the dry run must report: the stale copies of the default scope (busy instances left alone).

    (both copies, the RequestSpecs alone).
    """
    from nova_flavor_sync.dburl import DbParams

    params = DbParams(database=database, **server_kwargs)
    return stale_copies(params, all_keys=False), len(plan_request_specs(params, all_keys=False).changes)


@pytest.fixture(scope="module")
def demo(server_kwargs, tmp_path_factory) -> Iterator[Demo]:
    """The demo started once, as ``make demo`` starts it; stopped and its database dropped after."""
    base = tmp_path_factory.mktemp("demo")
    database = new_database_name()
    password = server_kwargs["password"]
    auth = server_kwargs["user"] + (f":{quote(password, safe='')}" if password else "")
    db_url = f"mysql+pymysql://{auth}@{server_kwargs['host']}:{server_kwargs['port']}/{database}"
    demo = Demo(base / "airflow", base / "data", free_port(), db_url, database)
    try:
        load = subprocess.run(
            [sys.executable, "-m", "nova_flavor_sync.demo", "--db-url", db_url, "--replace"],
            capture_output=True, text=True, timeout=120,
        )
        assert load.returncode == 0, shown(load)
        demo.start()
        yield demo
    finally:
        stopped = script("stop", "--home", str(demo.home))
        left = demo.airflow().stop()  # whatever the script could not stop
        for name in [database, *(cell_database_name(database, cell) for cell in DEMO_CELLS)]:
            drop_database(server_kwargs, name)
        assert stopped.returncode == 0 and not left, f"{shown(stopped)}\nleft: {left}"


def summary_checks(result: subprocess.CompletedProcess[str], stale: tuple[int, int]) -> None:
    out = result.stdout
    both, request_specs = stale
    assert result.returncode == 0, shown(result)
    assert f"DRY RUN: {both} flavor copies would be rewritten; nothing was written" in out, shown(result)
    assert re.search(rf"Read \d+ request specs: {request_specs} to update, \d+ in sync", out), shown(result)
    for cell in ("cell1", "cell2"):  # both copies: each cell's instance copies
        copies = rf"Read \d+ instance copies in {cell} \([0-9a-f-]{{36}}\): [1-9]\d* to update"
        assert re.search(copies, out), shown(result)
    assert re.search(rf"Both copies: {both} to update \(nova_api={request_specs}, cell1 ", out), shown(result)
    assert re.search(r"Plan digest: [0-9a-f]{64}", out), shown(result)


@pytest.mark.timeout(300)
def test_make_demo_starts_airflow_and_prints_the_dry_run_summary(demo, server_kwargs):
    first = demo.outputs[0]
    summary_checks(first, to_update(server_kwargs, demo.database))
    out = first.stdout
    assert "Airflow: started in" in out, shown(first)
    base_url = f"http://127.0.0.1:{demo.port}"
    password = json.loads((demo.home / "passwords.json").read_text())[USERNAME]
    assert f"Airflow UI:  {base_url}/" in out and f"Login:       {USERNAME} / {password}" in out, shown(first)
    assert "make stop stops it" in out and "switch dry_run off" in out and "Required Actions" in out
    assert '"forbidden" -> "required"' in out and f"Plan view:   {base_url}/nova-flavor-sync/plans/" in out, out
    # The generated secrets are private; the components run, listening on 127.0.0.1:port only.
    for name in ("passwords.json", "secrets.json", "pids.json"):
        assert (demo.home / name).stat().st_mode & 0o077 == 0, name
    airflow = demo.airflow()
    ok, why = airflow.status()
    assert ok, why
    assert set(demo.pids()) == {"scheduler", "dag-processor", "triggerer", "api-server"}
    assert airflow.listening() == {("127.0.0.1", demo.port)}, airflow.listening()
    # The connection is a real one in the metadata DB (the UI lists it), on the demo's database.
    connection = airflow.rest.connections.get_connection("nova_api_db")
    assert connection.conn_type == "mysql" and connection.var_schema == demo.database, connection
    assert "Loaded executor: :LocalExecutor:" in airflow.output("scheduler")


def test_the_printed_command_line_dry_run_runs_as_printed(demo, tmp_path):
    out = demo.outputs[0].stdout
    line = out.splitlines()[out.splitlines().index(
        "The same dry run from the command line (it prints the command that applies the plan):") + 1]
    argv = shlex.split(line.strip())
    argv[0] = str(Path(sys.executable).with_name("nova-flavor-sync"))
    env = {k: v for k, v in os.environ.items() if k not in ("NOVA_DATABASE_CONNECTION", "NOVA_API_DB_URL")}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 3, shown(result)  # changes pending: a dry run of every cell
    assert "Instance copies in cell2 " in result.stdout, shown(result)


@pytest.mark.timeout(300)
def test_the_approval_page_in_headless_chromium(demo, tmp_path):
    """The README's screenshot: the approve task of a real run, as the demo's user sees it."""
    airflow = demo.airflow()
    ok, why = airflow.status()  # logs in
    assert ok, why
    run_id = airflow.rest.trigger(SYNC, {"dry_run": False})
    wait_for_input(airflow.rest, SYNC, run_id, settle=0)  # looked at, not answered
    subject = hitl_detail(airflow.rest, SYNC, run_id).subject
    assert subject.startswith("Rewrite ") and "flavor copies? (plan " in subject, subject

    with headless_chromium(tmp_path / "chromedriver.log", width=WIDTH, height=2400) as driver:
        log_in(driver, airflow.base_url, USERNAME, airflow.password)
        driver.get(airflow.base_url + required_action_path(SYNC, run_id, "approve"))
        buttons = [option_button("Approve"), option_button("Reject")]
        for button in buttons:
            wait(driver).until(lambda d, button=button: d.find_elements(*button))
        wait(driver).until(lambda d: "Plan digest:" in page_text(d))
        text = page_text(driver)
        assert subject in text and "Awaiting Input" in text, text[:3000]

        assert "What changes, by value" in text and '"forbidden" -> "required"' in text, text[:3000]  # values
        links = [a.get_attribute("href") for a in driver.find_elements(By.TAG_NAME, "a")]
        plan_view = f"{airflow.base_url}/nova-flavor-sync/plans/{quote(run_id, safe='')}"
        assert plan_view in links, links
        # The whole page down to the buttons, and not more: size the viewport to where the
        # buttons are once the page has stopped moving (the body renders after the subject).
        def bottom() -> float:
            rects = [driver.find_element(*button).rect for button in buttons]
            return max(rect["y"] + rect["height"] for rect in rects)

        def settled() -> float:
            seen: list[float] = []

            def still(_driver) -> float | None:
                seen.append(bottom())
                return seen[-1] if len(seen) >= 3 and seen[-3:] == [seen[-1]] * 3 else None

            return wait(driver, 30).until(still)

        for _ in range(3):
            height = int(settled()) + 32
            set_viewport(driver, WIDTH, height)
            if settled() <= height:
                break
        fits = "return arguments[0] <= window.innerHeight;"
        assert driver.execute_script(fits, bottom()), "the buttons are outside the screenshot"
        png = driver.get_screenshot_as_png()
        driver.get(plan_view)  # the link the approver follows, with the same login
        wait(driver).until(lambda d: "What changes, by value" in page_text(d))
    target = SCREENSHOT if os.environ.get("NFS_UPDATE_SCREENSHOT") == "1" else tmp_path / SCREENSHOT.name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(png)

    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR", "not a PNG"
    width, height = struct.unpack(">II", png[16:24])
    assert width == WIDTH and height > 1000, (width, height)
    assert len(png) > 50_000, f"suspiciously small screenshot: {len(png)} bytes"
    print(f"\nwrote {target}: {width}x{height}, {len(png)} bytes")


@pytest.mark.timeout(300)
def test_a_second_make_demo_reuses_the_running_airflow(demo, server_kwargs):
    airflow = demo.airflow()
    assert airflow.status()[0]
    waiting = [run.dag_run_id for run in airflow.rest.active_runs(SYNC)]
    before = demo.pids()

    second = demo.start()

    summary_checks(second, to_update(server_kwargs, demo.database))
    assert "Airflow: reusing the one already running" in second.stdout, shown(second)
    assert demo.pids() == before
    for run_id in waiting:  # e.g. the previous test's run, still waiting for its approval
        assert f"Marked the unfinished run {run_id} failed" in second.stdout, shown(second)
        assert airflow.rest.run(SYNC, run_id).state == "failed"


@pytest.mark.timeout(300)
def test_make_demo_restarts_an_airflow_that_is_not_healthy(demo, server_kwargs):
    before = demo.pids()
    os.killpg(before["scheduler"], signal.SIGKILL)  # as after a crash, or a reboot

    third = demo.start()

    summary_checks(third, to_update(server_kwargs, demo.database))
    reason = f"cannot be reused (its scheduler (pid {before['scheduler']}) is not running); restarting it"
    assert reason in third.stdout, shown(third)
    assert "Airflow: restarted in" in third.stdout, shown(third)
    after = demo.pids()
    assert not set(after.values()) & set(before.values()), (before, after)
    for pid in before.values():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid


@pytest.mark.timeout(120)
def test_make_stop_leaves_no_process(demo):
    pids = demo.pids()
    assert processes_in(demo.home), "the demo should be running before make stop"

    stopped = script("stop", "--home", str(demo.home))

    assert stopped.returncode == 0, shown(stopped)
    assert stopped.stdout.startswith("Stopped the demo's Airflow: "), shown(stopped)
    for name, pid in pids.items():
        assert f"{name} (pid {pid})" in stopped.stdout, shown(stopped)
    assert processes_in(demo.home) == []
    assert not (demo.home / "pids.json").exists()
    again = script("stop", "--home", str(demo.home))
    assert again.returncode == 0 and again.stdout.startswith("Nothing to stop"), shown(again)


# -- without a running Airflow -----------------------------------------------------------------


def test_a_taken_port_is_refused_with_the_variable_to_set(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = script(
            "start", "--home", str(tmp_path / "airflow"), "--port", str(port),
            "--db-url", "mysql+pymysql://root@127.0.0.1:3306/nova_api_demo", "--data-dir", str(tmp_path / "data"),
        )
    assert result.returncode == 1, shown(result)
    assert f"port {port} on 127.0.0.1 is already in use by pid {os.getpid()}" in result.stderr, shown(result)
    assert f"Set DEMO_PORT to a free port, e.g. `make demo DEMO_PORT={port + 1}`" in result.stderr, shown(result)
    assert not (tmp_path / "airflow" / "pids.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "http"], "DEMO_PORT must be a TCP port number (1-65535), not 'http'"),
        (["--port", "70000"], "DEMO_PORT must be a TCP port number (1-65535), not '70000'"),
        (["--db-url", "postgres://x@h/db"], "unsupported URL scheme 'postgres'"),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(tmp_path, args, message):
    defaults = {"--port": "1", "--db-url": "mysql+pymysql://root@127.0.0.1:3306/nova_api_demo"}
    defaults.update(dict(zip(args[::2], args[1::2], strict=True)))
    result = script(
        "start", "--home", str(tmp_path / "airflow"), "--data-dir", str(tmp_path / "data"),
        *[item for pair in defaults.items() for item in pair],
    )
    assert result.returncode in (1, 2) and message in result.stderr, shown(result)
    assert not (tmp_path / "airflow").exists()


def test_stop_with_nothing_running(tmp_path):
    result = script("stop", "--home", str(tmp_path / "airflow"))
    assert result.returncode == 0 and result.stdout.startswith("Nothing to stop"), shown(result)


def test_a_recorded_component_is_known_by_its_start_since_boot_not_by_the_wall_clock():
    # psutil's create_time() is worked out from the wall clock, which a paused and resumed
    # virtual machine steps: a running component was taken for a recycled pid, and for dead.
    me = psutil.Process()
    started = local_airflow._started_since_boot(me.pid)
    record = {"pid": me.pid, "create_time": me.create_time() - 10, "started": started}
    assert local_airflow._live_process(record) is not None and local_airflow._exists(record)
    recycled = {**record, "started": started - 10}  # another process that had this pid
    assert local_airflow._live_process(recycled) is None and not local_airflow._exists(recycled)
