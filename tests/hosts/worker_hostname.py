"""``[core] hostname_callable`` of the Celery test's workers (tests/airflow/test_celery_executor.py).

The two workers run on one machine but stand for two hosts: each reports the name in
``$NFS_TEST_WORKER_HOSTNAME`` as the host its tasks ran on (a task instance's ``hostname``),
where Airflow would report the machine's FQDN. Only that test's workers import this.
"""

import os

HOSTNAME_ENV = "NFS_TEST_WORKER_HOSTNAME"


def hostname() -> str:
    return os.environ[HOSTNAME_ENV]
