"""The Airflow half of ``make demo`` and ``make stop``.

``start``: start Airflow (scripts/local_airflow.py: api-server, scheduler with LocalExecutor,
dag-processor, triggerer, SQLite metadata DB) in ``--home``, listening on 127.0.0.1:``--port``,
or reuse the one a previous ``start`` left running there if it is healthy and was started with
the same settings (otherwise stop it and start again). The components are left running,
detached, their pids in ``<home>/pids.json``. Then: the Connection ``nova_api_db`` (in the
metadata DB, so the UI shows it) pointing at ``--db-url``, a dry run of nova_flavor_sync
through the REST API, its summary, and how to log in and run the real sync.

``stop``: stop what ``start`` left running (SIGTERM, then SIGKILL of the process groups).

Exit status 0 on success, 1 on any failure (with what to look at), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import airflow_client.client as client
import urllib3
from airflow_client.client.exceptions import ApiException
from local_airflow import Airflow, AirflowError, PortInUse, port_owner

from nova_flavor_sync.airflow_conn import DEFAULT_CONN_ID, DEFAULT_DATABASE_CONN_ID
from nova_flavor_sync.dburl import DbParams, parse_db_url
from nova_flavor_sync.errors import NovaFlavorSyncError

SYNC, RESTORE, DRIFT = "nova_flavor_sync", "nova_flavor_restore", "nova_flavor_drift_check"
USERNAME = "admin"
PORT_VARIABLE = "DEMO_PORT"  # what the user sets to change --port (make demo DEMO_PORT=...)


class DemoError(Exception):
    """A failure with a message for the user (printed as ``make demo: ...``)."""


def shown(path: Path) -> str:
    """``path`` relative to the current directory when it is inside it (shorter to read)."""
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def port_number(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{PORT_VARIABLE} must be a TCP port number (1-65535), not {text!r}")
    return int(text)


def demo_airflow(home: Path, port: int, data_dir: Path) -> Airflow:
    return Airflow(
        home,
        home / "logs",
        port=port,
        username=USERNAME,
        env={"NOVA_FLAVOR_SYNC_DIR": str(data_dir.absolute())},
        run_prefix="demo",
    )


def connection_body(params: DbParams, conn_id: str = DEFAULT_CONN_ID,
                    description: str = "The demo nova_api (make demo)") -> client.ConnectionBody:
    """A Connection (type mysql) for ``params``, as POST /api/v2/connections takes it."""
    if params.ssl:
        raise DemoError("the demo's database URL has TLS settings; the demo does not pass them to Airflow")
    extra = {"charset": params.charset}
    if params.unix_socket:
        extra["unix_socket"] = params.unix_socket
    return client.ConnectionBody(
        connection_id=conn_id,
        conn_type="mysql",
        description=description,
        host=params.host,
        port=params.port,
        login=params.user or None,
        password=params.password or None,
        var_schema=params.database,
        extra=json.dumps(extra),
    )


def set_connection(airflow: Airflow, params: DbParams) -> None:
    """Create ``nova_api_db`` and ``nova_database`` in the metadata DB, replacing older ones.

    ``nova_database`` is what a Nova service's nova.conf has as [database] connection: the
    demo's cell2 is mapped through a URL template filled from it.
    """
    cells = dataclasses.replace(params, database="nova")
    for body in (connection_body(params),
                 connection_body(cells, DEFAULT_DATABASE_CONN_ID, "Nova's [database] connection (make demo)")):
        airflow.rest.replace_connection(body)


def ensure_running(airflow: Airflow, *, timeout: float) -> str:
    """Reuse the recorded Airflow if it is healthy, else (re)start it; say which."""
    ok, why = airflow.status()
    if ok:
        return f"reusing the one already running ({why})"
    note = "started"
    if airflow.recorded() is not None:
        print(f"Airflow: the one recorded in {shown(airflow.state_file)} cannot be reused ({why}); restarting it")
        survivors = airflow.stop()
        if survivors:
            raise DemoError("could not stop the previous Airflow: still running:\n  " + "\n  ".join(survivors))
        note = "restarted"
    try:
        owner = port_owner(airflow.api_port)
        if owner is not None:
            raise PortInUse(airflow.api_port, owner)
        print(
            f"Airflow: starting api-server, scheduler, dag-processor and triggerer in {shown(airflow.home)} "
            f"(logs in {shown(airflow.log_dir)}) ..."
        )
        airflow.start(timeout=timeout)
    except PortInUse as exc:
        raise DemoError(
            f"{exc}. Set {PORT_VARIABLE} to a free port, e.g. `make demo {PORT_VARIABLE}={exc.port + 1}`"
        ) from None
    except BaseException as exc:
        print(airflow.diagnostics(), file=sys.stderr)
        survivors = airflow.stop()
        left = f"still running: {'; '.join(survivors)}" if survivors else "nothing is left running"
        raise DemoError(
            f"Airflow did not start: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. "
            f"The components' logs are in {shown(airflow.log_dir)} (their tails are above); {left}"
        ) from None
    return f"{note} in {airflow.timings['start_s']:.0f} s"


def summary_lines(plan: dict[str, Any], outcome: dict[str, Any]) -> list[str]:
    """The dry run's summary, as ``make_plan`` logged it for each copy (from ``combine_plans``' XCom)."""

    def counts(values: dict[str, int]) -> str:
        return ", ".join(f"{name}={count}" for name, count in values.items())

    lines = []
    for copy in plan["copies"]:
        s = {key: "?" for key in ("rows_read", "to_update", "in_sync", "held_back_only", "orphans",
                                   "left_alone", "errors")} | copy["summary"]
        lines.append(
            f"Read {s['rows_read']} {copy['what']}: {s['to_update']} to update, {s['in_sync']} in sync, "
            f"{s['held_back_only']} with only risky changes (held back), {s['orphans']} orphans, "
            f"{s['left_alone']} left alone, {s['errors']} errors"
        )
        for title, key in (("  to update by flavor", "by_flavor"), ("  key changes by key", "by_key"),
                           ("  held back (placement keys; all_keys syncs them)", "held_back_by_key")):
            if s.get(key):
                lines.append(f"{title}: {counts(s[key])}")
    if plan.get("value_changes"):
        lines.append("Changes by value (flavor: key old -> new [risk class]: flavor copies (per copy)):")
        lines += [f"  {line}" for line in plan["value_changes"]]
    lines.append(f"Both copies: {plan['summary']['to_update']} to update ({counts(plan['summary']['copies'])})")
    lines.append(f"Plan digest: {plan['digest']}")
    lines.append(outcome["message"])
    return lines


def dry_run(airflow: Airflow, *, timeout: float) -> tuple[str, list[str]]:
    """Trigger nova_flavor_sync with dry_run on, wait for it; (run id, its summary lines)."""
    rest = airflow.rest
    rest.wait_for_dags(SYNC, RESTORE, DRIFT)
    for dag_id in (SYNC, RESTORE):  # the nightly drift check stays paused
        rest.unpause(dag_id)
    # One run at a time (max_active_runs=1): a run left from an earlier demo (waiting for an
    # approval, say) would hold this one back, and it was planned on the database just replaced.
    for run in rest.active_runs(SYNC):
        rest.fail_run(SYNC, run.dag_run_id)
        print(f"Marked the unfinished run {run.dag_run_id} failed: the demo database was reloaded")
    run_id = rest.trigger(SYNC, {"dry_run": True})
    print(f"Triggered {SYNC} with dry_run=true: run {run_id}; waiting for it (at most {timeout:.0f} s) ...")
    started = time.monotonic()
    try:
        run = rest.wait_for_run(SYNC, run_id, timeout=timeout)
    except AirflowError as exc:
        raise DemoError(run_failure(airflow, run_id, str(exc).splitlines()[0])) from None
    if run.state != "success":
        raise DemoError(run_failure(airflow, run_id, f"the dry run ended {run.state.value}"))
    plan = rest.xcom(SYNC, run_id, "combine_plans")
    outcome = rest.xcom(SYNC, run_id, "report_outcome")
    print(f"Dry run done in {time.monotonic() - started:.0f} s. Its summary "
          "(each make_plan task's log has every change of its copy):")
    return run_id, summary_lines(plan, outcome)


def run_failure(airflow: Airflow, run_id: str, problem: str) -> str:
    try:
        states = airflow.rest.task_states(SYNC, run_id)
    except (AirflowError, ApiException, urllib3.exceptions.HTTPError):
        states = {}
    print(airflow.task_logs(lines=40, run_id=run_id), file=sys.stderr)
    logs = airflow.home / "logs" / f"dag_id={SYNC}" / f"run_id={run_id}"
    return (
        f"{problem}. Task states: {states or 'unknown'}. Task logs: {shown(logs)}/ (the tails of those "
        f"with errors are above); the components' logs: {shown(airflow.log_dir)}/*.log. Airflow is still "
        f"running: {airflow.base_url}/dags/{SYNC}/runs/{run_id} (make stop stops it)"
    )


def cli_command(params: DbParams, data_dir: Path) -> str:
    """The same dry run with the command line, its log and backups next to the DAG's.

    ``--database-connection`` is what a Nova service's nova.conf would give as ``[database]
    connection``: the demo's cell2 is mapped through a template filled from it.
    """
    program = shown(Path(sys.executable).with_name("nova-flavor-sync"))
    cells = f"mysql+pymysql://{params.user}:{'***' if params.password else ''}@{params.host}:{params.port}/nova"
    return (
        f"{program} --db-url '{params.safe_url()}' --database-connection '{cells}' "
        f"--log-file {shown(data_dir / 'nova-flavor-sync.log')} --backup-dir {shown(data_dir / 'backups')}"
    )


def instructions(airflow: Airflow, run_id: str, password_file: Path, cli: str) -> list[str]:
    url = airflow.base_url
    token = (
        f"TOKEN=$(curl -s -X POST {url}/auth/token -H 'Content-Type: application/json' "
        f"""-d '{{"username": "{USERNAME}", "password": "{airflow.password}"}}' """
        """| python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])')"""
    )
    trigger = (
        f'curl -s -X POST {url}/api/v2/dags/{SYNC}/dagRuns -H "Authorization: Bearer $TOKEN" '
        """-H 'Content-Type: application/json' -d '{"logical_date": null, "conf": {"dry_run": false}}'"""
    )
    return [
        f"Airflow UI:  {url}/  (this dry run: {url}/dags/{SYNC}/runs/{run_id})",
        f"Plan view:   {url}/nova-flavor-sync/plans/{quote(run_id, safe='')}  (every change by value)",
        f"Login:       {USERNAME} / {airflow.password}   (kept in {shown(password_file)})",
        "",
        "To run the real sync:",
        f"  1. Open {url}/dags/{SYNC}, press Trigger, switch dry_run off, press Trigger.",
        "     Or from a shell:",
        f"       {token}",
        f"       {trigger}",
        "  2. After back_up, the approve task waits for you: open Browse > Required Actions (or the run's",
        "     approve task, tab Required Action), read the subject (count and plan digest) and the",
        "     summary, then press Approve. Reject, or no answer within 24 hours, writes nothing.",
        "  3. report_outcome's log says what was done. Plans and backups are in "
        f"{shown(Path(airflow.env['NOVA_FLAVOR_SYNC_DIR']))} (Browse > Flavor sync backups).",
        "",
        "The same dry run from the command line (it prints the command that applies the plan):",
        f"  {cli}",
        "",
        "make demo again reloads the demo database and reuses this Airflow; make stop stops it.",
    ]


