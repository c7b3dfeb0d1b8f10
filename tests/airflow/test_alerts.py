"""Alerts by e-mail, end to end: a real SMTP server (aiosmtpd) receives what the DAGs send.

The server is started by each test on a free port of 127.0.0.1; Airflow reaches it through
an SMTP Connection, and the Variable ``nova_flavor_sync_alerts`` names that Connection and
the recipients, both set as an operator would without code: as AIRFLOW_CONN_* and
AIRFLOW_VAR_* environment variables where the DAGs run with dag.test() on the demo cloud,
through the REST API in the session's running Airflow (tests/airflow/conftest.py).
"""

from __future__ import annotations

import html
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest
from airflow_client import client
from local_airflow import Airflow, free_port, wait_for

from approval_answer import REPO, run_with_answer
from dbtools import sync_both_copies

DRIFT = "nova_flavor_drift_check"
SYNC = "nova_flavor_sync"
SMTP_CONN_ID = "nova_alerts_smtp"
ALERTS_VARIABLE = "nova_flavor_sync_alerts"
FROM = "airflow@nova.example"
TO = ["ops@nova.example", "oncall@nova.example"]
CELL1 = "cell1 (835ce9b0-6a5b-5709-b701-5eb36f22fdca)"
CELL2 = "cell2 (ada1b992-1bb5-5458-b47a-3407ad251e9e)"


@dataclass
class Inbox:
    """What the SMTP server received: (envelope recipients, parsed message) per mail."""

    port: int
    mails: list[tuple[list[str], EmailMessage]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server, session, envelope) -> str:  # aiosmtpd's handler hook
        with self.lock:
            self.mails.append((list(envelope.rcpt_tos), message_from_bytes(envelope.content, policy=policy.default)))
        return "250 Message accepted for delivery"


