"""Answer a DAG run's approval through Airflow's REST API while dag.test() runs it.

A thread plays the operator: it waits until the approve task is awaiting input, then
answers with PATCH .../hitlDetails. Import it only from tests/airflow (its conftest sets
Airflow's environment first).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
API = "/api/v2/dags/{dag_id}/dagRuns"
# With dag.test() the waiting task resumes in-process; a short pause after it is seen
# waiting avoids answering while it is still being parked.
SETTLE_S = 2


@cache
def all_admins_app():
    """Airflow's REST API in process, every request let in as an admin, as with ``nova_env``.

    Built once: building it takes 1-2 s (7 s the first time), and it was built for every
    answer and every look at a run. The all-admins setting is read when the app is built
    (it adds the middleware that logs every request in), so it is set for that moment here.
    """
    from airflow.api_fastapi.app import create_app

    with mock.patch.dict(os.environ, {"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True"}):
        return create_app(apps="core")


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
        from fastapi.testclient import TestClient

        client = TestClient(all_admins_app())
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


def run_with_answer(dag_id: str, conf: dict, choice: str | None, *, adjust: Callable | None = None):
    """Run the DAG with dag.test(), answering its approval with ``choice``: (dag_run, states, answer).

    ``choice`` None: nobody answers (a run expected to stop before its approval).
    ``adjust(dag)`` may change the parsed DAG before it runs (e.g. a shorter retry delay).
    """
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(REPO / "dags")).dags[dag_id]
    if adjust is not None:
        adjust(dag)
    operator = Operator(dag_id, choice) if choice else None
    if operator:
        operator.start()
    dag_run = dag.test(run_conf=conf)
    if operator:
        operator.join(5)
        assert operator.error is None, operator.error
    states = {(ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"): ti.state
              for ti in dag_run.get_task_instances()}
    return dag_run, states, operator and operator.response


def rest_api_run(dag_id: str, run_id: str) -> dict:
    """The DAG run as Airflow's REST API shows it (what the UI and alerting see)."""
    from fastapi.testclient import TestClient

    response = TestClient(all_admins_app()).get(f"{API.format(dag_id=dag_id)}/{run_id}")
    assert response.status_code == 200, response.text
    return response.json()
