"""
### nova_flavor_sync

Rewrite the stale flavor copies in Nova's RequestSpecs, with an approval gate.

`check_db` → `make_plan` → `should_apply` → `back_up` → `approve` → `apply_ranges` →
`apply_batch` (one mapped task per id range) → `verify`, and `report_outcome` at the end
whatever happened. A dry run (the default) stops after the plan. Nothing is written
before somebody presses **Approve** on the `approve` task (Required Actions), and every
write is bound to the plan digest shown there: rows that changed since are conflicts.

A run ends **success** after a dry run, when nothing needs changing, after a Reject, and
after a sync that verify found complete. It ends **failed** when planning, the backup,
any write or verify failed, or drift remains: `report_outcome` says which, then fails.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param, get_current_context, task
from airflow.sdk.definitions.retry_policy import ExceptionRetryPolicy, RetryAction, RetryRule
from nova_flavor_sync_airflow import (
    NovaApiDbHook,
    RecordedApprovalOperator,
    cell_template_url,
    conn_id_param,
    database_conn_id_param,
    db_params,
)

from nova_flavor_sync import pipeline
from nova_flavor_sync.errors import BackupError, ConfigError, SchemaError, UsageError
from nova_flavor_sync.service import MAX_BATCH_SIZE

STRINGS = {"type": "array", "items": {"type": "string", "minLength": 1}}
UUID_PATTERN = "^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"


@task
def check_db(params=None):
    return pipeline.check_database(db_params(params), template_url=cell_template_url(params))


@task
def make_plan(params=None):
    return pipeline.plan_to_file(
        db_params(params),
        pipeline.plans_dir(),
        flavors=params["flavors"],
        instances=params["instances"],
        key_prefixes=params["key_prefixes"],
        all_keys=params["all_keys"],
        template_url=cell_template_url(params),
    )


# Only back_up is skipped directly; the rest follow their trigger rules, so report_outcome
# (all_done) still says what happened.
@task.short_circuit(ignore_downstream_trigger_rules=False)
def should_apply(plan, params=None):
    to_update = plan["summary"]["to_update"]
    if params["dry_run"]:
        print(f"DRY RUN: {to_update} RequestSpecs would be rewritten; nothing was written.")
        return False
    if not to_update:
        print("Nothing to change: every RequestSpec in scope is in sync.")
        return False
    return True


@task
def back_up(plan, params=None):
    if not params["backup"]:
        print("backup=false: writing without a backup file")
        return {"backup_path": None, "records": 0, "diverged": []}
    return pipeline.back_up_plan(db_params(params), plan["plan_path"], pipeline.backups_dir())


@task
def apply_ranges(plan, params=None):
    return pipeline.apply_ranges(plan["plan_path"], params["batch_size"], auto_tune=bool(params["batch_seconds"]))


# A failed apply_batch is tried again, on purpose: every try plans its rows again from the
# database and writes only rows that still hold the approved before-bytes (compare-and-swap),
# so a try after a partial write, a lost COMMIT or a killed worker finishes the range and
# writes nothing twice. The engine already retries deadlocks and lost connections within a
# batch (seconds); these retries outlast what that cannot: a dead worker or task process, a
# database failover. 3 retries, 1, 2 then 4 minutes apart. Errors that a retry would only
# repeat (bad params, a wrong database, a changed or unreadable plan file) fail at once.
APPLY_RETRIES = 3
APPLY_RETRY_DELAY = timedelta(minutes=1)
APPLY_RETRY_POLICY = ExceptionRetryPolicy(rules=[
    RetryRule(exception=[UsageError, ConfigError, SchemaError, BackupError], action=RetryAction.FAIL,
              reason="a retry would fail the same way"),
])


# One range at a time by default: a single paced writer (batch_seconds, pause_seconds, load
# checks). $NOVA_FLAVOR_SYNC_APPLY_PARALLELISM lets several workers write disjoint ranges at once.
@task(
    map_index_template="{{ id_range }}",
    max_active_tis_per_dagrun=pipeline.apply_parallelism(),
    retries=APPLY_RETRIES,
    retry_delay=APPLY_RETRY_DELAY,
    retry_exponential_backoff=2.0,
    retry_policy=APPLY_RETRY_POLICY,
)
def apply_batch(id_range, plan, backup, params=None):
    context = get_current_context()
    context["id_range"] = f"rows {id_range['first_id']}-{id_range['last_id']}"
    answer = context["ti"].xcom_pull(task_ids="approve", key="answer")
    digest = plan["summary"]["digest"]
    print(f"Plan {digest} approved by {answer['by']} at {answer['at']}; applying {context['id_range']}")
    return pipeline.apply_range(
        db_params(params),
        plan["plan_path"],
        digest,
        first_id=id_range["first_id"],
        last_id=id_range["last_id"],
        exclude_ids=backup["diverged"],
        batch_size=params["batch_size"],
        verbose=params["verbose"],
        pace=pipeline.pace_settings(params),
        replicas=[NovaApiDbHook(conn_id).get_db_params() for conn_id in params["replica_conn_ids"]],
        pause_first=context["ti"].map_index > 0,  # the pause falls between two ranges too
    )


# Runs when apply_ranges succeeded, even if it mapped nothing (an empty map skips
# apply_batch); skipped on a dry run or a Reject, where both upstreams are skipped.
@task(trigger_rule="none_failed_min_one_success")
def verify(plan_path, params=None):
    return pipeline.verify(db_params(params), plan_path, template_url=cell_template_url(params))


# The run's only last task, so Airflow judges the run by it: it fails when the sync did not
# complete (see the DAG's doc), and succeeds after a dry run, a Reject or a verified sync.
@task(trigger_rule="all_done")
def report_outcome(params=None):
    ti = get_current_context()["ti"]
    return pipeline.sync_outcome(
        ti.xcom_pull(task_ids="make_plan"),
        dry_run=params["dry_run"],
        backed_up=ti.xcom_pull(task_ids="back_up"),
        answer=ti.xcom_pull(task_ids="approve", key="answer"),
        applied=ti.xcom_pull(task_ids="apply_batch"),
        verified=ti.xcom_pull(task_ids="verify"),
    )


with DAG(
    dag_id="nova_flavor_sync",
    description="Find stale flavor extra specs in nova_api RequestSpecs and rewrite them after approval",
    doc_md=__doc__,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["nova", "flavor"],
    params={
        "conn_id": conn_id_param(),
        "database_conn_id": database_conn_id_param(),
        "dry_run": Param(True, type="boolean", description="Plan only; nothing is written"),
        "all_keys": Param(False, type="boolean", description="Also sync placement/topology keys (risky)"),
        "flavors": Param([], **STRINGS, description="Flavor ids, names or flavorids; empty = all"),
        "instances": Param([], type="array", items={"type": "string", "pattern": UUID_PATTERN},
                           description="Instance UUIDs; empty = all"),
        "key_prefixes": Param([], **STRINGS, description="Only keys starting with these; empty = all"),
        "batch_size": Param(500, type="integer", minimum=1, maximum=MAX_BATCH_SIZE,
                            description="Rows per write transaction (the first one, when batch_seconds is set)"),
        "batch_seconds": Param(0.5, type="number", minimum=0, maximum=60,
                               description="Size the batches so each takes about this long; 0 = fixed batch_size"),
        "pause_seconds": Param(0, type="number", minimum=0, maximum=3600, description="Sleep between two batches"),
        "max_threads_running": Param(25, type="integer", minimum=0, maximum=1_000_000,
                                     description="Wait while the server's Threads_running is above this; 0 = off"),
        "replica_conn_ids": Param([], **STRINGS, description="Connections (type mysql) of replicas to watch"),
        "max_replica_lag": Param(1, type="number", minimum=0, maximum=86400,
                                 description="Wait while a replica is more seconds behind than this"),
        "flow_control_pause": Param(True, type="boolean", description="Wait while Galera flow control is active"),
        "max_load_wait": Param(600, type="number", minimum=1, maximum=86400,
                               description="Fail the batch if the server stays loaded longer than this (seconds)"),
        "backup": Param(True, type="boolean", description="Back up the rows before writing"),
        "verbose": Param(False, type="boolean", description="Log progress after every write batch"),
    },
) as dag:
    planned = make_plan()
    saved = back_up(planned)
    approve = RecordedApprovalOperator(
        task_id="approve",
        subject="Rewrite {{ ti.xcom_pull(task_ids='make_plan')['summary']['to_update'] }} RequestSpecs? "
        "(plan {{ ti.xcom_pull(task_ids='make_plan')['summary']['digest'][:12] }})",
        body="{{ ti.xcom_pull(task_ids='make_plan')['approval_body'] }}",
        defaults="Reject",
        response_timeout=timedelta(hours=24),
    )
    ranges = apply_ranges(planned)
    applied = apply_batch.partial(plan=planned, backup=saved).expand(id_range=ranges)
    checked = verify("{{ ti.xcom_pull(task_ids='make_plan')['plan_path'] }}")  # no edge from make_plan

    check_db() >> planned >> should_apply(planned) >> saved >> approve >> ranges
    [ranges, applied] >> checked >> report_outcome()
