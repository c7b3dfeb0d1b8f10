"""Plans and backups on object storage: an S3 API server run by the test, reached through Airflow.

The server is moto's (``moto[server]``, from the lock): a real HTTP server on 127.0.0.1 that
speaks the S3 REST API, with its state in memory. The DAGs' storage is
``NOVA_FLAVOR_SYNC_STORAGE=s3://nova_s3@<bucket>/nova``: an ``ObjectStoragePath`` of the
Amazon provider, which takes the endpoint and keys from the Airflow Connection ``nova_s3``
(type aws, ``endpoint_url`` in its extra), the way an operator's would reach a real bucket.

What this proves: the S3 calls the tool makes (PUT with ``If-None-Match: *``, ranged GETs,
listings) and the answers moto gives to them, 412 for a name that is taken included. What
it does not prove: AWS IAM and bucket policies, Block Public Access, server-side encryption,
multipart uploads of large backups (over 100 MB) and the real service's limits and
consistency; see the README, "Plans and backups on object storage".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from nova_flavor_sync import service
from nova_flavor_sync.backup import BackupRecord, list_backups, load_backup, write_backup
from nova_flavor_sync.errors import BackupError, ConfigError
from nova_flavor_sync.spec_json import sha256_text
from s3tools import CONN_ID, KEYS, keys

REPO_ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 3, 14, 9, 26, 53, tzinfo=UTC)
NAME = "flavor_copies_20260314_092653.json"
DATABASE = {"host": "db", "port": 3306, "schema": "nova_api", "server_uuid": "3e11fa47-71ca-11e1-9e33-c80aa9429562"}
RECORDS = [BackupRecord.of_row(i, f"00000000-0000-0000-0000-{i:012d}", f'{{"spec": {i}, "text": "café"}}', None,
                               sha256_text(f"new {i}")) for i in (3, 5, 8)]


def backup(now: datetime = NOW, records=RECORDS):
    from nova_flavor_sync_airflow import backups_dir

    return write_backup(backups_dir(), records, databases={"nova_api": DATABASE}, plan_digest="d" * 64,
                        scope={"all_keys": False}, now=now)


def test_a_backup_is_written_as_one_object_listed_and_read_back(bucket, airflow_db, tmp_path):
    from nova_flavor_sync_airflow import backups_dir, stored

    written = backup()

    url = f"s3://{CONN_ID}@{bucket[1]}/nova/backups/{NAME}"
    assert str(written.path) == url  # what back_up returns and the restore DAG's backup_path takes
    assert list(keys(bucket)) == [f"nova/backups/{NAME}"]  # no temporary object, nothing else
    document = json.loads(keys(bucket)[f"nova/backups/{NAME}"])
    assert document["record_count"] == 3 and document["checksum"].startswith("sha256:")
    assert load_backup(stored(url)).records == RECORDS
    assert [str(info.path) for info in list_backups(backups_dir())] == [url]
    assert not (tmp_path / "local-data").exists()


def test_an_existing_object_is_never_overwritten(bucket, airflow_db):
    client, name = bucket
    client.put_object(Bucket=name, Key=f"nova/backups/{NAME}", Body=b"somebody else's object")

    first, second = backup(), backup()

    assert [first.path.name, second.path.name] == [NAME.replace(".json", "_1.json"), NAME.replace(".json", "_2.json")]
    assert keys(bucket)[f"nova/backups/{NAME}"] == b"somebody else's object"
    assert load_backup(first.path).records == load_backup(second.path).records == RECORDS


def test_a_damaged_or_truncated_object_is_refused(bucket, airflow_db):
    from nova_flavor_sync_airflow import backups_dir, stored

    client, name = bucket
    written = backup()
    good = keys(bucket)[f"nova/backups/{written.path.name}"]
    client.put_object(Bucket=name, Key="nova/backups/flavor_copies_20260314_092654.json", Body=good[: len(good) // 2])
    changed = good.replace(b'"id": 5,', b'"id": 6,')  # another row's id: still valid JSON
    assert changed != good
    client.put_object(Bucket=name, Key="nova/backups/flavor_copies_20260314_092655.json", Body=changed)
    prefix = f"s3://{CONN_ID}@{name}/nova/backups/"

    with pytest.raises(BackupError, match="is damaged or truncated: not valid JSON"):
        load_backup(stored(prefix + "flavor_copies_20260314_092654.json"))
    with pytest.raises(BackupError, match="fails its checksum: it was changed or damaged after it was written"):
        load_backup(stored(prefix + "flavor_copies_20260314_092655.json"))
    listed = service.backup_listing(backups_dir())
    assert [(entry["file"], entry.get("problem")) for entry in listed] == [
        (NAME, None),
        ("flavor_copies_20260314_092654.json", "flavor_copies_20260314_092654.json: damaged or not a backup"),
        ("flavor_copies_20260314_092655.json", None),  # the listing reads the header and trailer only
    ]


def test_a_bucket_that_does_not_exist_is_a_clear_error_and_nothing_is_written(bucket, airflow_db, monkeypatch):
    from nova_flavor_sync_airflow import backups_dir

    monkeypatch.setenv("NOVA_FLAVOR_SYNC_STORAGE", f"s3://{CONN_ID}@no-such-bucket-{bucket[1]}/nova")

    with pytest.raises(BackupError, match=f"cannot write a backup in s3://{CONN_ID}@no-such-bucket-.*/nova/backups: "):
        backup()
    assert list_backups(backups_dir()) == []
    assert keys(bucket) == {}


def test_a_storage_url_naming_a_missing_connection_is_refused(monkeypatch, airflow_db, tmp_path):
    from nova_flavor_sync_airflow import backups_dir, plans_dir

    monkeypatch.setenv("NOVA_FLAVOR_SYNC_STORAGE", "s3://no_such_conn@nfs-backups/nova")
    monkeypatch.setenv("NOVA_FLAVOR_SYNC_DIR", str(tmp_path / "local-data"))

    for where in (plans_dir, backups_dir):  # make_plan and back_up fail at once, with this message
        with pytest.raises(ConfigError, match="NOVA_FLAVOR_SYNC_STORAGE=s3://no_such_conn@nfs-backups/nova names "
                           "the Airflow Connection 'no_such_conn', which does not exist"):
            where()
    assert not (tmp_path / "local-data").exists()


def run_python(code: str, env: dict[str, str] | None = None) -> str:
    """``code`` in a new Python process (another task, another worker): the last line it printed."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": f"{REPO_ROOT / 'include'}:{REPO_ROOT / 'plugins'}", **(env or {})},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()[-1]  # after Airflow's log lines


