"""A real, running Airflow for end-to-end tests: its components as subprocesses, on 127.0.0.1.

``airflow standalone`` itself is not used: it starts the scheduler and the triggerer with
their log servers, which listen on every address (``host=""``) on the fixed ports 8793 and
8794 and cannot be told otherwise. Instead the four components it would start are started
one by one, the same way, in a new temporary AIRFLOW_HOME with a SQLite metadata DB:

- ``api-server --host 127.0.0.1 --port <free port>`` (the only listening socket);
- ``scheduler --skip-serve-logs`` (LocalExecutor), ``triggerer --skip-serve-logs`` and
  ``dag-processor``.

Each runs in its own session (process group), so :meth:`Airflow.stop` can kill it and every
child it forked (LocalExecutor workers, task supervisors, gunicorn/uvicorn workers) with
``os.killpg``. Every wait is bounded. The output of each component goes to
``<log_dir>/<component>.log``; :meth:`Airflow.diagnostics` returns their tails and the logs
of the failed tasks.

The environment is built from scratch from ``os.environ`` minus every ``AIRFLOW*`` variable
(tests/airflow/conftest.py sets some for the in-process tests) and minus the project's own
``NOVA_*`` variables; see :func:`airflow_env`.

The REST API is used as a real user would: ``POST /auth/token`` with a user of the simple
auth manager whose password the test wrote itself, then a bearer token. API calls retry
(bounded) on connection errors and 5xx: on SQLite a request can meet a transient "database is
locked" while the scheduler writes.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil

REPO = Path(__file__).resolve().parents[2]
LOCALHOST = "127.0.0.1"
OPERATOR = "e2e-operator"
COMPONENTS = {
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer", "--skip-serve-logs"],
    "api-server": ["api-server", "--host", LOCALHOST],  # --port added at start
}
TERMINAL_RUN_STATES = {"success", "failed"}
# How long stop() lets the components shut down after SIGTERM before SIGKILL (the triggerer
# takes about 10 s to clean up its triggers).
STOP_GRACE_S = 15

T = TypeVar("T")


class AirflowError(AssertionError):
    """Something in the running Airflow did not happen as expected (message says what)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bind to port 0, read it back, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def airflow_executable() -> str:
    """The ``airflow`` script of the Python running the tests (.venv/bin/airflow)."""
    candidate = Path(sys.executable).with_name("airflow")
    if not candidate.exists():
        raise AirflowError(f"no airflow script next to {sys.executable}: run `make install`")
    return str(candidate)


