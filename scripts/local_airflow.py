"""A real, running Airflow on this machine: its components as subprocesses, on 127.0.0.1.

Used by ``make demo`` (scripts/demo_airflow.py, AIRFLOW_HOME ``.demo/airflow``, left running)
and by the end-to-end tests (tests/airflow/, a temporary AIRFLOW_HOME, stopped after the test).

``airflow standalone`` itself is not used: it starts the scheduler and the triggerer with
their log servers, which listen on every address (``host=""``) on the fixed ports 8793 and
8794 and cannot be told otherwise. Instead the four components it would start are started
one by one, the same way, in AIRFLOW_HOME with a SQLite metadata DB:

- ``api-server --host 127.0.0.1 --port <port>`` (the only listening socket);
- ``scheduler --skip-serve-logs`` (LocalExecutor), ``triggerer --skip-serve-logs`` and
  ``dag-processor``.

Each runs in its own session (process group), detached from the caller: no terminal, its
output appended to ``<log_dir>/<component>.log``. Their pids (and start times, so that a
recycled pid is never mistaken for ours: counted from boot, which a step of the wall clock,
as after a virtual machine is paused, does not move) are recorded in ``<home>/pids.json`` as
they start,
so :meth:`Airflow.stop` can stop them from another process too (``make stop``): SIGTERM to
each component, then SIGKILL to every process left in their process groups (LocalExecutor
workers, task supervisors, API server workers). Every wait is bounded.
:meth:`Airflow.diagnostics` returns the components' log tails and the logs of failed tasks.

What must stay the same across restarts is created once in AIRFLOW_HOME, mode 0600:
``secrets.json`` (the Fernet key, which encrypts Connection passwords in the metadata DB, and
the JWT secret) and ``passwords.json`` (the simple auth manager's user and password).

The environment is built from scratch from ``os.environ`` minus every ``AIRFLOW*`` variable
(tests/airflow/conftest.py sets some for the in-process tests) and minus the project's own
``NOVA_*`` variables; see :func:`airflow_env`.

Once healthy, the launcher logs in as a real user would (``POST /auth/token`` with the
user's password) and hands out the REST API as that user: :attr:`Airflow.rest`, the official
client's calls (scripts/airflow_rest.py).
"""

from __future__ import annotations

import base64
import datetime
import errno
import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import airflow_client.client as client
import psutil
import urllib3
from airflow_client.client.exceptions import ApiException
from airflow_rest import AirflowError, Rest, login, wait_for

REPO = Path(__file__).resolve().parents[1]
LOCALHOST = "127.0.0.1"
OPERATOR = "e2e-operator"
COMPONENTS = {
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer", "--skip-serve-logs"],
    "api-server": ["api-server", "--host", LOCALHOST],  # --port added at start
}
# How long stop() lets the components shut down after SIGTERM before SIGKILL (the triggerer
# takes about 10 s to clean up its triggers).
STOP_GRACE_S = 15
STATE_FILE = "pids.json"
SECRETS_FILE = "secrets.json"
PASSWORDS_FILE = "passwords.json"


