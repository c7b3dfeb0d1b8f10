"""
### nova_flavor_sync

Rewrite the stale copies of Nova's flavors, in both places Nova keeps them, with an
approval gate: each instance's own copy (`instance_extra.flavor` in its cell database)
and its RequestSpec (`request_specs` in nova_api).

`check_db` (finds the cells) → `make_plan` (one mapped task per copy: nova_api and each
cell) → `combine_plans` (one digest over both copies) → `should_apply` → `back_up` (one
backup file) → `approve` → `cell_ranges`, `request_spec_ranges` → `apply_cells` (mapped: id ranges of every
cell, written first) → `apply_request_specs` (mapped: id ranges of nova_api) → `verify`,
and `report_outcome` at the end whatever happened. A dry run (the default) stops after the
plan. Nothing is written before somebody presses **Approve** on the `approve` task
(Required Actions), and every write is bound to the plan digest shown there: rows that
changed since are conflicts.

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
    RecordedApprovalOperator,
    apply_parallelism,
    backups_dir,
    cell_conn_ids_param,
    cell_sources,
    combine_plans,
    conn_id_param,
    copy_ranges,
    database_conn_id_param,
    db_params,
    pace_settings,
    pacing_params,
    plans_dir,
    replica_params,
    stored,
    stored_plans,
    sync_outcome,
)
from nova_flavor_sync_reports import Alert, sync_ended

from nova_flavor_sync import service
from nova_flavor_sync.errors import BackupError, ConfigError, SchemaError, UsageError

STRINGS = {"type": "array", "items": {"type": "string", "minLength": 1}}
UUID_PATTERN = "^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"


@task
def check_db(params=None):
    return service.check_database(db_params(params), cell_sources=cell_sources(params))


@task(map_index_template="{{ copy_where }}")
def make_plan(copy, params=None):
    get_current_context()["copy_where"] = copy["where"]
    return service.plan_copy_to_file(
        db_params(params),
        plans_dir(),
        copy["key"],
        flavors=params["flavors"],
        instances=params["instances"],
        key_prefixes=params["key_prefixes"],
        all_keys=params["all_keys"],
        cell_sources=cell_sources(params),
    )


@task(task_id="combine_plans")
def combine(copies):
    return combine_plans(list(copies), run_id=get_current_context()["run_id"])


# Only back_up is skipped directly; the rest follow their trigger rules, so report_outcome
# (all_done) still says what happened.
@task.short_circuit(ignore_downstream_trigger_rules=False)
def should_apply(plan, params=None):
    to_update = plan["summary"]["to_update"]
    if params["dry_run"]:
        print(f"DRY RUN: {to_update} flavor copies would be rewritten; nothing was written.")
        return False
    if not to_update:
        print("Nothing to change: both copies of every instance in scope are in sync.")
        return False
    return True


@task
def back_up(plan, params=None):
    if not params["backup"]:
        print("backup=false: writing without a backup file")
        return {"backup_path": None, "records": 0, "diverged": {}}
    return service.back_up_plans(db_params(params), stored_plans(plan), backups_dir(),
                                  cell_sources=cell_sources(params))


# The id ranges the apply tasks are mapped over: the cells' (written first), then nova_api's.
@task
def cell_ranges(plan, params=None):
    return copy_ranges(plan, params["batch_size"], cells=True, auto_tune=bool(params["batch_seconds"]))


@task
def request_spec_ranges(plan, params=None):
    return copy_ranges(plan, params["batch_size"], cells=False, auto_tune=bool(params["batch_seconds"]))


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


def _apply(id_range, params):
    context = get_current_context()
    context["id_range"] = f"{id_range['where']}: rows {id_range['first_id']}-{id_range['last_id']}"
    ti = context["ti"]
    answer = ti.xcom_pull(task_ids="approve", key="answer")
    approved = ti.xcom_pull(task_ids="combine_plans")["digest"]
    backup = ti.xcom_pull(task_ids="back_up")
    print(f"Plan {approved} approved by {answer['by']} at {answer['at']}; applying {context['id_range']}")
    return service.apply_range(
        db_params(params),
        stored(id_range["plan_path"]),
        id_range["digest"],  # this copy's part of the approved digest
        first_id=id_range["first_id"],
        last_id=id_range["last_id"],
        key=id_range["key"],
        cell_sources=cell_sources(params),
        exclude_ids=(backup["diverged"] or {}).get(id_range["key"], []),
        batch_size=params["batch_size"],
        verbose=params["verbose"],
        pace=pace_settings(params),
        replicas=replica_params(params),
        pause_first=ti.map_index > 0,  # the pause falls between two ranges too
    )


# One range at a time by default: a single paced writer (batch_seconds, pause_seconds, load
# checks). $NOVA_FLAVOR_SYNC_APPLY_PARALLELISM lets several workers write disjoint ranges at
# once: of several cells side by side, or of one copy.
APPLY_TASK = {
    "map_index_template": "{{ id_range }}",
    "max_active_tis_per_dagrun": apply_parallelism(),
    "retries": APPLY_RETRIES,
    "retry_delay": APPLY_RETRY_DELAY,
    "retry_exponential_backoff": 2.0,
    "retry_policy": APPLY_RETRY_POLICY,
}


# The instance copies first (see service.apply_copies: a run that stops between the two
# leaves a stale RequestSpec, which a cold migration heals from the instance copy).
@task(**APPLY_TASK)
def apply_cells(id_range, params=None):
    return _apply(id_range, params)


# After every cell range succeeded, or when no cell had anything to write (apply_cells is
# then skipped); never after a Reject (both upstreams skipped) or a failed cell range.
@task(trigger_rule="none_failed_min_one_success", **APPLY_TASK)
def apply_request_specs(id_range, params=None):
    return _apply(id_range, params)


# Runs when the ranges were made, even if they mapped nothing (an empty map skips its apply
# task); skipped on a dry run or a Reject, where every upstream is skipped.
@task(trigger_rule="none_failed_min_one_success")
def verify(plan_path, params=None):  # the scope of the run's plan, both copies read again
    return service.verify(db_params(params), stored(plan_path), cell_sources=cell_sources(params))


# The run's only last task, so Airflow judges the run by it: it fails when the sync did not
# complete (see the DAG's doc), and succeeds after a dry run, a Reject or a verified sync.
# A failed or rejected run sends an alert (the Variable nova_flavor_sync_alerts says where).
@task(trigger_rule="all_done", on_failure_callback=Alert(sync_ended), on_success_callback=Alert(sync_ended))
def report_outcome(params=None):
    ti = get_current_context()["ti"]
    applied = [ti.xcom_pull(task_ids=task_id) for task_id in ("apply_cells", "apply_request_specs")]
    return sync_outcome(
        ti.xcom_pull(task_ids="combine_plans"),
        dry_run=params["dry_run"],
        backed_up=ti.xcom_pull(task_ids="back_up"),
        answer=ti.xcom_pull(task_ids="approve", key="answer"),
        applied=[r for part in applied if part for r in (part if isinstance(part, list) else [part])],
        verified=ti.xcom_pull(task_ids="verify"),
    )


with DAG(
    dag_id="nova_flavor_sync",
    description="Find stale flavor extra specs in both copies (RequestSpecs, instance copies in each cell) and "
    "rewrite them after approval",
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
        "dry_run": Param(True, type="boolean", description="Plan only; nothing is written"),
        "all_keys": Param(False, type="boolean", description="Also sync placement/topology keys (risky)"),
        "flavors": Param([], **STRINGS, description="Flavor ids, names or flavorids; empty = all"),
        "instances": Param([], type="array", items={"type": "string", "pattern": UUID_PATTERN},
                           description="Instance UUIDs; empty = all"),
        "key_prefixes": Param([], **STRINGS, description="Only keys starting with these; empty = all"),
        **pacing_params(),
        "backup": Param(True, type="boolean", description="Back up the rows before writing"),
        "verbose": Param(False, type="boolean", description="Log progress after every write batch"),
    },
) as dag:
    copies = check_db()
    planned = combine(make_plan.expand(copy=copies))
    saved = back_up(planned)
    approve = RecordedApprovalOperator(
        task_id="approve",
        subject="Rewrite {{ ti.xcom_pull(task_ids='combine_plans')['summary']['to_update'] }} flavor copies? "
        "(plan {{ ti.xcom_pull(task_ids='combine_plans')['digest'][:12] }})",
        body="{{ ti.xcom_pull(task_ids='combine_plans')['approval_body'] }}",
        defaults="Reject",
        response_timeout=timedelta(hours=24),
    )
    ranges = [cell_ranges(planned), request_spec_ranges(planned)]
    cells_applied = apply_cells.expand(id_range=ranges[0])
    specs_applied = apply_request_specs.expand(id_range=ranges[1])
    # the nova_api plan's file: its scope is the run's (no edge from combine_plans)
    checked = verify("{{ ti.xcom_pull(task_ids='combine_plans')['copies'][0]['plan_path'] }}")

    planned >> should_apply(planned) >> saved >> approve >> ranges
    cells_applied >> specs_applied
    [*ranges, cells_applied, specs_applied] >> checked >> report_outcome()