def start(args: argparse.Namespace) -> int:
    try:
        params = parse_db_url(args.db_url, source="--db-url")
    except NovaFlavorSyncError as exc:
        raise DemoError(str(exc)) from None
    airflow = demo_airflow(args.home, args.port, args.data_dir)
    how = ensure_running(airflow, timeout=args.start_timeout)
    print(f"Airflow: {how}: {airflow.base_url}/ (pids in {shown(airflow.state_file)})")
    set_connection(airflow, params)
    print(f"Connection {DEFAULT_CONN_ID}: {params.safe_url()}")
    run_id, lines = dry_run(airflow, timeout=args.run_timeout)
    print()
    print("\n".join(f"  {line}" for line in lines))
    print()
    cli = cli_command(params, args.data_dir)
    print("\n".join(instructions(airflow, run_id, airflow.home / "passwords.json", cli)))
    return 0


def stop(args: argparse.Namespace) -> int:
    airflow = Airflow(args.home, args.home / "logs", port=0, username=USERNAME)
    state = airflow.recorded()
    if state is None:
        print(f"Nothing to stop: no Airflow recorded in {shown(airflow.state_file)}")
        return 0
    pids = {name: record.get("pid") for name, record in state["components"].items()}
    survivors = airflow.stop()
    if survivors:
        raise DemoError("some processes are still running after SIGKILL:\n  " + "\n  ".join(survivors))
    if not airflow.stopped:
        print(f"The demo's Airflow was not running any more; removed {shown(airflow.state_file)}")
        return 0
    listed = ", ".join(f"{name} (pid {pids[name]})" for name in airflow.stopped)
    killed = f"; SIGKILL was needed for {', '.join(airflow.killed)}" if airflow.killed else ""
    print(f"Stopped the demo's Airflow: {listed}, in {airflow.timings['stop_s']:.1f} s{killed}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="demo_airflow.py", description=__doc__.split("\n\n")[0])
    commands = top.add_subparsers(dest="command", required=True)
    begin = commands.add_parser("start", help="start or reuse Airflow, set the connection, run a dry run")
    begin.add_argument("--home", type=Path, required=True, help="AIRFLOW_HOME, e.g. .demo/airflow")
    begin.add_argument("--port", type=port_number, default=8080, help="the API server's port on 127.0.0.1")
    begin.add_argument("--db-url", required=True, help="the demo nova_api, mysql+pymysql://user@host:port/db")
    begin.add_argument("--data-dir", type=Path, required=True, help="NOVA_FLAVOR_SYNC_DIR: plans and backups")
    begin.add_argument("--start-timeout", type=float, default=180, help="seconds for Airflow to become healthy")
    begin.add_argument("--run-timeout", type=float, default=300, help="seconds for the dry run to end")
    end = commands.add_parser("stop", help="stop the Airflow that start left running")
    end.add_argument("--home", type=Path, required=True)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return start(args) if args.command == "start" else stop(args)
    except (DemoError, AirflowError, ApiException, urllib3.exceptions.HTTPError) as exc:
        prefix = "make demo" if args.command == "start" else "make stop"
        print(f"{prefix}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        running = (args.home / "pids.json").exists()
        print(f"\ninterrupted{'; Airflow is still running (make stop stops it)' if running else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