class PortInUse(AirflowError):
    """The API server's port is taken by a process that is not this Airflow's."""

    def __init__(self, port: int, owner: str) -> None:
        super().__init__(f"port {port} on {LOCALHOST} is already in use by {owner}")
        self.port, self.owner = port, owner


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bind to port 0, read it back, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def port_owner(port: int) -> str | None:
    """None when ``port`` can be bound on 127.0.0.1 now; else who holds it, as far as we can see."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As uvicorn binds: a socket of ours in TIME_WAIT does not make the port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOCALHOST, port))
            return None
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return f"nothing we can bind to ({exc})"
    try:
        listeners = [
            c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        ]
    except psutil.Error:
        listeners = []
    for conn in listeners:
        if conn.pid:
            try:
                return f"pid {conn.pid} ({' '.join(psutil.Process(conn.pid).cmdline())[:120]})"
            except psutil.Error:
                return f"pid {conn.pid}"
    return "another program"


def airflow_executable() -> str:
    """The ``airflow`` script of the Python running this (.venv/bin/airflow)."""
    candidate = Path(sys.executable).with_name("airflow")
    if not candidate.exists():
        raise AirflowError(f"no airflow script next to {sys.executable}: run `make install`")
    return str(candidate)


def new_keys() -> dict[str, str]:
    """The secrets every component must share (otherwise each would make its own)."""
    return {
        "fernet_key": base64.urlsafe_b64encode(os.urandom(32)).decode(),
        "jwt_secret": secrets.token_urlsafe(64),  # >= 64 bytes for HS512
    }


def airflow_env(
    home: Path,
    *,
    api_port: int,
    extra: Mapping[str, str],
    base: Mapping[str, str] | None = None,
    keys: Mapping[str, str] | None = None,
    username: str = OPERATOR,
) -> dict[str, str]:
    """The components' environment: ``base`` (os.environ) without AIRFLOW*/NOVA_*, plus ours.

    Only keys that exist in Airflow 3.3.2's ``config_templates/config.yml``.
    """
    base = os.environ if base is None else base
    keys = new_keys() if keys is None else keys
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
            # interval) against the same database. Callers unpause what they run.
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__FERNET_KEY": keys["fernet_key"],
            "AIRFLOW__API_AUTH__JWT_SECRET": keys["jwt_secret"],
            # The API server, on 127.0.0.1 only; task workers reach its Execution API there
            # (the default would be http://localhost:8080/execution/).
            "AIRFLOW__API__HOST": LOCALHOST,
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{LOCALHOST}:{api_port}/execution/",
            # A task's calls to the Execution API wait up to 30 s, not 5: on a loaded machine
            # (CI, a laptop running the tests) the API server answers late, and a task that
            # gives up fails a run that nothing was wrong with.
            "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "30",
            # Simple auth manager with one admin whose password is in passwords.json.
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{username}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / PASSWORDS_FILE),
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


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_private(path: Path, data: Any) -> None:
    """Write JSON to ``path`` with mode 0600 from the start (then rename over the old one)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