@pytest.mark.timeout(300)  # a whole sync and restore of the demo cloud, and a second Python importing Airflow
def test_a_sync_and_its_restore_with_plans_and_backup_on_s3(bucket, demo_db, airflow_db, tmp_path):
    """What the DAGs' tasks call, in order, with every plan and the backup on S3: the plan one
    task writes is read by a task in another process, and the restore puts the backup back."""
    from nova_flavor_sync_airflow import backups_dir, combine_plans, copy_ranges, plans_dir, stored, stored_plans

    copies = service.check_database(demo_db)
    combined = combine_plans([service.plan_copy_to_file(demo_db, plans_dir(), c["key"]) for c in copies])
    assert combined["summary"]["to_update"] > 0
    for copy in combined["copies"]:
        assert copy["plan_path"].startswith(f"s3://{CONN_ID}@{bucket[1]}/nova/plans/plan_")

    ranges = copy_ranges(combined, 200, cells=True) + copy_ranges(combined, 200, cells=False)
    # cell_ranges and request_spec_ranges run in another process, maybe on another worker
    other = json.loads(run_python(
        "import json, os; from nova_flavor_sync_airflow import copy_ranges\n"
        "combined = json.loads(os.environ['COMBINED'])\n"
        "print(json.dumps(copy_ranges(combined, 200, cells=True) + copy_ranges(combined, 200, cells=False)))",
        env={"COMBINED": json.dumps(combined)},
    ))
    assert other == ranges

    backed_up = service.back_up_plans(demo_db, stored_plans(combined), backups_dir())
    assert backed_up["backup_path"].startswith(f"s3://{CONN_ID}@{bucket[1]}/nova/backups/flavor_copies_")
    assert backed_up["records"] == combined["summary"]["to_update"]
    for id_range in ranges:
        service.apply_range(demo_db, stored(id_range["plan_path"]), id_range["digest"], key=id_range["key"],
                            first_id=id_range["first_id"], last_id=id_range["last_id"], batch_size=200,
                            exclude_ids=backed_up["diverged"].get(id_range["key"], []))
    service.verify(demo_db, stored(combined["copies"][0]["plan_path"]))  # no drift left

    restored = service.restore_backup(demo_db, stored(backed_up["backup_path"]), run=True)

    # every row put back and read back as the backup holds it (restore_backup raises otherwise)
    assert restored["restored"] == backed_up["records"] and restored["errors"] == 0
    assert not (tmp_path / "local-data").exists()
    assert sorted(key.rsplit("/", 1)[0] for key in keys(bucket)) == (  # each copy's plan and changes file
        ["nova/backups"] + ["nova/plans"] * 2 * len(combined["copies"]))


