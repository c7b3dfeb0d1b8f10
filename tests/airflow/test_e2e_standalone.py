"""End to end against a real, running Airflow: sync through the approval gate, then restore.

The Airflow components (api-server, scheduler with LocalExecutor, dag-processor, triggerer)
run as subprocesses in a temporary AIRFLOW_HOME with SQLite, started by the launcher
``make demo`` uses too (scripts/local_airflow.py says why not ``airflow standalone``); the
session's tests share it (tests/airflow/conftest.py, ``running_airflow``).
Everything goes through the REST API, as an operator would: set the Connections, trigger,
wait for the approve task, answer it, wait for the run, read XComs.
The nova_api database is the ``demo_db`` fixture's fresh MariaDB copy of the demo cloud.
"""

from __future__ import annotations

import time
from pathlib import Path

import local_airflow
import pytest
from local_airflow import Airflow

from dbtools import copies_hash, stale_copies
from operator_rest import ANSWER_SETTLE_S, answer, data_dir, printed_on_failure, wait_for_input

SYNC, RESTORE = "nova_flavor_sync", "nova_flavor_restore"


def run_approved(airflow: Airflow, dag_id: str, conf: dict) -> tuple[str, object, dict[str, str | None]]:
    """Trigger, approve through the REST API, wait for the end: (run_id, the answer, task states)."""
    rest = airflow.rest
    run_id = rest.trigger(dag_id, conf)
    wait_for_input(rest, dag_id, run_id)
    response = answer(rest, dag_id, run_id, "Approve")
    run = rest.wait_for_run(dag_id, run_id)
    states = rest.task_states(dag_id, run_id)
    assert run.state == "success", f"{dag_id} {run_id} ended {run.state.value}: {states}"
    return run_id, response, states


@pytest.mark.timeout(600)  # the first test to use the shared Airflow also waits for it to start
def test_sync_then_restore_through_a_running_airflow(airflow_on_demo_db, demo_db):
    airflow = airflow_on_demo_db
    backups_dir = data_dir(airflow) / "backups"

    started = time.monotonic()
    with printed_on_failure(airflow):
        backups_before = set(backups_dir.glob("flavor_copies_*.json"))
        original = copies_hash(demo_db, copies_only=True)
        stale = stale_copies(demo_db)  # both copies; busy instances' left alone
        assert stale > 0, "the demo cloud should start with stale flavor copies"

        rest = airflow.rest
        assert "Loaded executor: :LocalExecutor:" in airflow.output("scheduler")
        assert airflow.listening() == {("127.0.0.1", airflow.api_port)}, airflow.listening()

        # Sync everything, approved through the REST API.
        sync_started = time.monotonic()
        run_id, response, states = run_approved(airflow, SYNC, {"dry_run": False, "all_keys": True})
        sync_s = time.monotonic() - sync_started

        assert response.chosen_options == ["Approve"]
        assert response.responded_by.name == "e2e-operator"
        assert states["approve"] == "success" and states["verify"] == "success", states
        applied = {task: state for task, state in states.items() if task.startswith("apply_")}
        assert applied and all(state == "success" for state in applied.values()), states
        assert {task.split("[")[0] for task in applied} == {"apply_cells", "apply_request_specs"}, states
        recorded = rest.xcom(SYNC, run_id, "approve", key="answer")
        assert recorded["choice"] == "Approve" and recorded["by"] == "e2e-operator", recorded
        outcome = rest.xcom(SYNC, run_id, "report_outcome")
        assert outcome["outcome"] == "applied", outcome
        assert outcome["updated"] == stale and outcome["conflicts"] == 0 and outcome["errors"] == 0, outcome

        assert stale_copies(demo_db) == 0
        assert copies_hash(demo_db, copies_only=True) != original
        backups = sorted(set(backups_dir.glob("flavor_copies_*.json")) - backups_before)
        assert len(backups) == 1, backups  # this run's one backup
        assert rest.xcom(SYNC, run_id, "back_up")["backup_path"] == str(backups[0])

        # Put the original bytes back from that backup, approved the same way.
        restore_started = time.monotonic()
        run_id, _, states = run_approved(airflow, RESTORE, {"backup_path": str(backups[0]), "dry_run": False})
        restore_s = time.monotonic() - restore_started

        assert states["restore"] == "success", states
        restored = rest.xcom(RESTORE, run_id, "restore")
        assert restored["restored"] == stale and restored["errors"] == 0, restored
        assert copies_hash(demo_db, copies_only=True) == original  # both copies, in every cell

    print(
        f"\ne2e timings: test body {time.monotonic() - started:.1f} s, sync run {sync_s:.1f} s, "
        f"restore run {restore_s:.1f} s (each with {ANSWER_SETTLE_S} s of settle)"
    )


def test_the_components_environment_is_built_from_scratch():
    """The harness itself: no inherited Airflow or nova-flavor-sync setting reaches the components."""
    env = local_airflow.airflow_env(
        Path("/h"), api_port=1234, extra={"X": "1"},
        base={"PATH": "/bin", "AIRFLOW__CORE__DAGS_FOLDER": "/elsewhere", "AIRFLOW_CONFIG": "/c",
              "AIRFLOW_CONN_NOVA_API_DB": "mysql://u@h/other", "NOVA_FLAVOR_SYNC_DIR": "/x", "HOME": "/root"},
    )
    assert env["AIRFLOW__CORE__DAGS_FOLDER"].endswith("/dags") and "AIRFLOW_CONFIG" not in env
    assert "AIRFLOW_CONN_NOVA_API_DB" not in env and "NOVA_FLAVOR_SYNC_DIR" not in env
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1" and env["AIRFLOW__API__PORT"] == "1234"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:1234/execution/"
    assert env["HOME"] == "/root" and env["X"] == "1"
