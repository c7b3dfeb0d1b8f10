"""The approval gate, answered through Airflow's REST API while dag.test() waits.

Every test has a hard timeout (pytest-timeout), so a gate nobody answers cannot hang the suite.
"""

from __future__ import annotations

import pytest

from approval_answer import run_with_answer
from dbtools import connect, plan_request_specs, table_hash


def busy_request_specs(params) -> list[tuple]:
    """The RequestSpecs of the demo's instances in the middle of a resize or migration (cell1's)."""
    with connect(params) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT r.id, r.spec, r.updated_at FROM request_specs r "
                    f"JOIN `{params.database}_cell1`.instances i ON i.uuid = r.instance_uuid "
                    "WHERE i.deleted = 0 AND (i.vm_state = 'resized' OR i.task_state IS NOT NULL) ORDER BY r.id")
        return cur.fetchall()


@pytest.mark.timeout(240)
def test_approve_writes_the_plan_and_the_database_ends_in_sync(nova_env, tmp_path):
    busy = busy_request_specs(nova_env)
    assert len(busy) == 71

    dag_run, states, response = run_with_answer("nova_flavor_sync", {"dry_run": False, "all_keys": True}, "Approve")

    assert dag_run.state == "success", states
    assert states["verify"] == "success" and states["report_outcome"] == "success"
    assert response["chosen_options"] == ["Approve"]
    assert plan_request_specs(nova_env).changes == []
    assert busy_request_specs(nova_env) == busy  # left alone, byte for byte: their instances are busy
    backups = list((tmp_path / "data" / "backups").glob("flavor_copies_*.json"))
    assert len(backups) == 1


@pytest.mark.timeout(240)
def test_reject_writes_nothing_and_says_so(nova_env):
    before = table_hash(nova_env)

    dag_run, states, _ = run_with_answer("nova_flavor_sync", {"dry_run": False}, "Reject")

    assert table_hash(nova_env) == before
    assert states["approve"] == "success"
    assert states["apply_ranges"] == "skipped" and states["verify"] == "skipped"
    assert states["report_outcome"] == "success"


@pytest.mark.timeout(240)
def test_the_restore_dag_puts_the_original_bytes_back(nova_env, tmp_path):
    from nova_flavor_sync import service

    original = table_hash(nova_env, columns="id, instance_uuid, spec")
    with service.connect(nova_env) as db:
        flavors, scope = service.resolve_scope(db, all_keys=True)
        plan = service.make_plan(db, scope, flavors=flavors)
        backup = service.back_up(db, plan, tmp_path / "backups")
        service.apply_plan(db, plan)
    assert table_hash(nova_env, columns="id, instance_uuid, spec") != original

    dag_run, states, _ = run_with_answer(
        "nova_flavor_restore", {"backup_path": str(backup.info.path), "dry_run": False}, "Approve"
    )

    assert dag_run.state == "success", states
    assert table_hash(nova_env, columns="id, instance_uuid, spec") == original
