"""The three-node MariaDB Galera cluster the tests of this folder share (issue 13).

One cluster per session (``galera_cluster.GaleraCluster``: three ``mariadbd`` on loopback,
bootstrapped and joined by rsync SST in about 10 s), the demo cloud loaded once through node 1
as a template, and for each test a fresh copy of it (``galera_cloud``). A test that breaks the
cluster (a node killed, a node isolated) leaves it to the next ``galera_cloud``, which joins
every node again before it hands the cluster out. Every node is killed at the end, even after
a failure. Skipped, with the reason, only when this machine cannot run a cluster at all.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from dbtools import copy_database, new_database_name, nova_database_connection
from galera_cluster import GaleraCluster, Node, missing_tools
from nova_flavor_sync.db import CELL_REQUIRED_COLUMNS
from nova_flavor_sync.dburl import DbParams
from nova_flavor_sync.demo import DEMO_CELLS, cell_database_name, create_demo_cloud, drop_database, point_cell_mappings

CELL_TABLES = sorted(CELL_REQUIRED_COLUMNS)
TIMINGS: dict[str, float] = {}


def node_kwargs(node: Node) -> dict:
    return {"host": "127.0.0.1", "port": node.port, "user": "root", "password": ""}


@dataclass
class GaleraEnv:
    cluster: GaleraCluster
    template: str  # the demo cloud's API database, loaded once through node 1

    @property
    def nodes(self) -> list[Node]:
        return self.cluster.nodes


@pytest.fixture(scope="session")
def galera() -> Iterator[GaleraEnv]:
    missing = missing_tools()
    if missing:
        pytest.skip(f"a Galera cluster cannot run here: missing {', '.join(missing)} "
                    "(`make install` installs galera-4, mariadb-server and rsync as root)")
    started = time.monotonic()
    cluster = GaleraCluster(3)
    try:
        cluster.start()
        TIMINGS.update(cluster.timings)
        template = new_database_name("nfs_galera")
        create_demo_cloud(node_kwargs(cluster.nodes[0]), template)
        TIMINGS["demo_loaded"] = time.monotonic() - started
        print(f"\n[galera] cluster of 3 Synced in {cluster.timings['all_synced']:.1f} s "
              f"(bootstrap {cluster.timings['bootstrap']:.1f} s), demo cloud loaded after "
              f"{TIMINGS['demo_loaded']:.1f} s")
        yield GaleraEnv(cluster, template)
    finally:
        cluster.remove()


def heal(cluster: GaleraCluster) -> None:
    """Every node back in a primary component of 3, default flow-control settings, no limits."""
    for node in cluster.nodes:
        if not node.alive():
            started = time.monotonic()
            cluster.restart_node(node)
            print(f"\n[galera] {node.name} joined again by SST in {time.monotonic() - started:.1f} s")
    for node in cluster.nodes:
        node.sql("SET GLOBAL wsrep_provider_options = 'gmcast.isolate=0; gcs.fc_limit=16; gcs.fc_factor=1.0'",
                 "SET GLOBAL wsrep_max_ws_rows = 0", "SET GLOBAL wsrep_max_ws_size = 2147483647")
    cluster.wait_size(len(cluster.nodes), timeout=60)


@dataclass
class GaleraCloud:
    """One test's demo cloud on the cluster: its API database, seen through each node."""

    env: GaleraEnv
    database: str

    def api(self, node: int = 0) -> DbParams:
        """The API database through node ``node`` (0-based)."""
        return self.env.nodes[node].params_for(self.database)

    def url(self, node: int = 0) -> str:
        return f"{self.env.nodes[node].url}/{self.database}"


@pytest.fixture
def galera_cloud(galera: GaleraEnv, monkeypatch: pytest.MonkeyPatch) -> Iterator[GaleraCloud]:
    """A fresh copy of the demo cloud in the cluster (written through node 1), the cluster healthy."""
    heal(galera.cluster)
    first = galera.nodes[0]
    kwargs = node_kwargs(first)
    monkeypatch.setenv("NOVA_DATABASE_CONNECTION", nova_database_connection(kwargs))
    name = new_database_name("nfs_galera")
    cells = {cell: cell_database_name(name, cell) for cell in DEMO_CELLS}
    source = galera.template
    try:
        copy_database(kwargs, source, name)  # every table of the API database, and its rows
        for cell, database in cells.items():
            copy_database(kwargs, cell_database_name(source, cell), database, CELL_TABLES)
        point_cell_mappings(kwargs, name, cells)
        yield GaleraCloud(galera, name)
    finally:
        heal(galera.cluster)  # a node the test killed or cut off: back, so the drops replicate
        for database in [name, *cells.values()]:
            drop_database(kwargs, database)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "galera: starts a three-node MariaDB Galera cluster (tests/galera)")
