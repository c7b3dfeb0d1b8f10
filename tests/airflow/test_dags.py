"""The real DAG files: they import cleanly, do no I/O at parse time, and run with dag.test()."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest

from dbtools import copies_hash, sync_both_copies, table_hash

REPO = Path(__file__).resolve().parents[2]
DAG_IDS = {"nova_flavor_sync", "nova_flavor_drift_check", "nova_flavor_restore"}


def load_dags():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_every_dag_imports_without_database_or_connection_access_at_parse_time():
    def refuse(*args, **kwargs):
        raise AssertionError("I/O at parse time")

    with mock.patch("pymysql.connect", refuse), mock.patch("airflow.sdk.BaseHook.get_connection", refuse):
        bag = load_dags()
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == DAG_IDS


def test_the_sync_dag_is_wired_in_order():
    dag = load_dags().dags["nova_flavor_sync"]
    edges = {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}
    assert edges["check_db"] == ["make_plan"]  # mapped: one plan per copy (nova_api, each cell)
    assert edges["make_plan"] == ["combine_plans"]  # one digest over both copies
    assert edges["should_apply"] == ["back_up"]
    assert edges["back_up"] == ["approve"]
    assert edges["approve"] == ["cell_ranges", "request_spec_ranges"]
    assert edges["apply_cells"] == ["apply_request_specs", "verify"]  # the instance copies first
    assert edges["apply_request_specs"] == ["verify"]
    assert edges["verify"] == ["report_outcome"]
    assert "verify" not in edges["combine_plans"]  # verify must not run after a dry run
    assert dag.max_active_runs == 1 and dag.schedule is None


def test_apply_tasks_run_one_at_a_time_unless_the_operator_allows_more(monkeypatch):
    for task_id in ("apply_cells", "apply_request_specs"):
        assert load_dags().dags["nova_flavor_sync"].get_task(task_id).max_active_tis_per_dagrun == 1
    monkeypatch.setenv("NOVA_FLAVOR_SYNC_APPLY_PARALLELISM", "4")
    for task_id in ("apply_cells", "apply_request_specs"):
        assert load_dags().dags["nova_flavor_sync"].get_task(task_id).max_active_tis_per_dagrun == 4
    monkeypatch.setenv("NOVA_FLAVOR_SYNC_APPLY_PARALLELISM", "many")
    bag = load_dags()
    (error,) = [e for path, e in bag.import_errors.items() if path.endswith("nova_flavor_sync.py")]
    assert "NOVA_FLAVOR_SYNC_APPLY_PARALLELISM must be a whole number from 1 to 32, not 'many'" in error


def run_dag(dag_id: str, conf: dict):
    dag = load_dags().dags[dag_id]
    dag_run = dag.test(run_conf=conf)
    states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    return dag_run, states


def test_a_dry_run_plans_and_writes_nothing(nova_env):
    before = copies_hash(nova_env)
    dag_run, states = run_dag("nova_flavor_sync", {"dry_run": True})
    assert dag_run.state == "success", states
    planned = sorted(ti.map_index for ti in dag_run.get_task_instances() if ti.task_id == "make_plan")
    assert planned == [0, 1, 2]  # nova_api, cell1, cell2 (cell0 is never written)
    assert states["combine_plans"] == "success" and states["back_up"] == "skipped"
    assert states["verify"] == "skipped" and states["report_outcome"] == "success"
    assert copies_hash(nova_env) == before


def test_the_drift_check_fails_on_drift_and_passes_when_clean(nova_env, tmp_path):
    dag_run, states = run_dag("nova_flavor_drift_check", {})
    # check_drift records the summary (and succeeds: only then does Airflow keep its asset event)
    assert dag_run.state == "failed" and states == {"check_drift": "success", "fail_on_drift": "failed"}
    summary = dag_run.get_task_instances()[0].xcom_pull(task_ids="check_drift")["summary"]
    assert summary["to_update"] > 600 and summary["by_flavor"] and summary["by_key"]
    assert 'c5.large: trait:HW_CPU_X86_AVX512F "forbidden" -> "required" [scheduling]: 122 ' \
           "(nova_api 61, cell1 38, cell2 23)" in summary["value_changes"]  # values, not only counts
    assert summary["value_changes"][-1] == "... and 12 more lines: see the task log"

    assert set(summary["copies"]) == {"nova_api", "cell1 (835ce9b0-6a5b-5709-b701-5eb36f22fdca)",
                                      "cell2 (ada1b992-1bb5-5458-b47a-3407ad251e9e)"}  # per cell
    assert summary["to_update"] == sum(copy["to_update"] for copy in summary["copies"].values())

    sync_both_copies(nova_env, all_keys=False)  # make it clean with the engine, then check again
    dag_run, states = run_dag("nova_flavor_drift_check", {})
    assert dag_run.state == "success", states


def test_a_restore_dry_run_checks_the_backup_and_writes_nothing(nova_env, tmp_path):
    _, backup = sync_both_copies(nova_env, backup_dir=tmp_path / "backups")
    after_sync = copies_hash(nova_env)
    dag_run, states = run_dag("nova_flavor_restore", {"backup_path": str(backup.info.path)})
    assert dag_run.state == "success", states
    assert states["check_backup"] == "success" and states["approve"] == "skipped"
    assert copies_hash(nova_env) == after_sync


@pytest.mark.parametrize(
    "conf",
    [{"batch_size": 0}, {"batch_size": 10**6}, {"instances": ["not-a-uuid"]}, {"dry_run": "yes"},
     {"flavors": [""]}, {"key_prefixes": "quota:"}, {"conn_id": ""}],
    ids=["batch-size-zero", "batch-size-huge", "bad-uuid", "dry-run-not-boolean", "empty-flavor",
         "prefixes-not-a-list", "empty-conn-id"],
)
def test_bad_params_are_refused_before_anything_runs(nova_env, conf):
    from airflow.sdk.definitions.param import ParamValidationError

    before = table_hash(nova_env)
    (name,) = conf
    with pytest.raises(ParamValidationError, match=f"Invalid input for param {name}"):
        run_dag("nova_flavor_sync", conf)
    assert table_hash(nova_env) == before


def test_no_password_reaches_xcom_or_the_task_logs(demo_db, secret_account, tmp_path, monkeypatch, airflow_db):
    import sqlite3

    from dbtools import assert_no_secret

    user, url = secret_account
    monkeypatch.setenv("AIRFLOW_CONN_NOVA_API_DB", url.replace("mysql+pymysql://", "mysql://"))
    monkeypatch.setenv("NOVA_FLAVOR_SYNC_DIR", str(tmp_path / "data"))
    dag_run, states = run_dag("nova_flavor_sync", {"dry_run": True})
    assert dag_run.state == "success", states

    with sqlite3.connect(airflow_db) as meta:
        stored = "\n".join(str(row) for row in meta.execute("SELECT * FROM xcom"))
    assert "plan_path" in stored  # the search looks at this run's real XCom
    assert_no_secret(stored, "XCom")
    logs = [p for p in Path(os.environ["AIRFLOW_HOME"]).rglob("*") if p.is_file() and "log" in str(p)]
    for path in logs + list((tmp_path / "data").rglob("*")):
        if path.is_file():
            assert_no_secret(path.read_text(errors="replace"), str(path))


def test_a_cell_can_be_given_its_own_connection(nova_env, monkeypatch):
    """cell1's mapping names a server nobody can reach; its own Connection, by cell name, is used instead."""
    from dbtools import connect

    with connect(nova_env) as conn, conn.cursor() as cur:
        cur.execute("UPDATE cell_mappings SET database_connection = "
                    "REPLACE(database_connection, '127.0.0.1:', '127.0.0.1:1') WHERE name = 'cell1'")
    auth = nova_env.user + (f":{nova_env.password}" if nova_env.password else "")
    monkeypatch.setenv("AIRFLOW_CONN_NOVA_CELL1_DB",
                       f"mysql://{auth}@{nova_env.host}:{nova_env.port}/{nova_env.database}_cell1")

    dag_run, states = run_dag("nova_flavor_sync", {"dry_run": True, "cell_conn_ids": {"cell1": "nova_cell1_db"}})

    assert dag_run.state == "success", states
    (combined,) = [ti for ti in dag_run.get_task_instances() if ti.task_id == "combine_plans"]
    copies = combined.xcom_pull(task_ids="combine_plans")["summary"]["copies"]
    assert copies == {"nova_api": 726, "cell1 (835ce9b0-6a5b-5709-b701-5eb36f22fdca)": 409,
                      "cell2 (ada1b992-1bb5-5458-b47a-3407ad251e9e)": 317}
