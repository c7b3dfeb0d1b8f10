"""
### nova_flavor_restore

Put back the flavor copies saved in a nova_flavor_sync backup: RequestSpecs in nova_api
and instance copies in each cell database the backup names. The backup is checked first
(checksum, format, each database the same it was taken from); a dry run (the default) shows
what would be restored.
Otherwise an approval is asked for, then rows are restored with compare-and-swap (only rows
still as the sync left them, unless `force`) and read back to check their bytes.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param, task
from nova_flavor_sync_airflow import (
    RecordedApprovalOperator,
    cell_conn_ids_param,
    cell_sources,
    conn_id_param,
    database_conn_id_param,
    db_params,
    pace_settings,
    pacing_params,
    replica_params,
    stored,
)

from nova_flavor_sync import service


@task
def check_backup(params=None):
    return service.restore_backup(db_params(params), stored(params["backup_path"]), run=False, force=params["force"],
                                   cell_sources=cell_sources(params))


@task.short_circuit
def should_restore(checked, params=None):
    if params["dry_run"]:
        print(f"DRY RUN: {checked['would_restore']} rows would be restored; nothing was written.")
        return False
    return checked["would_restore"] > 0


@task
def restore(params=None):
    return service.restore_backup(
        db_params(params), stored(params["backup_path"]), run=True, force=params["force"],
        batch_size=params["batch_size"],
        pace=pace_settings(params), replicas=replica_params(params), cell_sources=cell_sources(params),
    )


with DAG(
    dag_id="nova_flavor_restore",
    description="Restore both flavor copies from a nova_flavor_sync backup, after approval",
    doc_md=__doc__,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["nova", "flavor"],
    params={
        "conn_id": conn_id_param(),
        "database_conn_id": database_conn_id_param(),
        "cell_conn_ids": cell_conn_ids_param(),
        "backup_path": Param(type="string", minLength=1,
                             description="Backup file, or its URL on object storage "
                             "(Browse > Flavor sync backups lists them)"),
        "dry_run": Param(True, type="boolean", description="Only check the backup and show what would be restored"),
        "force": Param(False, type="boolean", description="Also restore rows changed since the sync"),
        **pacing_params(),  # paced as a sync's writes are
    },
) as dag:
    checked = check_backup()
    approve = RecordedApprovalOperator(
        task_id="approve",
        subject="Restore {{ ti.xcom_pull(task_ids='check_backup')['would_restore'] }} flavor copies "
        "from {{ params.backup_path }}?",
        body="Backup `{{ params.backup_path }}` (plan `{{ ti.xcom_pull(task_ids='check_backup')['plan_digest'] }}`): "
        "{{ ti.xcom_pull(task_ids='check_backup')['would_restore'] }} rows would be restored "
        "({{ ti.xcom_pull(task_ids='check_backup')['by_database'] }}), "
        "{{ ti.xcom_pull(task_ids='check_backup')['skipped'] }} skipped.",
        defaults="Reject",
        response_timeout=timedelta(hours=24),
    )
    checked >> should_restore(checked) >> approve >> restore()
