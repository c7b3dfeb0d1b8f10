"""A person approves, or rejects, a sync in Airflow's own UI, in a real browser.

The session's running Airflow (tests/airflow/conftest.py, ``running_airflow``: started by
scripts/local_airflow.py, as ``make demo`` starts it); each test gets a fresh demo cloud in
MariaDB, set as the ``nova_api_db`` and ``nova_database`` Connections through the REST API (as
``make demo`` sets them). The REST
API triggers a run with dry_run=false and waits for the approve task to await input; then
headless Chromium, driven by Selenium, does what a person does: logs in on Airflow's login
page, opens Browse > Required Actions, clicks the run's subject, reads the approval's body
and presses Approve or Reject in the page. The database says what was written.
"""

from __future__ import annotations

import re
import time

import pytest
from local_airflow import Airflow
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC

from browser import (
    action_panel_text,
    click,
    first,
    headless_chromium,
    log_in,
    open_required_action,
    option_button,
    required_action_path,
    wait,
)
from dbtools import copies_hash, plan_request_specs, stale_copies
from operator_rest import hitl_detail, wait_for_input

SYNC = "nova_flavor_sync"
TASK = "approve"
# Bounds, not durations: each test takes about 20-75 s (the first to use the session's Airflow
# also starts it: 60 s), but on a shared 2-core machine with a load of 15 and more, Chromium
# and Airflow took ten times that.
TEST_TIMEOUT_S = 1200


def approval_lines(plan: dict, *, request_specs: int, instance_copies: int) -> list[str]:
    """What the approval page of ``plan`` (combine_plans' XCom) must show, each as one line of its text.

    The counts come from the database itself (dbtools), the digest from the plan. When the
    body says more (e.g. each key's value change), add its lines here.
    """
    total = request_specs + instance_copies
    copies = plan["copies"]
    by_flavor: dict[str, int] = {}
    for copy in copies:
        for flavor, count in copy["summary"]["by_flavor"].items():
            by_flavor[flavor] = by_flavor.get(flavor, 0) + count
    return [
        f"Rewrite {total} flavor copies? (plan {plan['digest'][:12]})",  # the subject
        f"{total} flavor copies will be rewritten: {request_specs} RequestSpecs and {instance_copies} "
        "instance copies",
        f"Plan digest: {plan['digest']}",
        "\t" + "\t".join(copy["where"] for copy in copies),  # the table: a column per copy
        "to update\t" + "\t".join(str(copy["summary"]["to_update"]) for copy in copies),
        *(f"{flavor}: {count}" for flavor, count in sorted(by_flavor.items())),
        "Approve writes these rows in compare-and-swap batches; Reject writes nothing.",
    ]


def missing_lines(text: str, lines: list[str]) -> list[str]:
    """The ``lines`` that ``text`` does not show as a line, or as the start of one (up to a word's end)."""
    return [line for line in lines if not re.search(rf"(?m)^{re.escape(line)}(?!\w)", text)]


def assert_approval_page_shows(driver, subject: str, lines: list[str]) -> None:
    """Wait until the approval panel shows every one of ``lines``; fail saying which it does not."""
    try:
        wait(driver).until(lambda d: not missing_lines(action_panel_text(d, subject), lines))
    except TimeoutException:
        text = action_panel_text(driver, subject)
        pytest.fail(f"the approval page does not show {missing_lines(text, lines)}; it shows:\n{text}")


def answer_in_the_browser(airflow: Airflow, run_id: str, lines: list[str], option: str, log_file) -> None:
    """Log in, find the approval by its subject (``lines[0]``), read it, press ``option``, see the UI take it."""
    subject = lines[0]
    with headless_chromium(log_file) as driver:
        log_in(driver, airflow.base_url, airflow.username, airflow.password)
        open_required_action(driver, required_action_path(SYNC, run_id, TASK), subject)
        assert_approval_page_shows(driver, subject, lines)

        click(driver, option, first(option_button(option)))

        # What the page says once Airflow has the answer: a toast (it fades), then who answered,
        # and no more choosing.
        toast = (By.CSS_SELECTOR, "[data-scope=toast][data-part=title]")
        wait(driver).until(EC.text_to_be_present_in_element(toast, f"{TASK} response successful"))
        wait(driver).until(lambda d: f" from {airflow.username}" in action_panel_text(d, subject))
        assert "Response received at " in action_panel_text(driver, subject)
        wait(driver).until(lambda d: not d.find_element(*option_button("Approve")).is_enabled())
        assert not driver.find_element(*option_button("Reject")).is_enabled()


