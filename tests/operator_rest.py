"""What only the tests do through a running Airflow's REST API: answer approvals, read a task's tries.

On top of scripts/airflow_rest.py (what ``make demo`` and the tests share), with the same
official client: ``rest`` is the launcher's ``Airflow.rest``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import airflow_client.client as client
from airflow_rest import TERMINAL_RUN_STATES, AirflowError, Rest
from local_airflow import Airflow

DAG_IDS = ("nova_flavor_sync", "nova_flavor_restore", "nova_flavor_drift_check")


@contextmanager
def printed_on_failure(airflow: Airflow, run_id: str | None = None) -> Iterator[None]:
    """On any failure (a timeout too), print the components' output and the failed tasks' logs.

    ``run_id``: only that run's task logs (a shared Airflow holds other tests' runs too).
    """
    try:
        yield
    except BaseException:
        print("\n" + airflow.diagnostics(run_id=run_id))
        raise


def data_dir(airflow: Airflow) -> Path:
    """Where a running Airflow's tasks write plans and backups ($NOVA_FLAVOR_SYNC_DIR)."""
    return Path(airflow.env["NOVA_FLAVOR_SYNC_DIR"])


def end_active_runs(rest: Rest) -> None:
    """Mark every queued or running run of our DAGs failed, as the UI's "Mark run as failed" does."""
    for dag_id in DAG_IDS:
        for run in rest.active_runs(dag_id):
            rest.fail_run(dag_id, run.dag_run_id)


# How long an approval must have been awaiting input before a test answers it. Airflow 3.3.2
# can fail a task answered too soon after it parks: the LocalExecutor worker that parked it may
# take one heartbeat interval ([workers] min_heartbeat_interval, 5 s) to report that it exited,
# and a report that comes after the answer has queued the task again is taken for a task that
# ended behind the scheduler's back ("Executor reported ... finished with state success, but the
# task instance's state attribute is queued"; upstream: apache/airflow#72716, #71580). Seen in
# `make test` on 2026-12-05: the worker reported 5.18 s after parking, the browser answered
# after 5.16 s, and the approve task failed. A person answers later; a test waits this long.
ANSWER_SETTLE_S = 6


def wait_for_input(rest: Rest, dag_id: str, run_id: str, task_id: str = "approve", *,
                   settle: float = ANSWER_SETTLE_S, timeout: float = 180) -> client.TaskInstanceResponse:
    """Until ``task_id`` awaits input, and has for ``settle`` s in a row (ANSWER_SETTLE_S: to be
    answered); fails at once if the run ends first. ``settle=0`` for a test that does not answer."""
    since: list[float] = []

    def waiting() -> client.TaskInstanceResponse | None:
        ti = rest.tis.get_task_instance(dag_id, run_id, task_id)
        if ti.state == "awaiting_input":
            since[:] = since or [time.monotonic()]
            return ti if time.monotonic() - since[0] >= settle else None
        since.clear()
        run = rest.run(dag_id, run_id)
        if run.state in TERMINAL_RUN_STATES:
            raise AirflowError(f"{dag_id} {run_id} ended {run.state.value} before {task_id} waited for input: "
                               f"{rest.task_states(dag_id, run_id)}")
        return None

    return rest.wait(f"{dag_id}.{task_id} to await input for {settle} s", waiting, timeout=timeout + settle)


def hitl_detail(rest: Rest, dag_id: str, run_id: str, task_id: str = "approve") -> client.HITLDetail:
    return rest.tis.get_hitl_detail(dag_id, run_id, task_id, -1)


def answer(rest: Rest, dag_id: str, run_id: str, choice: str, task_id: str = "approve") -> client.HITLDetailResponse:
    """Press ``choice`` on the approval, as the Required Actions page does."""
    payload = client.UpdateHITLDetailPayload(chosen_options=[choice], params_input={})
    return rest.tis.update_hitl_detail(dag_id, run_id, task_id, -1, payload)


def tries(rest: Rest, dag_id: str, run_id: str, task_id: str, map_index: int) -> list:
    """Every try of one mapped task instance, the current one too, in order."""
    found = rest.tis.get_mapped_task_instance_tries(dag_id, run_id, task_id, map_index).task_instances
    return sorted(found, key=lambda t: t.try_number)