def test_the_cli_lists_the_backups_the_dags_wrote(bucket, s3_endpoint, airflow_db, tmp_path):
    written = backup()
    # The CLI has no Airflow Connections: plain fsspec (s3fs), credentials and endpoint from its environment.
    url = f"s3://{bucket[1]}/nova/backups"
    done = subprocess.run(
        [sys.executable, "-m", "nova_flavor_sync", "--list-backups", "--backup-dir", url,
         "--log-file", str(tmp_path / "cli.log")],
        capture_output=True, text=True, timeout=120,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(REPO_ROOT / "include"),
             "AWS_ENDPOINT_URL": s3_endpoint, **KEYS},
    )
    assert done.returncode == 0, done.stderr
    lines = (done.stdout + done.stderr).splitlines()
    assert any(f"Backups in {url}" in line for line in lines), lines
    assert any(f"{written.path.name}  records=3  taken=2026-03-14T09:26:53Z" in line for line in lines), lines



@pytest.mark.timeout(480)  # two DAG runs with dag.test()
def test_the_dags_sync_and_restore_with_everything_on_s3(nova_env, bucket, tmp_path):
    """The real DAGs: nova_flavor_sync approved, then nova_flavor_restore of the backup's URL."""
    from approval_answer import run_with_answer
    from dbtools import copies_hash, stale_copies

    original = copies_hash(nova_env, copies_only=True)

    synced, states, _ = run_with_answer("nova_flavor_sync", {"dry_run": False, "all_keys": True}, "Approve")

    assert synced.state == "success", states
    assert stale_copies(nova_env) == 0
    backup_path = synced.get_task_instance("back_up").xcom_pull(task_ids="back_up")["backup_path"]
    assert backup_path.startswith(f"s3://{CONN_ID}@{bucket[1]}/nova/backups/flavor_copies_")
    stored_keys = sorted(keys(bucket))
    assert [k.split("/")[1] for k in stored_keys].count("plans") >= 2  # nova_api's and the cells'
    assert [k for k in stored_keys if k.startswith("nova/backups/")] == [backup_path.split("@", 1)[1].split("/", 1)[1]]

    restored, states, _ = run_with_answer("nova_flavor_restore", {"backup_path": backup_path, "dry_run": False},
                                          "Approve")

    assert restored.state == "success", states
    assert copies_hash(nova_env, copies_only=True) == original  # both copies, in every cell
    assert not (tmp_path / "data").exists() and not (tmp_path / "local-data").exists()  # nothing on local disk