def run_to_the_approval(airflow: Airflow, cloud) -> tuple[str, list[str], int]:
    """Trigger a real sync, wait for its approval: (run id, the lines its page must show, copies to rewrite).

    The first line is the approval's subject.
    """
    request_specs = len(plan_request_specs(cloud, all_keys=False).changes)
    both = stale_copies(cloud, all_keys=False)  # the DAG's default scope
    assert request_specs > 0 and both > request_specs, "the demo cloud should start with stale copies"
    run_id = airflow.rest.trigger(SYNC, {"dry_run": False})
    wait_for_input(airflow.rest, SYNC, run_id, TASK, timeout=240)  # and settled: see ANSWER_SETTLE_S
    plan = airflow.rest.xcom(SYNC, run_id, "combine_plans")
    lines = approval_lines(plan, request_specs=request_specs, instance_copies=both - request_specs)
    return run_id, lines, both


def check_answer(airflow: Airflow, run_id: str, option: str) -> None:
    """Airflow recorded ``option``, from the logged-in user, and the DAG logged it."""
    detail = hitl_detail(airflow.rest, SYNC, run_id, TASK)
    assert detail.chosen_options == [option], detail
    assert detail.responded_by_user.name == airflow.username, detail
    answer = airflow.rest.xcom(SYNC, run_id, TASK, key="answer")
    assert answer["choice"] == option and answer["by"] == airflow.username, answer


def check_approved(airflow: Airflow, cloud, run_id: str, states: dict, stale: int, before: str) -> None:
    """Both copies written, in every cell, and the run says so."""
    assert states["verify"] == "success", states
    applied = {task: state for task, state in states.items() if task.startswith("apply_")}
    assert {task.split("[")[0] for task in applied} == {"apply_cells", "apply_request_specs"}, states
    assert all(state == "success" for state in applied.values()), states
    outcome = airflow.rest.xcom(SYNC, run_id, "report_outcome")
    assert outcome["outcome"] == "applied" and outcome["updated"] == stale, outcome
    assert stale_copies(cloud, all_keys=False) == 0  # both copies, in every cell
    assert copies_hash(cloud) != before


def check_rejected(airflow: Airflow, cloud, run_id: str, states: dict, stale: int, before: str) -> None:
    """As the DAG's doc says a rejected run ends: success, nothing written, report_outcome says so."""
    assert copies_hash(cloud) == before
    for task in ("cell_ranges", "request_spec_ranges", "apply_cells", "apply_request_specs", "verify"):
        assert states[task] == "skipped", states
    outcome = airflow.rest.xcom(SYNC, run_id, "report_outcome")
    assert outcome["outcome"] == "rejected", outcome
    assert outcome["message"].startswith(f"REJECTED by {airflow.username} at ") and "nothing was written" in \
        outcome["message"], outcome


@pytest.mark.timeout(TEST_TIMEOUT_S)
@pytest.mark.parametrize(("option", "check_outcome"), [("Approve", check_approved), ("Reject", check_rejected)],
                         ids=["approve_writes_both_copies", "reject_writes_nothing"])
def test_pressed_in_the_page(airflow_on_demo_db, demo_db, tmp_path, option, check_outcome):
    airflow, cloud = airflow_on_demo_db, demo_db
    started = time.monotonic()
    before = copies_hash(cloud)
    run_id = None
    try:
        run_id, lines, stale = run_to_the_approval(airflow, cloud)

        answer_in_the_browser(airflow, run_id, lines, option, tmp_path / "chromedriver.log")

        run = airflow.rest.wait_for_run(SYNC, run_id, timeout=600)
        states = airflow.rest.task_states(SYNC, run_id)
        assert run.state == "success", states  # a rejected run too: it ends as its doc says
    except BaseException:
        print("\n" + airflow.diagnostics(run_id=run_id))  # the failed task's log says why
        raise
    check_answer(airflow, run_id, option)
    check_outcome(airflow, cloud, run_id, states, stale, before)
    print(f"\n{option} pressed in the browser; test body {time.monotonic() - started:.0f} s")