class Airflow:
    """Airflow's components in ``home`` (log files in ``log_dir``), listening on ``port``.

    As a context manager it is always stopped on exit (the tests). ``make demo`` calls
    :meth:`start` and leaves it running; :meth:`status` tells a later call whether the one
    recorded in ``home`` is still running, healthy and started with the same settings.
    """

    def __init__(
        self,
        home: Path,
        log_dir: Path | None = None,
        *,
        port: int | None = None,
        username: str = OPERATOR,
        env: Mapping[str, str] | None = None,
        run_prefix: str = "e2e",
        workers: Mapping[str, Sequence[str]] | None = None,
        worker_env: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.home = Path(home).absolute()
        self.log_dir = Path(log_dir).absolute() if log_dir is not None else self.home / "logs"
        self.api_port = port if port is not None else free_port()
        self.username = username
        self.run_prefix = run_prefix
        # Read, not written, here: `stop` must not create anything.
        self.keys = _read_json(self.home / SECRETS_FILE) or new_keys()
        self.password = (_read_json(self.home / PASSWORDS_FILE) or {}).get(username) or secrets.token_urlsafe(16)
        self.env = airflow_env(self.home, api_port=self.api_port, extra=env or {}, keys=self.keys, username=username)
        # More components started after the four (CeleryExecutor's ``celery worker``s), each
        # with its own additions to ``env``.
        self.components = {**COMPONENTS, **{name: list(args) for name, args in (workers or {}).items()}}
        self.component_env = {name: dict(extra) for name, extra in (worker_env or {}).items()}
        self.base_url = f"http://{LOCALHOST}:{self.api_port}"
        # The REST API as ``username``, once start() or status() has logged in; the health
        # check needs no login (and is polled until it answers: no retries of its own).
        self.rest: Rest | None = None
        self.monitor = client.MonitorApi(client.ApiClient(client.Configuration(host=self.base_url, retries=0)))
        # The components this object started (their Popen, to reap them) ...
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        # ... and every one recorded in pids.json, by us or by an earlier process.
        self.records: dict[str, dict[str, float]] = {}
        self.timings: dict[str, float] = {}
        self.stopped: list[str] = []
        self.killed: list[str] = []

    # -- recorded state ----------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.home / STATE_FILE

    def config_digest(self) -> str:
        """What a running Airflow must have been started with for us to reuse it."""
        settings = {k: v for k, v in self.env.items() if k.startswith(("AIRFLOW", "NOVA_"))}
        settings["password"] = self.password
        blob = json.dumps(
            {"env": settings, "components": self.components, "port": self.api_port, "airflow": airflow_executable()},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def recorded(self) -> dict[str, Any] | None:
        """The content of pids.json (None when there is none)."""
        state = _read_json(self.state_file)
        return state if isinstance(state, dict) and isinstance(state.get("components"), dict) else None

    def _save_state(self) -> None:
        _write_private(
            self.state_file,
            {
                "port": self.api_port,
                "config": self.config_digest(),
                "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "components": self.records,
            },
        )

    def _record(self, name: str, process: subprocess.Popen[bytes]) -> None:
        self.processes[name] = process
        # Only the start since boot: "create_time" is read from records of earlier launchers.
        self.records[name] = {"pid": process.pid, "started": _started_since_boot(process.pid)}
        self._save_state()

    def _load_records(self) -> None:
        state = self.recorded()
        for name, record in (state or {}).get("components", {}).items():
            if isinstance(record, dict) and isinstance(record.get("pid"), int):
                self.records.setdefault(name, {"pid": record["pid"], "create_time": record.get("create_time", 0.0),
                                               "started": record.get("started")})

    def status(self) -> tuple[bool, str]:
        """(True, how long it has run) if the Airflow recorded in ``home`` can be reused; else (False, why not)."""
        state = self.recorded()
        if state is None:
            return False, "none is running"
        self._load_records()
        if state.get("config") != self.config_digest():
            return False, "it was started with other settings (port, paths or password)"
        missing = set(self.components) - set(self.records)
        if missing:
            return False, f"{', '.join(sorted(missing))} never started"
        for name in self.components:
            if _live_process(self.records[name]) is None:
                return False, f"its {name} (pid {self.records[name]['pid']}) is not running"
        if self._healthy() is None:
            return False, "it does not report healthy"
        try:
            self._log_in()
        except AirflowError as exc:
            return False, f"cannot log in: {exc}"
        return True, f"running since {state.get('started_at')}"

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
        """``db migrate``, start the components, wait until healthy and log in.

        PortInUse if the port is taken before anything starts.
        """
        started = time.monotonic()
        owner = port_owner(self.api_port)
        if owner is not None:
            raise PortInUse(self.api_port, owner)
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if not (self.home / SECRETS_FILE).exists():
            _write_private(self.home / SECRETS_FILE, self.keys)
        passwords = _read_json(self.home / PASSWORDS_FILE) or {}
        if passwords.get(self.username) != self.password:
            _write_private(self.home / PASSWORDS_FILE, {**passwords, self.username: self.password})

        self._migrate(timeout=timeout)
        self.timings["db_migrate_s"] = time.monotonic() - started
        for name, args in self.components.items():
            if name == "api-server":
                args = [*args, "--port", str(self.api_port)]
            self._spawn(name, args)
        wait_for("the components to report healthy", self._healthy, timeout=timeout, also=self.check_alive)
        self._log_in()
        self.timings["start_s"] = time.monotonic() - started

    def _log_in(self) -> None:
        token = login(self.base_url, self.username, self.password)
        self.rest = Rest(self.base_url, token, run_prefix=self.run_prefix, check=self.check_alive)

    def _migrate(self, *, timeout: float) -> None:
        process = self._spawn("db-migrate", ["db", "migrate"])
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            message = f"airflow db migrate took more than {timeout} s"
            raise AirflowError(f"{message}\n{self.tail('db-migrate')}") from None
        if code != 0:
            raise AirflowError(f"airflow db migrate exited {code}\n{self.tail('db-migrate')}")
        del self.processes["db-migrate"], self.records["db-migrate"]
        self._save_state()

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        """Start ``airflow <args>`` in a new session, output appended to ``<log_dir>/<name>.log``."""
        with open(self.log_dir / f"{name}.log", "ab") as out:
            now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            out.write(f"=== {now} airflow {' '.join(args)} ===\n".encode())
            out.flush()
            process = subprocess.Popen(
                [airflow_executable(), *args],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.home, env={**self.env, **self.component_env.get(name, {})}, start_new_session=True,
            )
        self._record(name, process)
        return process

    def stop(self) -> list[str]:
        """SIGTERM every component, SIGKILL its whole process group after a grace period.

        Works on the components this object started and on those recorded in pids.json by
        an earlier process. SIGTERM goes to the component's main process only, as ``airflow
        standalone`` does: it stops its own children (LocalExecutor workers, API server
        workers) in order. pids.json is removed when nothing is left.

        Returns the processes of those groups still alive afterwards (should be none);
        ``self.stopped`` names the components that were running, ``self.killed`` those that
        needed SIGKILL.
        """
        started = time.monotonic()
        self._load_records()
        leaders = {name: _live_process(record) for name, record in self.records.items()}
        self.stopped = [name for name, proc in leaders.items() if proc is not None]
        for proc in leaders.values():
            if proc is not None:
                _quietly(proc.terminate)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and any(self._alive(name, proc) for name, proc in leaders.items()):
            time.sleep(0.2)
        self.killed = [name for name, proc in leaders.items() if self._alive(name, proc)]
        for member in self.group_members():  # children that outlived their leader too
            _quietly(member.kill)
        for process in self.processes.values():
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if self.rest is not None:
            self.rest.close()
            self.rest = None
        # A killed process can take a moment to be gone (and be reaped by init).
        end = time.monotonic() + 10
        while (survivors := self.group_members()) and time.monotonic() < end:
            for member in survivors:
                _quietly(member.kill)
            time.sleep(0.2)
        if not survivors:
            # The leaders' zombies, until init reaps them (they hold nothing, but ps lists them).
            while time.monotonic() < end and any(_exists(record) for record in self.records.values()):
                time.sleep(0.2)
            self.state_file.unlink(missing_ok=True)
            self.records.clear()
        self.timings["stop_s"] = time.monotonic() - started
        return _describe(survivors)

    def kill(self, name: str) -> list[int]:
        """SIGKILL component ``name`` and every process it started, as when its machine dies.

        Its descendants, not its process group: Airflow puts each task process in a group
        of its own. Everything is listed first, then killed, so none can start a new child
        in between. The component is forgotten (no longer checked, nor stopped). Returns the
        pids killed.
        """
        leader = self.processes.get(name)
        if leader is None:
            raise AirflowError(f"{name} was not started by this launcher")
        try:
            root = psutil.Process(leader.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            tree = []
        for proc in tree:
            _quietly(proc.suspend)  # frozen first: nothing forks, exits or writes from here on
        for proc in tree:
            _quietly(proc.kill)
        leader.wait(10)
        psutil.wait_procs(tree[1:], timeout=10)
        del self.processes[name], self.records[name]
        self.components.pop(name, None)
        self._save_state()
        return [proc.pid for proc in tree]

    def _alive(self, name: str, proc: psutil.Process | None) -> bool:
        if name in self.processes:
            return self.processes[name].poll() is None  # reaps our own children
        return proc is not None and _is_alive(proc)

    def group_members(self) -> list[psutil.Process]:
        """Every live process in the components' process groups (their children included).

        A process counts only if it started no earlier than the group's leader did, so a
        recycled pid that now leads an unrelated group is left alone.
        """
        groups = {int(r["pid"]): _recorded_start(r) for r in self.records.values()}
        groups.update({p.pid: groups.get(p.pid, 0.0) for p in self.processes.values()})
        members = []
        for proc in psutil.process_iter():
            try:
                pgid = os.getpgid(proc.pid)
                if pgid not in groups:  # most of the machine's processes: /proc/<pid>/stat not read
                    continue
                started = _started_since_boot(proc.pid)
                if started is not None and started >= groups[pgid] - 1 and _is_alive(proc):
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
            if process.poll() is not None and name != "db-migrate":
                raise AirflowError(f"airflow {name} exited with {process.returncode}\n{self.tail(name)}")
        for name, record in self.records.items():
            if name not in self.processes and name in self.components and _live_process(record) is None:
                raise AirflowError(f"airflow {name} (pid {record['pid']}) is not running\n{self.tail(name)}")

    def _healthy(self) -> client.HealthInfoResponse | None:
        try:
            health = self.monitor.get_health(_request_timeout=5)
        except (ApiException, urllib3.exceptions.HTTPError):
            return None
        components = (health.metadatabase, health.scheduler, health.triggerer, health.dag_processor)
        return health if all(c is not None and c.status == "healthy" for c in components) else None

    # -- diagnostics ------------------------------------------------------------------------

    def output(self, name: str) -> str:
        """Everything a component has printed so far."""
        path = self.log_dir / f"{name}.log"
        return path.read_bytes().decode("utf-8", "replace") if path.exists() else ""

    def tail(self, name: str, lines: int = 60) -> str:
        text = self.output(name).splitlines()[-lines:]
        return f"--- {name} ({self.log_dir / name}.log), last {len(text)} lines ---\n" + "\n".join(text)

    def task_logs(self, lines: int = 80, run_id: str | None = None) -> str:
        """The tail of every task log that mentions an error (files under AIRFLOW_HOME/logs)."""
        out = []
        pattern = f"run_id={run_id}/**/attempt=*.log" if run_id else "attempt=*.log"
        for path in sorted((self.home / "logs").rglob(pattern)):
            text = path.read_bytes().decode("utf-8", "replace")
            if '"level":"error"' in text or "Traceback" in text or "ERROR" in text:
                tail = "\n".join(text.splitlines()[-lines:])
                out.append(f"--- task log {path} ---\n{tail}")
        return "\n".join(out) or "--- no task log with an error ---"

    def diagnostics(self, run_id: str | None = None) -> str:
        names = ("db-migrate", *self.components)
        parts = [self.tail(name) for name in names if (self.log_dir / f"{name}.log").exists()]
        parts.append(self.task_logs(run_id=run_id))
        return "\n".join(parts)


def _is_alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _started_since_boot(pid: int) -> float | None:
    """When process ``pid`` started, in seconds since boot, or None if it is gone.

    From ``/proc/<pid>/stat`` (its 22nd field, in clock ticks). psutil's ``create_time()`` is
    this plus the boot time, which is worked out from the wall clock: when that is stepped (a
    virtual machine paused and resumed, NTP), every process seems to have started at another
    time, and a running component was taken for a recycled pid, then for dead.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _recorded_start(record: Mapping[str, Any]) -> float:
    """The recorded process's start in seconds since boot; from its wall-clock start time for a
    record of an earlier version of this launcher; 0.0 if neither was recorded."""
    if record.get("started") is not None:
        return float(record["started"])
    if record.get("create_time"):
        return float(record["create_time"]) - psutil.boot_time()
    return 0.0


def _is_recorded(record: Mapping[str, Any], proc: psutil.Process) -> bool:
    """Whether ``proc`` (of the recorded pid) is the process recorded: the same start time."""
    if record.get("started") is None and not record.get("create_time"):
        return True  # no start time recorded to tell them apart
    started = _started_since_boot(proc.pid)
    return started is not None and abs(started - _recorded_start(record)) <= 0.05


def _live_process(record: Mapping[str, Any]) -> psutil.Process | None:
    """The recorded process if it still runs and is the one recorded (same start time)."""
    try:
        proc = psutil.Process(int(record["pid"]))
        if not _is_recorded(record, proc):
            return None  # the pid was recycled
    except (psutil.Error, ValueError, KeyError):
        return None
    return proc if _is_alive(proc) else None


def _exists(record: Mapping[str, Any]) -> bool:
    """Whether the recorded process is still in the process table (a zombie too)."""
    try:
        return _is_recorded(record, psutil.Process(int(record["pid"])))
    except (psutil.Error, ValueError, KeyError):
        return False


def _quietly(action: Callable[[], None]) -> None:
    try:
        action()
    except psutil.Error:
        pass


def _describe(processes: Iterable[psutil.Process]) -> list[str]:
    """pid, state and command line of each process still there."""
    found = []
    for proc in processes:
        try:
            found.append(f"{proc.pid} [{proc.status()}] {' '.join(proc.cmdline())[:200]}")
        except psutil.Error:
            pass
    return found

