"""A running Airflow's REST API through the official client (apache-airflow-client, pinned with Airflow).

What ``make demo`` (scripts/demo_airflow.py) and the tests share; the launcher
(scripts/local_airflow.py) hands out a :class:`Rest` once it has logged in. The client is
generated from Airflow's OpenAPI document: paths, bodies and answers are its models, not
hand-written JSON. Only the login is not in that document (``POST /auth/token`` belongs to
the auth manager): :func:`login` is the one hand-written call.

Calls are retried (bounded, with back-off) on connection errors and 5xx answers: on SQLite
a request can meet a transient "database is locked" while the scheduler writes. The two
POSTs that change something are safe to retry: a run's id is chosen here, so a retried
trigger whose first try did commit meets 409 for that same run, which :meth:`Rest.trigger`
accepts; likewise an approval already answered with the same choice.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from typing import Any, TypeVar

import airflow_client.client as client
import httpx
from airflow_client.client.exceptions import ConflictException, NotFoundException
from urllib3 import Timeout
from urllib3.util.retry import Retry

T = TypeVar("T")
TERMINAL_RUN_STATES = {"success", "failed"}
RETRY = Retry(total=6, backoff_factor=0.5, backoff_max=4, status_forcelist=(500, 502, 503, 504),
              allowed_methods=None, raise_on_status=False)
TIMEOUT = Timeout(connect=10, read=30)


class AirflowError(AssertionError):
    """Something in the running Airflow did not happen as expected (message says what)."""


def wait_for(
    what: str,
    check: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 1.0,
    also: Callable[[], None] | None = None,
) -> T:
    """Call ``check`` until it returns something not None; AirflowError after ``timeout`` s.

    ``also`` runs before each try (e.g. "are the components still alive?") and may raise.
    """
    deadline = time.monotonic() + timeout
    while True:
        if also is not None:
            also()
        result = check()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise AirflowError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def login(base_url: str, username: str, password: str) -> str:
    """A bearer token for ``username`` (simple auth manager: ``POST /auth/token``)."""
    transport = httpx.HTTPTransport(retries=3)  # connection errors only
    with httpx.Client(base_url=base_url, timeout=20, transport=transport) as http:
        response = http.post("/auth/token", json={"username": username, "password": password})
    if response.status_code != 201:
        raise AirflowError(f"POST /auth/token as {username}: {response.status_code} {response.text}")
    return response.json()["access_token"]


class Rest:
    """The REST API of the Airflow at ``base_url`` as the user whose bearer ``token`` it is.

    ``check`` runs before each poll of a wait (the launcher's "are the components alive?").
    """

    def __init__(self, base_url: str, token: str, *, run_prefix: str = "e2e",
                 check: Callable[[], None] | None = None) -> None:
        configuration = client.Configuration(host=base_url, access_token=token, retries=RETRY)
        self.base_url = base_url
        self.api_client = client.ApiClient(configuration)
        # The client sets no timeout of its own: without one a stuck answer would hang a wait.
        self.api_client.rest_client.pool_manager.connection_pool_kw["timeout"] = TIMEOUT
        self.dags = client.DAGApi(self.api_client)
        self.runs = client.DagRunApi(self.api_client)
        self.tis = client.TaskInstanceApi(self.api_client)
        self.xcoms = client.XComApi(self.api_client)
        self.connections = client.ConnectionApi(self.api_client)
        self.variables = client.VariableApi(self.api_client)
        self.import_errors = client.ImportErrorApi(self.api_client)
        self.run_prefix = run_prefix
        self.check = check

    def close(self) -> None:
        self.api_client.rest_client.pool_manager.clear()  # the client has no close() of its own

    def __enter__(self) -> Rest:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def wait(self, what: str, check: Callable[[], T | None], *, timeout: float, interval: float = 1.0) -> T:
        return wait_for(what, check, timeout=timeout, interval=interval, also=self.check)

    # -- DAGs, connections ----------------------------------------------------------------------

    def wait_for_dags(self, *dag_ids: str, timeout: float = 120) -> None:
        """Until every DAG is parsed; AirflowError at once on an import error."""

        def parsed() -> bool | None:
            errors = self.import_errors.get_import_errors()
            if errors.total_entries:
                problems = [{"file": e.filename, "error": e.stack_trace} for e in errors.import_errors]
                raise AirflowError(f"DAG import errors: {json.dumps(problems, indent=1)}")
            try:
                for dag_id in dag_ids:
                    self.dags.get_dag(dag_id)
            except NotFoundException:
                return None
            return True

        self.wait(f"DAGs {list(dag_ids)} to be parsed", parsed, timeout=timeout)

    def unpause(self, dag_id: str) -> None:
        if self.dags.patch_dag(dag_id, client.DAGPatchBody(is_paused=False)).is_paused:
            raise AirflowError(f"{dag_id} is still paused after PATCH is_paused=false")

    def pause(self, dag_id: str) -> None:
        if not self.dags.patch_dag(dag_id, client.DAGPatchBody(is_paused=True)).is_paused:
            raise AirflowError(f"{dag_id} is still unpaused after PATCH is_paused=true")

    def replace_connection(self, body: client.ConnectionBody) -> None:
        """Create the connection ``body`` names, replacing one of the same id."""
        try:
            self.connections.delete_connection(body.connection_id)
        except NotFoundException:
            pass
        self.connections.post_connection(body)

    # -- runs -----------------------------------------------------------------------------------

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        """A new run of ``dag_id`` with ``conf``; its run id."""
        run_id = f"{self.run_prefix}__{dag_id}__{secrets.token_hex(4)}"
        body = client.TriggerDAGRunPostBody(dag_run_id=run_id, logical_date=None, conf=conf)
        try:
            return self.runs.trigger_dag_run(dag_id, body).dag_run_id
        except ConflictException:
            self.runs.get_dag_run(dag_id, run_id)  # a retried try that had committed: our run
            return run_id

    def run(self, dag_id: str, run_id: str) -> client.DAGRunResponse:
        return self.runs.get_dag_run(dag_id, run_id)

    def active_runs(self, dag_id: str) -> list[client.DAGRunResponse]:
        """The runs of ``dag_id`` that have not ended (queued or running)."""
        return self.runs.get_dag_runs(dag_id, state=["queued", "running"], limit=100).dag_runs

    def fail_run(self, dag_id: str, run_id: str) -> client.DAGRunResponse:
        """Mark a run failed (what the UI's "Mark run as failed" does)."""
        return self.runs.patch_dag_run(dag_id, run_id, client.DAGRunPatchBody(state="failed"))

    def wait_for_run(self, dag_id: str, run_id: str, *, timeout: float = 180) -> client.DAGRunResponse:
        """Until the run has ended (success or failed); the run."""

        def ended() -> client.DAGRunResponse | None:
            run = self.run(dag_id, run_id)
            return run if run.state in TERMINAL_RUN_STATES else None

        return self.wait(f"{dag_id} {run_id} to end", ended, timeout=timeout)

    # -- task instances, XComs ------------------------------------------------------------------

    def task_instances(self, dag_id: str, run_id: str) -> list[client.TaskInstanceResponse]:
        return self.tis.get_task_instances(dag_id, run_id, limit=1000).task_instances

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """task_id (task_id[map_index] when mapped) -> state."""
        return dict(sorted(
            (ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]", ti.state and ti.state.value)
            for ti in self.task_instances(dag_id, run_id)
        ))

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        try:
            value = self.xcoms.get_xcom_entry(dag_id, task_id, run_id, key).actual_instance.value
        except NotFoundException:
            raise AirflowError(f"no XCom {key!r} for {dag_id}.{task_id} in {run_id}") from None
        return json.loads(value) if isinstance(value, str) else value
