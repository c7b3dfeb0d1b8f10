"""
### nova_flavor_drift_check

Nightly: are both of Nova's copies of each instance's flavor (its RequestSpec in nova_api,
its own copy in its cell) still in sync with the flavors? Reads only, never writes.

`check_drift` logs every stale copy and its key changes, per cell, and the instances whose
two copies disagree, and keeps the summary by flavor, key and copy (cell) as an event of the
asset `nova_flavor_drift` (Browse > Flavor drift charts them, night by night); then
`fail_on_drift` fails the run when drift was found. Alerts go where the Airflow Variable
`nova_flavor_sync_alerts` says (see the README).
Sync them with the `nova_flavor_sync` DAG.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param, task
from nova_flavor_sync_airflow import (
    cell_conn_ids_param,
    cell_sources,
    conn_id_param,
    database_conn_id_param,
    db_params,
)
from nova_flavor_sync_reports import DRIFT_HISTORY, Alert, drift_check_failed, drift_found, record_drift

from nova_flavor_sync import service


# Records and succeeds: Airflow keeps an outlet's event only from a task that succeeded.
@task(outlets=[DRIFT_HISTORY], on_failure_callback=Alert(drift_check_failed))
def check_drift(params=None):
    db = db_params(params)
    return record_drift(service.drift_summary(db, all_keys=params["all_keys"], cell_sources=cell_sources(params)),
                        params, db)


@task(on_failure_callback=Alert(drift_found))
def fail_on_drift(record):
    return service.fail_on_drift(record["summary"])


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
    fail_on_drift(check_drift())
