"""Airflow pieces the nova_flavor_sync DAGs share: the database hook and a recorded approval.

Both are thin: the hook turns the ``nova_api_db`` Connection into the engine's DbParams
(UI, ``AIRFLOW_CONN_NOVA_API_DB`` as JSON or URI, or a secrets backend: Airflow looks it
up), and the approval records who answered, when and what, even on Reject, when Airflow's
ApprovalOperator skips downstream tasks without writing any XCom.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import BaseHook, Param
from airflow.sdk.exceptions import AirflowNotFoundException

from nova_flavor_sync.airflow_conn import DEFAULT_CONN_ID, DEFAULT_DATABASE_CONN_ID, params_from_connection
from nova_flavor_sync.cells import CellSources
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


def database_conn_id_param() -> Param:
    """The ``database_conn_id`` param: which Connection holds Nova's [database] connection."""
    return Param(DEFAULT_DATABASE_CONN_ID, type="string", minLength=1,
                 description="Connection holding Nova's [database] connection (cell URL templates are filled "
                 "from it); optional")


def cell_template_url(params: dict[str, Any]) -> str | None:
    """Nova's [database] connection from the run's ``database_conn_id`` Connection, if there is one.

    The URL carries the password: it is handed to the engine, which fills templates with it
    and never logs it. It always has the ``user:password@`` form, so an empty password stays
    empty (Nova fills ``user@host`` with the password text ``None``). Call it inside a task,
    never at parse time.
    """
    try:
        conn = BaseHook.get_connection(params["database_conn_id"])
    except AirflowNotFoundException:
        return None
    db = params_from_connection(conn)
    host = f"[{db.host}]" if ":" in db.host else db.host
    return (f"mysql+pymysql://{quote(db.user, safe='')}:{quote(db.password or '', safe='')}@{host}:{db.port}/"
            f"{quote(db.database, safe='')}")


def cell_conn_ids_param() -> Param:
    """The ``cell_conn_ids`` param: a cell's own Connection, by cell name or uuid (optional)."""
    return Param({}, type="object", additionalProperties={"type": "string", "minLength": 1},
                 description="A cell's database as a Connection (type mysql), by cell name or uuid, e.g. "
                 '{"cell1": "nova_cell1_db"}; wins over its cell_mappings URL. Empty: cell_mappings, '
                 "templates filled from database_conn_id")


def cell_sources(params: dict[str, Any]) -> CellSources:
    """Where a run's cell databases are: the template filling (``database_conn_id``) and each
    cell's own Connection (``cell_conn_ids``). Call it inside a task, never at parse time."""
    return CellSources(
        template_url=cell_template_url(params),
        cell_urls={cell: NovaApiDbHook(conn_id).get_db_params()
                   for cell, conn_id in (params.get("cell_conn_ids") or {}).items()},
    )


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
