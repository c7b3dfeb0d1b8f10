"""The approval gate, answered through Airflow's REST API while dag.test() waits.

A thread plays the operator: it waits until the approve task is awaiting input, then
answers with PATCH .../hitlDetails. Every test has a hard timeout (pytest-timeout), so a
gate nobody answers cannot hang the suite.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dbtools import table_hash

REPO = Path(__file__).resolve().parents[2]
API = "/api/v2/dags/{dag_id}/dagRuns"
# With dag.test() the waiting task resumes in-process; a short pause after it is seen
# waiting avoids answering while it is still being parked.
SETTLE_S = 2


class Operator(threading.Thread):
    """Answers the first approval of a DAG run through the REST API."""

    def __init__(self, dag_id: str, choice: str, *, give_up_after: float = 120) -> None:
        super().__init__(daemon=True)
        self.dag_id, self.choice, self.give_up_after = dag_id, choice, give_up_after
        self.response: dict | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.response = self._answer()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _answer(self) -> dict:
        from airflow.api_fastapi.app import create_app
        from fastapi.testclient import TestClient

        client = TestClient(create_app())
        deadline = time.monotonic() + self.give_up_after
        base = API.format(dag_id=self.dag_id)
        while time.monotonic() < deadline:
            runs = client.get(base)
            if runs.status_code == 200 and runs.json()["dag_runs"]:
                run_id = runs.json()["dag_runs"][-1]["dag_run_id"]
                ti = client.get(f"{base}/{run_id}/taskInstances/approve")
                if ti.status_code == 200 and ti.json()["state"] == "awaiting_input":
                    time.sleep(SETTLE_S)
                    answer = client.patch(
                        f"{base}/{run_id}/taskInstances/approve/-1/hitlDetails",
                        json={"chosen_options": [self.choice], "params_input": {}},
                    )
                    assert answer.status_code == 200, answer.text
                    return answer.json()
            time.sleep(0.5)
        raise TimeoutError(f"{self.dag_id}: the approve task never waited for input")


def run_with_answer(dag_id: str, conf: dict, choice: str):
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(REPO / "dags")).dags[dag_id]
    operator = Operator(dag_id, choice)
    operator.start()
    dag_run = dag.test(run_conf=conf)
    operator.join(5)
    assert operator.error is None, operator.error
    states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    return dag_run, states, operator.response


def xcom(dag_run, task_id: str, key: str = "return_value"):
    (ti,) = [t for t in dag_run.get_task_instances() if t.task_id == task_id]
    return ti.xcom_pull(task_ids=task_id, key=key)


@pytest.mark.timeout(240)
def test_approve_writes_the_plan_and_the_database_ends_in_sync(nova_env, tmp_path):
    from nova_flavor_sync import service

    dag_run, states, response = run_with_answer("nova_flavor_sync", {"dry_run": False, "all_keys": True}, "Approve")

    assert dag_run.state == "success", states
    assert states["verify"] == "success" and states["report_outcome"] == "success"
    assert response["chosen_options"] == ["Approve"]
    with service.connect(nova_env) as db:
        flavors, scope = service.resolve_scope(db, all_keys=True)
        assert service.make_plan(db, scope, flavors=flavors).changes == []
    backups = list((tmp_path / "data" / "backups").glob("request_specs_*.json"))
    assert len(backups) == 1


@pytest.mark.timeout(240)
def test_reject_writes_nothing_and_says_so(nova_env):
    before = table_hash(nova_env)

    dag_run, states, _ = run_with_answer("nova_flavor_sync", {"dry_run": False}, "Reject")

    assert table_hash(nova_env) == before
    assert states["approve"] == "success"
    assert states["apply_ranges"] == "skipped" and states["verify"] == "skipped"
    assert states["report_outcome"] == "success"


@pytest.mark.timeout(240)
def test_the_restore_dag_puts_the_original_bytes_back(nova_env, tmp_path):
    from nova_flavor_sync import service

    original = table_hash(nova_env, columns="id, instance_uuid, spec")
    with service.connect(nova_env) as db:
        flavors, scope = service.resolve_scope(db, all_keys=True)
        plan = service.make_plan(db, scope, flavors=flavors)
        backup = service.back_up(db, plan, tmp_path / "backups")
        service.apply_plan(db, plan)
    assert table_hash(nova_env, columns="id, instance_uuid, spec") != original

    dag_run, states, _ = run_with_answer(
        "nova_flavor_restore", {"backup_path": str(backup.info.path), "dry_run": False}, "Approve"
    )

    assert dag_run.state == "success", states
    assert table_hash(nova_env, columns="id, instance_uuid, spec") == original
