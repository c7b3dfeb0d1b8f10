"""The approval gate, answered through Airflow's REST API while dag.test() waits.

Every test has a hard timeout (pytest-timeout), so a gate nobody answers cannot hang the suite.
"""

from __future__ import annotations

import pytest

from approval_answer import run_with_answer
from dbtools import connect, copies_hash, stale_copies, sync_both_copies


def busy_copies(params) -> list[tuple]:
    """Both copies of the demo's instances in the middle of a resize or migration (cell1's)."""
    busy = (f"JOIN `{params.database}_cell1`.instances i ON i.uuid = {{}}.instance_uuid "
            "WHERE i.deleted = 0 AND (i.vm_state = 'resized' OR i.task_state IS NOT NULL)")
    with connect(params) as conn, conn.cursor() as cur:
        cur.execute("SELECT r.id, r.spec, r.updated_at FROM request_specs r " + busy.format("r") + " ORDER BY r.id")
        specs = cur.fetchall()
        cur.execute(f"SELECT e.id, e.flavor, e.updated_at FROM `{params.database}_cell1`.instance_extra e "
                    + busy.format("e") + " ORDER BY e.id")
        return [*specs, *cur.fetchall()]


@pytest.mark.timeout(240)
def test_approve_writes_the_plan_and_the_database_ends_in_sync(nova_env, tmp_path):
    busy = busy_copies(nova_env)
    assert len(busy) == 71 * 2
    assert stale_copies(nova_env) == 1452

    dag_run, states, response = run_with_answer("nova_flavor_sync", {"dry_run": False, "all_keys": True}, "Approve")

    assert dag_run.state == "success", states
    assert states["verify"] == "success" and states["report_outcome"] == "success"
    assert response["chosen_options"] == ["Approve"]
    assert stale_copies(nova_env) == 0  # both copies
    assert busy_copies(nova_env) == busy  # left alone, byte for byte: their instances are busy
    applied = {ti.task_id: ti.map_index for ti in dag_run.get_task_instances() if ti.task_id.startswith("apply_")}
    assert set(applied) == {"apply_cells", "apply_request_specs"}
    backups = list((tmp_path / "data" / "backups").glob("flavor_copies_*.json"))
    assert len(backups) == 1


@pytest.mark.timeout(240)
def test_reject_writes_nothing_and_says_so(nova_env):
    before = copies_hash(nova_env)

    dag_run, states, _ = run_with_answer("nova_flavor_sync", {"dry_run": False}, "Reject")

    assert copies_hash(nova_env) == before
    assert states["approve"] == "success"
    assert states["cell_ranges"] == states["request_spec_ranges"] == "skipped"
    assert states["apply_cells"] == states["apply_request_specs"] == states["verify"] == "skipped"
    assert states["report_outcome"] == "success"


@pytest.mark.timeout(240)
def test_the_restore_dag_puts_the_original_bytes_back(nova_env, tmp_path):
    original = copies_hash(nova_env, copies_only=True)
    _, backup = sync_both_copies(nova_env, backup_dir=tmp_path / "backups")
    assert copies_hash(nova_env, copies_only=True) != original

    dag_run, states, _ = run_with_answer(
        "nova_flavor_restore", {"backup_path": str(backup.info.path), "dry_run": False}, "Approve"
    )

    assert dag_run.state == "success", states
    assert copies_hash(nova_env, copies_only=True) == original  # both copies, in every cell
