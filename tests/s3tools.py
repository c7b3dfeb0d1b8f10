"""An S3 API server for tests: moto's, run by the test on 127.0.0.1, reached through Airflow.

``bucket`` makes a new bucket, the Airflow Connection ``nova_s3`` to it (type aws, the
server as ``endpoint_url``, fake keys) and points the DAGs' storage at it:
``NOVA_FLAVOR_SYNC_STORAGE=s3://nova_s3@<bucket>/nova``. tests/airflow/conftest.py imports the fixtures.
"""

from __future__ import annotations

import json
import uuid

import boto3
import pytest
from moto.server import ThreadedMotoServer

CONN_ID = "nova_s3"
KEYS = {"AWS_ACCESS_KEY_ID": "fake-key-id", "AWS_SECRET_ACCESS_KEY": "fake-secret", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on a free port of 127.0.0.1, for the session (Airflow keeps a Connection's
    file system once made: one endpoint per session)."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint, monkeypatch, tmp_path):
    """A new bucket, the ``nova_s3`` Connection to it and the DAGs' storage in it; returns a boto3 client and it.

    ``NOVA_FLAVOR_SYNC_DIR`` points at a directory that must stay absent: nothing goes to local disk.
    """
    name = f"nfs-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                          region_name="us-east-1")
    client.create_bucket(Bucket=name)
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps({
        "conn_type": "aws", "login": KEYS["AWS_ACCESS_KEY_ID"], "password": KEYS["AWS_SECRET_ACCESS_KEY"],
        "extra": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
    }))
    monkeypatch.setenv("NOVA_FLAVOR_SYNC_STORAGE", f"s3://{CONN_ID}@{name}/nova")
    monkeypatch.setenv("NOVA_FLAVOR_SYNC_DIR", str(tmp_path / "local-data"))
    return client, name


def keys(bucket) -> dict[str, bytes]:
    """Every object in the bucket: key -> bytes."""
    client, name = bucket
    listed = client.list_objects_v2(Bucket=name).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=name, Key=o["Key"])["Body"].read() for o in listed}
