"""Airflow pieces the nova_flavor_sync DAGs share: the database hook and a recorded approval.

Both are thin: the hook turns the ``nova_api_db`` Connection into the engine's DbParams
(UI, ``AIRFLOW_CONN_NOVA_API_DB`` as JSON or URI, or a secrets backend: Airflow looks it
up), and the approval records who answered, when and what, even on Reject, when Airflow's
ApprovalOperator skips downstream tasks without writing any XCom.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import BaseHook, Param

from nova_flavor_sync.airflow_conn import DEFAULT_CONN_ID, params_from_connection
from nova_flavor_sync.dburl import DbParams


class NovaApiDbHook(BaseHook):
    """The nova_api database of a Connection of type mysql, opened by the engine with PyMySQL."""

    conn_name_attr = "conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = "mysql"
    hook_name = "Nova API database (nova-flavor-sync)"

    def __init__(self, conn_id: str = DEFAULT_CONN_ID) -> None:
        super().__init__()
        self.conn_id = conn_id

    def get_db_params(self) -> DbParams:
        return params_from_connection(self.get_connection(self.conn_id))


def conn_id_param() -> Param:
    """The ``conn_id`` param every DAG takes: which Connection holds the nova_api database."""
    return Param(DEFAULT_CONN_ID, type="string", minLength=1, description="Airflow Connection (type mysql)")


def db_params(params: dict[str, Any]) -> DbParams:
    """The database of a run's ``conn_id`` param; call it inside a task, never at parse time."""
    return NovaApiDbHook(params["conn_id"]).get_db_params()


class RecordedApprovalOperator(ApprovalOperator):
    """ApprovalOperator that logs the answer and pushes it as XCom ``answer`` before acting on it."""

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        if "error" not in event:
            user = event.get("responded_by_user") or {}
            answer = {
                "choice": (event.get("chosen_options") or ["?"])[0],
                "by": user.get("name") or user.get("id") or "nobody: the response timeout chose the default",
                "at": str(event.get("responded_at")),
                "subject": self.subject,
            }
            self.log.info("Answer: %(choice)s by %(by)s at %(at)s for: %(subject)s", answer)
            context["ti"].xcom_push(key="answer", value=answer)
        return super().execute_complete(context, event)
