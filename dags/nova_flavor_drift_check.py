"""
### nova_flavor_drift_check

Nightly: are both of Nova's copies of each instance's flavor (its RequestSpec in nova_api,
its own copy in its cell) still in sync with the flavors? Reads only, never writes. The run
fails when drift is found; its log lists every stale copy and its key changes, per cell,
and the instances whose two copies disagree; the summary by flavor, key and copy (cell) is
in XCom (and in the failure message).
Sync them with the `nova_flavor_sync` DAG.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param, get_current_context, task
from nova_flavor_sync_airflow import (
    cell_conn_ids_param,
    cell_sources,
    conn_id_param,
    database_conn_id_param,
    db_params,
)

from nova_flavor_sync import service


@task
def check_drift(params=None):
    summary = service.drift_summary(db_params(params), all_keys=params["all_keys"],
                                     cell_sources=cell_sources(params))
    get_current_context()["ti"].xcom_push(key="summary", value=summary)  # kept when the task fails
    return service.fail_on_drift(summary)


with DAG(
    dag_id="nova_flavor_drift_check",
    description="Nightly, read-only: fail when flavor copies (RequestSpecs, instance copies) have drifted",
    doc_md=__doc__,
    schedule="30 2 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["nova", "flavor"],
    params={
        "conn_id": conn_id_param(),
        "database_conn_id": database_conn_id_param(),
        "cell_conn_ids": cell_conn_ids_param(),
        "all_keys": Param(False, type="boolean",
                          description="Count drift in placement/topology keys too (held back by a default sync)"),
    },
) as dag:
    check_drift()
