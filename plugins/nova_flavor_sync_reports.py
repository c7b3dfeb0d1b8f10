"""What the DAGs tell people besides their logs: the drift history and alerts.

- ``DRIFT_HISTORY``: an Airflow Asset that every drift check updates once; the asset event's
  ``extra`` is that night's summary (``record_drift``). Airflow keeps asset events in its
  metadata DB: the drift page (``nova_flavor_sync_drift``) charts them, and
  ``GET /api/v2/assets/events`` lists them. Airflow records an outlet's event only when its
  task succeeds, so ``check_drift`` records and succeeds, and the next task fails the run on drift.
- Alerts: Airflow notifiers (``BaseNotifier``) for the tasks' callbacks. What to send where is
  read when they fire, from the Airflow Variable ``nova_flavor_sync_alerts`` (JSON): nothing
  to change in code, nothing read at parse time; unset, no alert (the task log says so)::

      {"email": {"to": ["ops@example.com"], "conn_id": "smtp_default", "from_email": "airflow@example.com"},
       "slack": {"conn_id": "slack_api_default", "channel": "#nova"}}

  ``email`` sends with the SMTP provider's SmtpNotifier through an SMTP Connection
  (``conn_id``, default ``smtp_default``; ``from_email`` may be in the Connection instead);
  ``slack`` posts with the Slack provider's SlackNotifier (apache-airflow-providers-slack,
  installed by the operator).
"""

from __future__ import annotations

import html
import json
import logging
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from airflow.sdk import Asset, BaseNotifier, Variable, conf, get_current_context
from nova_flavor_sync_airflow import NovaApiDbHook

from nova_flavor_sync.dburl import DbParams

log = logging.getLogger(__name__)

DRIFT_HISTORY = Asset(name="nova_flavor_drift", uri="nova_flavor_sync://drift")
DRIFT_DAG_ID = "nova_flavor_drift_check"
DRIFT_PAGE_ROUTE = "nova-flavor-sync-drift"  # the UI page: /plugin/nova-flavor-sync-drift
ALERTS_VARIABLE = "nova_flavor_sync_alerts"
SUBJECT_PREFIX = "[nova-flavor-sync]"
SLACK_NOTIFIER = "airflow.providers.slack.notifications.slack"

# (subject, lines of the body), or None: nothing worth an alert.
Message = tuple[str, list[str]] | None


def database_name(db: DbParams) -> str:
    """``host:port/database``: which cloud, without user or password."""
    return f"{db.host}:{db.port}/{db.database}"


def record_drift(summary: dict[str, Any], params: dict[str, Any], db: DbParams) -> dict[str, Any]:
    """This run's DRIFT_HISTORY event: the summary and which cloud; returned (XCom) as well.

    Call it inside a task whose outlets hold DRIFT_HISTORY.
    """
    record = {"summary": summary, "conn_id": params["conn_id"], "database": database_name(db),
              "all_keys": params["all_keys"]}
    get_current_context()["outlet_events"][DRIFT_HISTORY].extra = record
    return record


# -- alerts ----------------------------------------------------------------------------------


class AlertConfigError(ValueError):
    """The Variable nova_flavor_sync_alerts cannot be used (the message says why); nothing is sent."""


def alert_senders(raw: str | None) -> list[Callable[[str, list[str]], BaseNotifier]]:
    """The notifiers the Variable's JSON asks for, each made from (subject, body lines); [] when unset."""
    if raw is None or not raw.strip():
        return []
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise AlertConfigError(f"the Airflow Variable {ALERTS_VARIABLE} is not JSON: {exc}") from None
    if not isinstance(config, dict) or not config or set(config) - {"email", "slack"}:
        raise AlertConfigError(
            f'the Airflow Variable {ALERTS_VARIABLE} must be a JSON object with "email" and/or "slack", '
            f"not {raw.strip()[:200]!r}")
    senders = []
    if "email" in config:
        senders.append(_email_sender(config["email"]))
    if "slack" in config:
        senders.append(_slack_sender(config["slack"]))
    return senders


def _settings(config: Any, name: str, allowed: set[str], required: set[str]) -> dict[str, Any]:
    if not isinstance(config, dict) or set(config) - allowed or required - set(config):
        raise AlertConfigError(
            f'"{name}" in the Airflow Variable {ALERTS_VARIABLE} must be an object with {sorted(required)} '
            f"and optionally {sorted(allowed - required)}, not {json.dumps(config)[:200]}")
    return config


def _email_sender(config: Any) -> Callable[[str, list[str]], BaseNotifier]:
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    settings = _settings(config, "email", {"to", "conn_id", "from_email", "cc"}, {"to"})
    to = [settings["to"]] if isinstance(settings["to"], str) else settings["to"]
    if not to or not all(isinstance(address, str) and "@" in address for address in to):
        raise AlertConfigError(f'"email": "to" must be an e-mail address or a list of them, not {settings["to"]!r}')

    def send(subject: str, lines: list[str]) -> BaseNotifier:
        return SmtpNotifier(to=to, cc=settings.get("cc"), from_email=settings.get("from_email"),
                            smtp_conn_id=settings.get("conn_id", "smtp_default"),
                            subject=subject, html_content=html_body(lines))

    return send


