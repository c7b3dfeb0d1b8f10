"""The Airflow environment the DAGs are developed and tested in (tests/airflow/conftest.py)."""

from __future__ import annotations

import os
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# The distributions of the `airflow` extra and the modules the DAGs will use from them.
AIRFLOW_DISTRIBUTIONS = ["apache-airflow", "apache-airflow-providers-mysql", "apache-airflow-providers-standard"]

TRIVIAL_DAG = """\
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import DAG

with DAG("nfs_trivial", schedule=None, tags=["nova-flavor-sync"]):
    approve = ApprovalOperator(task_id="approve", subject="Apply {{ params.flavor }}?", params={})
    approve >> EmptyOperator(task_id="apply")
"""


def _pinned_versions() -> dict[str, str]:
    extra = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["airflow"]
    return dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", req).groups() for req in extra)


def test_installed_airflow_is_the_pinned_one():
    import airflow

    pinned = _pinned_versions()
    assert sorted(pinned) == sorted(AIRFLOW_DISTRIBUTIONS)
    assert {name: version(name) for name in pinned} == pinned
    assert airflow.__version__ == pinned["apache-airflow"]
    assert airflow.__version__.startswith("3.")


def test_providers_import():
    from airflow.providers.mysql.hooks.mysql import MySqlHook
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    assert MySqlHook.conn_type == "mysql"
    assert ApprovalOperator.APPROVE == "Approve"
    assert ApprovalOperator.REJECT == "Reject"
    import MySQLdb  # mysqlclient, compiled against libmariadb by `make install`

    assert MySQLdb.version_info[:2] >= (2, 2)


def test_environment_is_isolated(airflow_home):
    from airflow.configuration import conf

    assert Path(os.environ["AIRFLOW_HOME"]) == airflow_home
    assert airflow_home.name.startswith("nfs-airflow-")
    assert conf.get("core", "dags_folder") == str(REPO_ROOT / "dags")
    assert conf.get("core", "plugins_folder") == str(REPO_ROOT / "plugins")
    assert conf.getboolean("core", "load_examples") is False
    assert conf.get("database", "sql_alchemy_conn") == f"sqlite:///{airflow_home / 'airflow.db'}"


def test_metadata_db(airflow_db):
    from airflow.models.dag import DagModel
    from airflow.models.pool import Pool
    from airflow.utils.db import check_migrations
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    assert airflow_db.is_file()
    check_migrations(timeout=0)  # raises unless the schema is at the Alembic head
    with create_session() as session:
        assert session.scalar(select(func.count()).select_from(DagModel)) == 0
        assert session.scalar(select(Pool.pool).where(Pool.pool == Pool.DEFAULT_POOL_NAME)) == "default_pool"


def test_dagbag_loads_a_dag_file(tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    (tmp_path / "nfs_trivial.py").write_text(TRIVIAL_DAG)
    dagbag = DagBag(dag_folder=tmp_path)

    assert dagbag.import_errors == {}
    assert sorted(dagbag.dag_ids) == ["nfs_trivial"]
    dag = dagbag.dags["nfs_trivial"]
    assert sorted(dag.task_ids) == ["apply", "approve"]
    assert dag.get_task("approve").downstream_task_ids == {"apply"}
    assert dag.get_task("approve").template_fields == ("subject", "body")


@pytest.mark.parametrize("name", ["options", "multiple"])
def test_approval_operator_fixes_its_options(name):
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    with pytest.raises(ValueError, match=f"Passing {name} to ApprovalOperator is not allowed"):
        ApprovalOperator(task_id="approve", subject="s", **{name: ["x"]})