@pytest.fixture
def inbox(monkeypatch) -> Iterator[Inbox]:
    from aiosmtpd.controller import Controller

    port = free_port()
    received = Inbox(port)
    controller = Controller(received, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        # Plain SMTP on loopback: the Connection turns SSL and STARTTLS off.
        monkeypatch.setenv(f"AIRFLOW_CONN_{SMTP_CONN_ID.upper()}", json.dumps({
            "conn_type": "smtp", "host": "127.0.0.1", "port": port,
            "extra": {"disable_ssl": True, "disable_tls": True, "from_email": FROM, "timeout": 10, "retry_limit": 0},
        }))
        monkeypatch.setenv(f"AIRFLOW_VAR_{ALERTS_VARIABLE.upper()}",
                           json.dumps({"email": {"to": TO, "conn_id": SMTP_CONN_ID}}))
        yield received
    finally:
        controller.stop()


def body_text(message: EmailMessage) -> str:
    """The mail's HTML part as text a reader sees: tags dropped, entities decoded, spaces squeezed."""
    part = message.get_body(preferencelist=("html", "plain"))
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", part.get_content())).split())


def run_dag(dag_id: str, conf: dict):
    from airflow.dag_processing.dagbag import DagBag

    dag_run = DagBag(dag_folder=str(REPO / "dags")).dags[dag_id].test(run_conf=conf)
    return dag_run, {ti.task_id: ti.state for ti in dag_run.get_task_instances()}


@pytest.mark.timeout(300)
def test_the_drift_check_mails_what_drifted_and_where(nova_env, inbox):
    dag_run, states = run_dag(DRIFT, {})

    assert dag_run.state == "failed" and states == {"check_drift": "success", "fail_on_drift": "failed"}
    record = next(ti for ti in dag_run.get_task_instances() if ti.task_id == "check_drift").xcom_pull(
        task_ids="check_drift")
    summary = record["summary"]
    (recipients, mail), = inbox.mails
    assert recipients == TO
    assert mail["From"] == FROM and mail["To"] == ", ".join(TO)
    cloud = f"nova_api_db (127.0.0.1:{nova_env.port}/{nova_env.database})"
    assert mail["Subject"] == f"[nova-flavor-sync] Flavor drift: {summary['to_update']} stale flavor copies in {cloud}"
    body = body_text(mail)
    copies = summary["copies"]
    assert (f"The drift check found {summary['to_update']} flavor copies out of sync with their flavors in "
            f"{cloud}.") in body
    assert (f"Per copy: nova_api {copies['nova_api']['to_update']}, {CELL1} {copies[CELL1]['to_update']}, "
            f"{CELL2} {copies[CELL2]['to_update']}") in body
    assert f"Instances whose two copies disagree: {summary['disagreeing']}" in body
    flavor, count = next(iter(summary["by_flavor"].items()))
    assert f"By flavor: {flavor} {count}, " in body
    assert f"DAG run: {DRIFT} / {dag_run.run_id}" in body
    assert f"/dags/{DRIFT}/runs/" in body and "/tasks/fail_on_drift" in body
    assert "Drift history: http://localhost:8080/plugin/nova-flavor-sync-drift" in body
    # The links are links.
    html_part = mail.get_body(preferencelist=("html",)).get_content()
    assert '<a href="http://localhost:8080/plugin/nova-flavor-sync-drift">' in html_part

    sync_both_copies(nova_env, all_keys=False)  # clean now: the check passes and nobody is told
    dag_run, states = run_dag(DRIFT, {})
    assert dag_run.state == "success", states
    assert len(inbox.mails) == 1


@pytest.mark.timeout(300)
def test_a_drift_check_that_cannot_read_the_database_mails_that_it_failed(nova_env, inbox, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_NOVA_API_DB", f"mysql://root@127.0.0.1:1/{nova_env.database}")

    dag_run, states = run_dag(DRIFT, {})

    assert dag_run.state == "failed" and states == {"check_drift": "failed", "fail_on_drift": "upstream_failed"}
    (_, mail), = inbox.mails
    cloud = f"nova_api_db (127.0.0.1:1/{nova_env.database})"
    assert mail["Subject"] == f"[nova-flavor-sync] Drift check FAILED in {cloud}: drift unknown"
    body = body_text(mail)
    assert f"The drift check could not read {cloud}: " in body
    assert "/tasks/check_drift" in body


@pytest.mark.timeout(300)
def test_a_rejected_sync_is_mailed_and_an_unset_variable_sends_nothing(nova_env, inbox, monkeypatch, caplog):
    dag_run, states, _ = run_with_answer(SYNC, {"dry_run": False}, "Reject")

    assert dag_run.state == "success" and states["report_outcome"] == "success", states
    (_, mail), = inbox.mails
    cloud = f"nova_api_db (127.0.0.1:{nova_env.port}/{nova_env.database})"
    assert mail["Subject"] == f"[nova-flavor-sync] Sync REJECTED in {cloud}"
    body = body_text(mail)
    ti = dag_run.get_task_instances()[0]
    plan, answer = ti.xcom_pull(task_ids="combine_plans"), ti.xcom_pull(task_ids="approve", key="answer")
    assert body.startswith(f"REJECTED by {answer['by']} at {answer['at']}: nothing was written ")
    assert f"Plan {plan['digest']}: {plan['summary']['to_update']} flavor copies to rewrite (nova_api " in body
    assert f"DAG run: {SYNC} / {dag_run.run_id}" in body

    monkeypatch.delenv("AIRFLOW_VAR_NOVA_FLAVOR_SYNC_ALERTS")
    dag_run, states, _ = run_with_answer(SYNC, {"dry_run": False}, "Reject")
    assert dag_run.state == "success", states
    assert len(inbox.mails) == 1  # no Variable, no alert, and the task log says so
    assert ("No alert sent: the Airflow Variable nova_flavor_sync_alerts is not set (would have said: "
            f"[nova-flavor-sync] Sync REJECTED in {cloud})") in caplog.text


@pytest.mark.timeout(300)
def test_a_failed_sync_is_mailed_with_what_failed(nova_env, inbox, tmp_path):
    # A file where the backup directory belongs: the backup cannot be written, the run fails.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "backups").write_text("not a directory")

    dag_run, states, _ = run_with_answer(SYNC, {"dry_run": False}, None)

    assert dag_run.state == "failed" and states["report_outcome"] == "failed", states
    (_, mail), = inbox.mails
    cloud = f"nova_api_db (127.0.0.1:{nova_env.port}/{nova_env.database})"
    assert mail["Subject"] == f"[nova-flavor-sync] Sync FAILED in {cloud}"
    body = body_text(mail)
    assert body.startswith("FAILED: the backup could not be written; nothing was written ")
    assert f"DAG run: {SYNC} / {dag_run.run_id}" in body and "/tasks/report_outcome" in body


@pytest.mark.parametrize(("value", "message"), [
    ("{not json", "the Airflow Variable nova_flavor_sync_alerts is not JSON: "),
    ('["ops@nova.example"]', 'must be a JSON object with "email" and/or "slack", not \'["ops@nova.example"]\''),
    ('{"mail": {"to": "ops@nova.example"}}', 'must be a JSON object with "email" and/or "slack"'),
    ('{"email": {"conn_id": "smtp_default"}}', '"email" in the Airflow Variable nova_flavor_sync_alerts must be an '
     "object with ['to'] and optionally ['cc', 'conn_id', 'from_email']"),
    ('{"email": {"to": "ops", "smtp": "x"}}', '"email" in the Airflow Variable'),
    ('{"email": {"to": "ops"}}', '"email": "to" must be an e-mail address or a list of them, not \'ops\''),
    ('{"email": {"to": []}}', '"email": "to" must be an e-mail address or a list of them, not []'),
    ('{"slack": {"channel": "#nova"}}', '"slack" in the Airflow Variable nova_flavor_sync_alerts needs the Slack '
     "provider (airflow.providers.slack.notifications.slack): install apache-airflow-providers-slack"),
])
def test_a_variable_that_cannot_be_used_says_why(airflow_db, value, message):
    from nova_flavor_sync_reports import AlertConfigError, alert_senders

    with pytest.raises(AlertConfigError) as raised:
        alert_senders(value)
    assert message in str(raised.value)


def test_an_unset_or_empty_variable_means_no_alert_and_email_alone_is_enough(airflow_db):
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier
    from nova_flavor_sync_reports import alert_senders

    assert alert_senders(None) == [] and alert_senders("  ") == []
    (send,) = alert_senders(json.dumps({"email": {"to": "ops@nova.example"}}))
    notifier = send("subject {{ x }}", ["line <b>", "Log: http://airflow/x?a=1"])
    assert isinstance(notifier, SmtpNotifier) and notifier.to == ["ops@nova.example"]
    assert notifier.smtp_conn_id == "smtp_default" and notifier.subject == "subject {{ x }}"
    assert notifier.html_content == (
        '<p>line &lt;b&gt;</p>\n<p>Log: <a href="http://airflow/x?a=1">http://airflow/x?a=1</a></p>')


@contextmanager
def alerts_by_mail_in(airflow: Airflow, smtp_port: int) -> Iterator[None]:
    """The SMTP Connection and the alerts Variable in the running Airflow's metadata DB, as an
    operator sets them in the UI; removed after, so that the next test's runs send nothing."""
    rest = airflow.rest
    rest.replace_connection(client.ConnectionBody(
        connection_id=SMTP_CONN_ID, conn_type="smtp", host="127.0.0.1", port=smtp_port,
        extra=json.dumps({"disable_ssl": True, "disable_tls": True, "from_email": FROM, "timeout": 10,
                          "retry_limit": 0})))
    rest.variables.post_variable(client.VariableBody(
        key=ALERTS_VARIABLE, value=json.dumps({"email": {"to": TO, "conn_id": SMTP_CONN_ID}})))
    try:
        yield
    finally:
        rest.variables.delete_variable(ALERTS_VARIABLE)
        rest.connections.delete_connection(SMTP_CONN_ID)


@pytest.mark.timeout(900)
def test_a_running_airflow_keeps_the_night_as_an_asset_event_and_mails_it(airflow_on_demo_db, demo_db, inbox):
    """The real thing: scheduler, LocalExecutor, task processes, the API server's REST API."""
    airflow = airflow_on_demo_db
    rest = airflow.rest
    run_id = None
    try:
        with alerts_by_mail_in(airflow, inbox.port):
            # Unpaused, it may also start the latest nightly run (catchup=False): ours is the manual one.
            rest.unpause(DRIFT)
            run_id = rest.trigger(DRIFT, {})
            run = rest.wait_for_run(DRIFT, run_id, timeout=240)
            assert run.state == "failed"
            assert rest.task_states(DRIFT, run_id) == {"check_drift": "success", "fail_on_drift": "failed"}
            record = rest.xcom(DRIFT, run_id, "check_drift")
            events = client.AssetApi(rest.api_client).get_asset_events(source_run_id=run_id).asset_events
            (event,) = events
            assert (event.uri, event.source_task_id) == ("nova_flavor_sync://drift", "check_drift")
            assert event.extra == record and record["summary"]["to_update"] > 600

            def our_mail():  # the callback runs as the task process ends: maybe after the run did
                return [mail for _, mail in inbox.mails if f"DAG run: {DRIFT} / {run_id}" in body_text(mail)] or None

            (mail,) = wait_for("the drift mail", our_mail, timeout=60)
    except BaseException:
        print("\n" + airflow.diagnostics(run_id=run_id))
        raise
    finally:
        rest.pause(DRIFT)  # back as the shared Airflow had it: no nightly run of its own
    assert mail["Subject"] == (f"[nova-flavor-sync] Flavor drift: {record['summary']['to_update']} stale flavor "
                               f"copies in nova_api_db (127.0.0.1:{demo_db.port}/{demo_db.database})")
    assert f"Log: http://localhost:8080/dags/{DRIFT}/runs/{run_id}/tasks/fail_on_drift" in body_text(mail)
