"""A sync whose backup, writes or verify failed ends failed, in the REST API too; nothing is torn.

Each failure is provoked for real in the test's own copy of the demo cloud: a trigger on
request_specs makes MariaDB refuse the UPDATE (a SIGNAL, as a read-only or broken database
would), or quietly keep the old spec (so drift remains for verify to find), and a file
standing where the backup directory belongs makes the backup impossible to write.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from approval_answer import rest_api_run, run_with_answer
from dbtools import connect, copies_hash, stale_copies, table_hash

SYNC = "nova_flavor_sync"
CONF = {"dry_run": False, "all_keys": True}
SPEC_COLUMNS = "id, instance_uuid, spec"
APPLY_TASKS = ("apply_cells", "apply_request_specs")


def refuse_updates(params, times: int) -> None:
    """Make the server refuse the next ``times`` UPDATE statements on request_specs.

    The count lives in a MyISAM table: it is not transactional, so the decrement survives
    the rollback of the refused statement.
    """
    with connect(params) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE nfs_refusals (remaining INT NOT NULL) ENGINE=MyISAM")
        cur.execute("INSERT INTO nfs_refusals VALUES (%s)", (times,))
        cur.execute(
            "CREATE TRIGGER nfs_refuse BEFORE UPDATE ON request_specs FOR EACH ROW "
            "BEGIN "
            "  IF (SELECT remaining FROM nfs_refusals) > 0 THEN "
            "    UPDATE nfs_refusals SET remaining = remaining - 1; "
            "    SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'writes refused by the test'; "
            "  END IF; "
            "END"
        )


def refusals_left(params) -> int:
    with connect(params) as conn, conn.cursor() as cur:
        cur.execute("SELECT remaining FROM nfs_refusals")
        return cur.fetchone()[0]


def short_retry_delay(dag) -> None:
    """The real retries, one second apart instead of minutes (dag.test() waits them out)."""
    for task_id in APPLY_TASKS:
        task = dag.get_task(task_id)
        assert task.retries == 3  # what an operator's run gets
        task.retry_delay = timedelta(seconds=1)


def no_retries(dag) -> None:
    for task_id in APPLY_TASKS:
        dag.get_task(task_id).retries = 0


def in_sync(params) -> bool:
    """No flavor copy left to sync, in either copy (those of busy instances are left alone)."""
    return stale_copies(params) == 0


def assert_failed_everywhere(dag_run, states) -> None:
    assert dag_run.state == "failed", states
    assert states["report_outcome"] == "failed", states
    assert rest_api_run(SYNC, dag_run.run_id)["state"] == "failed"


@pytest.mark.timeout(240)
def test_a_database_that_refuses_the_writes_fails_the_run_and_writes_nothing(nova_env):
    refuse_updates(nova_env, times=1_000_000)
    before = table_hash(nova_env)

    dag_run, states, _ = run_with_answer(SYNC, CONF, "Approve", adjust=no_retries)

    assert_failed_everywhere(dag_run, states)
    # The instance copies are written first; the refused RequestSpec batch was rolled back whole.
    assert states["apply_cells[0]"] == "success" and states["apply_request_specs[0]"] == "failed"
    assert states["verify"] == "upstream_failed"
    assert table_hash(nova_env) == before


@pytest.mark.timeout(240)
def test_a_batch_that_failed_once_is_retried_and_the_run_completes(nova_env):
    refuse_updates(nova_env, times=1)

    dag_run, states, _ = run_with_answer(SYNC, CONF, "Approve", adjust=short_retry_delay)

    assert refusals_left(nova_env) == 0  # the first try really was refused
    assert dag_run.state == "success", states
    (apply_ti,) = [ti for ti in dag_run.get_task_instances() if ti.task_id == "apply_request_specs"]
    assert apply_ti.try_number == 2
    assert states["verify"] == "success"
    assert rest_api_run(SYNC, dag_run.run_id)["state"] == "success"
    assert in_sync(nova_env)


@pytest.mark.timeout(240)
def test_drift_left_after_the_writes_fails_verify_and_the_run(nova_env):
    # Every UPDATE "succeeds" but the spec keeps its old bytes: drift remains for verify.
    with connect(nova_env) as conn, conn.cursor() as cur:
        cur.execute("CREATE TRIGGER nfs_undo BEFORE UPDATE ON request_specs FOR EACH ROW SET NEW.spec = OLD.spec")
    before = table_hash(nova_env, columns=SPEC_COLUMNS)

    dag_run, states, _ = run_with_answer(SYNC, CONF, "Approve")

    assert_failed_everywhere(dag_run, states)
    assert states["apply_request_specs[0]"] == "success" and states["verify"] == "failed"
    assert table_hash(nova_env, columns=SPEC_COLUMNS) == before


@pytest.mark.timeout(240)
def test_a_cell_that_cannot_be_reached_fails_the_run_before_anything_is_written(nova_env):
    with connect(nova_env) as conn, conn.cursor() as cur:
        cur.execute("UPDATE cell_mappings SET database_connection = "
                    "REPLACE(database_connection, '127.0.0.1:', '127.0.0.1:1') WHERE name = 'cell1'")
    before = copies_hash(nova_env)

    dag_run, states, _ = run_with_answer(SYNC, CONF, None)

    assert_failed_everywhere(dag_run, states)
    assert states["check_db"] == "failed" and states["make_plan"] == "upstream_failed"
    assert copies_hash(nova_env) == before


@pytest.mark.timeout(240)
def test_a_backup_that_cannot_be_written_fails_the_run_before_the_approval(nova_env, tmp_path):
    # A file where the backup directory belongs: the backup cannot be created (even as root).
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "backups").write_text("not a directory")
    before = copies_hash(nova_env)

    dag_run, states, _ = run_with_answer(SYNC, CONF, None)

    assert_failed_everywhere(dag_run, states)
    assert states["back_up"] == "failed" and states["approve"] == "upstream_failed"
    assert copies_hash(nova_env) == before