def airflow_env(
    home: Path, *, api_port: int, extra: Mapping[str, str], base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The components' environment: ``base`` (os.environ) without AIRFLOW*/NOVA_*, plus ours.

    Only keys that exist in Airflow 3.3.2's ``config_templates/config.yml``.
    """
    base = os.environ if base is None else base
    env = {k: v for k, v in base.items() if not k.startswith(("AIRFLOW", "NOVA_"))}
    bin_dir = str(Path(airflow_executable()).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            # Paused at creation: the folder also holds nova_flavor_drift_check, scheduled
            # nightly, which would otherwise run at once (catchup=False runs the latest
            # interval) against the same database. The tests unpause what they run.
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            # Secrets every component must share (otherwise each would make its own).
            "AIRFLOW__CORE__FERNET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),  # >= 64 bytes for HS512
            # The API server, on 127.0.0.1 only; task workers reach its Execution API there
            # (the default would be http://localhost:8080/execution/).
            "AIRFLOW__API__HOST": LOCALHOST,
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{LOCALHOST}:{api_port}/execution/",
            # Simple auth manager with one admin whose password the test writes itself.
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{OPERATOR}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
            # No other listening socket.
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            # Faster and lighter: look for DAG file changes often, one parser, short idle sleeps.
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
        }
    )
    env.update(extra)
    return env


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


class Api:
    """The REST API with a bearer token; bounded retries on connection errors and 5xx."""

    def __init__(self, base_url: str, *, tries: int = 6, timeout: float = 20) -> None:
        self.client = httpx.Client(base_url=base_url, timeout=timeout)
        self.tries = tries
        self.transient: list[str] = []  # the retried failures, for the report

    def close(self) -> None:
        self.client.close()

    def login(self, username: str, password: str) -> None:
        response = self.request("POST", "/auth/token", json={"username": username, "password": password})
        if response.status_code != 201:
            raise AirflowError(f"POST /auth/token: {response.status_code} {response.text}")
        self.client.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call, retried (bounded, with back-off) while the answer is a 5xx or no answer."""
        for attempt in range(1, self.tries + 1):
            try:
                response = self.client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                problem = f"{method} {path}: {type(exc).__name__}: {exc}"
            else:
                if response.status_code < 500:
                    return response
                problem = f"{method} {path}: {response.status_code} {response.text[:300]}"
                if attempt == self.tries:
                    return response
            if attempt == self.tries:
                raise AirflowError(f"{problem} (after {self.tries} tries)")
            self.transient.append(problem)
            time.sleep(min(0.5 * 2 ** (attempt - 1), 4))
        raise AssertionError("unreachable")

    def get_json(self, path: str, *, ok: Iterable[int] = (200,), **kwargs: Any) -> Any | None:
        """GET ``path``: its JSON when the status is in ``ok``, None on 404; AirflowError otherwise."""
        response = self.request("GET", path, **kwargs)
        if response.status_code in tuple(ok):
            return response.json()
        if response.status_code == 404:
            return None
        raise AirflowError(f"GET {path}: {response.status_code} {response.text[:500]}")


class Airflow:
    """Airflow's components started in ``home``; use as a context manager (always stopped)."""

    def __init__(self, home: Path, log_dir: Path, *, env: Mapping[str, str] | None = None) -> None:
        self.home, self.log_dir = home, log_dir
        self.api_port = free_port()
        self.password = secrets.token_urlsafe(16)
        self.env = airflow_env(home, api_port=self.api_port, extra=env or {})
        self.base_url = f"http://{LOCALHOST}:{self.api_port}"
        self.api = Api(self.base_url)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.timings: dict[str, float] = {}
        self.killed: list[str] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Airflow:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, *, timeout: float = 120) -> None:
        """``db migrate``, start the components, wait until healthy and log in."""
        started = time.monotonic()
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        passwords = self.home / "passwords.json"
        passwords.write_text(json.dumps({OPERATOR: self.password}) + "\n")
        passwords.chmod(0o600)

        self._migrate(timeout=timeout)
        self.timings["db_migrate_s"] = time.monotonic() - started
        for name, args in COMPONENTS.items():
            if name == "api-server":
                args = [*args, "--port", str(self.api_port)]
            self._spawn(name, args)
        wait_for("the components to report healthy", self._healthy, timeout=timeout, also=self.check_alive)
        self.api.login(OPERATOR, self.password)
        self.timings["start_s"] = time.monotonic() - started

    def _migrate(self, *, timeout: float) -> None:
        log_file = self.log_dir / "db-migrate.log"
        with open(log_file, "wb") as out:
            process = subprocess.Popen(
                [airflow_executable(), "db", "migrate"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.home, env=self.env, start_new_session=True,
            )
            self.processes["db-migrate"] = process
            try:
                code = process.wait(timeout)
            except subprocess.TimeoutExpired:
                message = f"airflow db migrate took more than {timeout} s"
                raise AirflowError(f"{message}\n{self.tail('db-migrate')}") from None
        if code != 0:
            raise AirflowError(f"airflow db migrate exited {code}\n{self.tail('db-migrate')}")
        del self.processes["db-migrate"]

    def _spawn(self, name: str, args: list[str]) -> None:
        with open(self.log_dir / f"{name}.log", "wb") as out:
            self.processes[name] = subprocess.Popen(
                [airflow_executable(), *args],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.home, env=self.env, start_new_session=True,
            )

    def stop(self) -> list[str]:
        """SIGTERM every component, SIGKILL its whole process group after a grace period.

        SIGTERM goes to the component's main process only, as ``airflow standalone`` does: it
        stops its own children (LocalExecutor workers, API server workers) in order.

        Returns the processes of those groups still alive afterwards (should be none);
        ``self.killed`` names the components that needed SIGKILL.
        """
        started = time.monotonic()
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for process in self.processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.killed = [name for name, process in self.processes.items() if process.poll() is None]
        for process in self.processes.values():
            _signal_group(process, signal.SIGKILL)  # children that outlived their leader too
        for process in self.processes.values():
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.api.close()
        # A killed process can take a moment to be gone (and be reaped by init).
        end = time.monotonic() + 10
        while (survivors := self.group_members()) and time.monotonic() < end:
            time.sleep(0.2)
        self.timings["stop_s"] = time.monotonic() - started
        return _describe(survivors)

    def group_members(self) -> list[psutil.Process]:
        """Every live process in the components' process groups (their children included)."""
        groups = {process.pid for process in self.processes.values()}
        members = []
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) in groups and proc.status() != psutil.STATUS_ZOMBIE:
                    members.append(proc)
            except (ProcessLookupError, psutil.Error):
                pass
        return members

    def listening(self) -> set[tuple[str, int]]:
        """The (address, port) of every listening TCP socket of the components and their children."""
        found = set()
        for proc in self.group_members():
            try:
                connections = proc.net_connections(kind="tcp")
            except psutil.Error:
                continue
            found |= {(c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN}
        return found

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise AirflowError(f"airflow {name} exited with {process.returncode}\n{self.tail(name)}")

    def _healthy(self) -> dict | None:
        try:
            response = httpx.get(f"{self.base_url}/api/v2/monitor/health", timeout=5)
        except httpx.TransportError:
            return None
        if response.status_code != 200:
            return None
        health = response.json()
        components = ("metadatabase", "scheduler", "triggerer", "dag_processor")
        if all((health.get(c) or {}).get("status") == "healthy" for c in components):
            return health
        return None

    # -- DAGs and runs ----------------------------------------------------------------------

    def wait_for_dags(self, dag_ids: Iterable[str], *, timeout: float = 90) -> dict[str, dict]:
        """Wait until every DAG is parsed and there is no import error; return the DAGs."""
        dag_ids = list(dag_ids)

        def parsed() -> dict[str, dict] | None:
            errors = self.api.get_json("/api/v2/importErrors")
            if errors and errors["total_entries"]:
                raise AirflowError(f"DAG import errors: {json.dumps(errors['import_errors'], indent=1)}")
            dags = {dag_id: self.api.get_json(f"/api/v2/dags/{dag_id}") for dag_id in dag_ids}
            return dags if all(dags.values()) else None

        return wait_for(f"DAGs {dag_ids} to be parsed", parsed, timeout=timeout, also=self.check_alive)

    def unpause(self, dag_id: str) -> dict:
        path = f"/api/v2/dags/{dag_id}"
        response = self.api.request("PATCH", path, json={"is_paused": False})
        if response.status_code != 200 or response.json()["is_paused"]:
            raise AirflowError(f"PATCH {path}: {response.status_code} {response.text}")
        return response.json()

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        """Trigger a run with ``conf``; return its run id.

        The run id is chosen here, so a retry after a 5xx whose first try did commit meets
        409 for the same run instead of starting a second one.
        """
        run_id = f"e2e__{dag_id}__{secrets.token_hex(4)}"
        path = f"/api/v2/dags/{dag_id}/dagRuns"
        body = {"dag_run_id": run_id, "logical_date": None, "conf": conf}
        retried_before = len(self.api.transient)
        response = self.api.request("POST", path, json=body)
        retried = len(self.api.transient) > retried_before
        if response.status_code == 409 and retried and self.run(dag_id, run_id):
            return run_id
        if response.status_code != 200:
            raise AirflowError(f"POST {path}: {response.status_code} {response.text}")
        return response.json()["dag_run_id"]

    def run(self, dag_id: str, run_id: str) -> dict | None:
        return self.api.get_json(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")

    def task_instance(self, dag_id: str, run_id: str, task_id: str) -> dict | None:
        return self.api.get_json(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """task_id (task_id[map_index] when mapped) -> state."""
        data = self.api.get_json(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 1000})
        states = {}
        for ti in (data or {}).get("task_instances", []):
            key = ti["task_id"] if ti["map_index"] < 0 else f"{ti['task_id']}[{ti['map_index']}]"
            states[key] = ti["state"]
        return dict(sorted(states.items()))

    def wait_for_input(
        self, dag_id: str, run_id: str, task_id: str, *, settle: float, timeout: float = 120
    ) -> dict:
        """Wait until ``task_id`` is awaiting input, and has been for ``settle`` s in a row.

        Answering the very moment the task parks was seen to fail it under LocalExecutor (the
        worker that parked it lingers a few seconds), hence ``settle``.
        """
        since: list[float] = []

        def waiting() -> dict | None:
            ti = self.task_instance(dag_id, run_id, task_id)
            if ti is not None and ti["state"] == "awaiting_input":
                since[:] = since or [time.monotonic()]
                return ti if time.monotonic() - since[0] >= settle else None
            since.clear()
            run = self.run(dag_id, run_id)
            if run and run["state"] in TERMINAL_RUN_STATES:
                raise AirflowError(
                    f"{dag_id} {run_id} ended {run['state']} before {task_id} waited for input: "
                    f"{self.task_states(dag_id, run_id)}"
                )
            return None

        return wait_for(
            f"{dag_id}.{task_id} to await input for {settle} s", waiting,
            timeout=timeout + settle, interval=1, also=self.check_alive,
        )

    def answer(self, dag_id: str, run_id: str, task_id: str, choice: str) -> dict:
        """PATCH the HITL response; a retry that finds it already answered with ``choice`` is fine."""
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/-1/hitlDetails"
        retried_before = len(self.api.transient)
        response = self.api.request("PATCH", path, json={"chosen_options": [choice], "params_input": {}})
        if response.status_code == 409 and len(self.api.transient) > retried_before:
            detail = self.api.get_json(path)
            if detail and detail.get("response_received") and detail.get("chosen_options") == [choice]:
                return detail
        if response.status_code != 200:
            raise AirflowError(f"PATCH {path}: {response.status_code} {response.text}")
        return response.json()

    def wait_for_run(self, dag_id: str, run_id: str, *, timeout: float = 120) -> dict:
        """Wait until the run has ended (success or failed); return it."""

        def ended() -> dict | None:
            run = self.run(dag_id, run_id)
            return run if run and run["state"] in TERMINAL_RUN_STATES else None

        return wait_for(f"{dag_id} {run_id} to end", ended, timeout=timeout, also=self.check_alive)

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}"
        entry = self.api.get_json(path)
        if entry is None:
            raise AirflowError(f"no XCom {key!r} for {dag_id}.{task_id} in {run_id}")
        value = entry["value"]
        return json.loads(value) if isinstance(value, str) else value

    # -- diagnostics ------------------------------------------------------------------------

    def output(self, name: str) -> str:
        """Everything a component has printed so far."""
        path = self.log_dir / f"{name}.log"
        return path.read_bytes().decode("utf-8", "replace") if path.exists() else ""

    def tail(self, name: str, lines: int = 60) -> str:
        text = self.output(name).splitlines()[-lines:]
        return f"--- {name} ({self.log_dir / name}.log), last {len(text)} lines ---\n" + "\n".join(text)

    def task_logs(self, lines: int = 80) -> str:
        """The tail of every task log that mentions an error (files under AIRFLOW_HOME/logs)."""
        out = []
        for path in sorted((self.home / "logs").rglob("attempt=*.log")):
            text = path.read_bytes().decode("utf-8", "replace")
            if '"level":"error"' in text or "Traceback" in text or "ERROR" in text:
                tail = "\n".join(text.splitlines()[-lines:])
                out.append(f"--- task log {path.relative_to(self.home)} ---\n{tail}")
        return "\n".join(out) or "--- no task log with an error ---"

    def diagnostics(self) -> str:
        parts = [self.tail(name) for name in ("db-migrate", *COMPONENTS) if (self.log_dir / f"{name}.log").exists()]
        parts.append(self.task_logs())
        if self.api.transient:
            parts.append("--- retried API calls ---\n" + "\n".join(self.api.transient))
        return "\n".join(parts)


def _describe(processes: Iterable[psutil.Process]) -> list[str]:
    """pid, state and command line of each process still there."""
    found = []
    for proc in processes:
        try:
            found.append(f"{proc.pid} [{proc.status()}] {' '.join(proc.cmdline())[:200]}")
        except psutil.Error:
            pass
    return found


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the process group ``process`` leads (start_new_session=True made pgid == pid)."""
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