def _slack_sender(config: Any) -> Callable[[str, list[str]], BaseNotifier]:
    settings = _settings(config, "slack", {"conn_id", "channel"}, {"channel"})
    try:
        from airflow.providers.slack.notifications.slack import SlackNotifier
    except ImportError:
        raise AlertConfigError(
            f'"slack" in the Airflow Variable {ALERTS_VARIABLE} needs the Slack provider '
            f"({SLACK_NOTIFIER}): install apache-airflow-providers-slack") from None

    def send(subject: str, lines: list[str]) -> BaseNotifier:
        return SlackNotifier(slack_conn_id=settings.get("conn_id", "slack_api_default"),
                             channel=settings["channel"], text="\n".join([f"*{subject}*", *lines]))

    return send


_URL = re.compile(r"https?://[^\s<>&\"']+")


def html_body(lines: list[str]) -> str:
    """The lines as HTML paragraphs, every value escaped, links clickable."""
    return "\n".join(
        "<p>" + _URL.sub(lambda m: f'<a href="{m[0]}">{m[0]}</a>', html.escape(line, quote=True)) + "</p>"
        for line in lines)


class Alert(BaseNotifier):
    """A notifier for a task's callbacks: sends what ``message`` makes of the task's context to
    the targets of the Variable ``nova_flavor_sync_alerts``; nothing when it is unset.

    The message is sent as it is, never rendered as a template: flavor names and error
    messages may hold ``{{``.
    """

    def __init__(self, message: Callable[[Any], Message]) -> None:
        super().__init__()
        self.message = message

    def notify(self, context: Any) -> None:
        composed = self.message(context)
        if composed is None:
            return
        subject, lines = composed
        senders = alert_senders(Variable.get(ALERTS_VARIABLE, default=None))
        if not senders:
            log.info("No alert sent: the Airflow Variable %s is not set (would have said: %s)",
                     ALERTS_VARIABLE, subject)
            return
        for send in senders:
            notifier = send(subject, lines)
            notifier.notify(context)  # not notifier(context): that would render the message as a template
            log.info("Alert sent (%s): %s", type(notifier).__name__, subject)


def ui_url(path: str) -> str:
    return f"{conf.get('api', 'base_url', fallback='http://localhost:8080/').rstrip('/')}/{path.lstrip('/')}"


def run_lines(context: Any) -> list[str]:
    """Where it happened: the DAG run, the task's log."""
    ti = context["ti"]
    return [f"DAG run: {ti.dag_id} / {ti.run_id}",
            f"Run: {ui_url(f'dags/{ti.dag_id}/runs/{quote(ti.run_id)}')}",
            f"Log: {ti.log_url}"]


def cloud_name(params: dict[str, Any]) -> str:
    """The run's nova_api: its Connection id and ``host:port/database`` (the id alone if unreadable)."""
    try:
        return f"{params['conn_id']} ({database_name(NovaApiDbHook(params['conn_id']).get_db_params())})"
    except Exception:  # the alert must go out even when the Connection is why the run failed
        return str(params.get("conn_id"))


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counts.items()) or "none"


def drift_found(context: Any) -> Message:
    """fail_on_drift failed: the drift the check recorded, per copy, flavor and key."""
    record = context["ti"].xcom_pull(task_ids="check_drift")
    summary = record["summary"]
    cloud = f"{record['conn_id']} ({record['database']})"
    subject = (f"{SUBJECT_PREFIX} Flavor drift: {summary['to_update']} stale flavor copies in {cloud}")
    lines = [
        f"The drift check found {summary['to_update']} flavor copies out of sync with their flavors in "
        f"{cloud}{' (all keys)' if record['all_keys'] else ''}.",
        f"Per copy: {_counts({where: s['to_update'] for where, s in summary['copies'].items()})}",
        f"Instances whose two copies disagree: {summary['disagreeing']}",
        f"By flavor: {_counts(summary['by_flavor'])}",
        f"By key: {_counts(summary['by_key'])}",
        *run_lines(context),
        f"Drift history: {ui_url(f'plugin/{DRIFT_PAGE_ROUTE}')}",
        "Sync them with the nova_flavor_sync DAG (a dry run first).",
    ]
    return subject, lines


def drift_check_failed(context: Any) -> Message:
    """check_drift itself failed: the drift is unknown tonight."""
    cloud = cloud_name(context["params"])
    return (f"{SUBJECT_PREFIX} Drift check FAILED in {cloud}: drift unknown",
            [f"The drift check could not read {cloud}: {context.get('exception')}", *run_lines(context)])


def sync_ended(context: Any) -> Message:
    """report_outcome ended: an alert when the sync failed or was rejected, none otherwise."""
    ti = context["ti"]
    exception = context.get("exception")
    if exception is not None:
        what, line = "FAILED", str(exception)
    else:
        outcome = ti.xcom_pull(task_ids=ti.task_id) or {}
        if outcome.get("outcome") != "rejected":
            return None
        what, line = "REJECTED", outcome["message"]
    plan = ti.xcom_pull(task_ids="combine_plans")
    cloud = cloud_name(context["params"])
    planned = (f"Plan {plan['digest']}: {plan['summary']['to_update']} flavor copies to rewrite "
               f"({_counts(plan['summary']['copies'])})" if plan else "No plan was made.")
    return f"{SUBJECT_PREFIX} Sync {what} in {cloud}", [line, planned, *run_lines(context)]
