"""The sync on a real three-node MariaDB Galera cluster, with faults (issue 13).

The command line runs as an operator runs it (a process of its own, ``python -m
nova_flavor_sync``), writing through node 1 unless a case says otherwise; the checks read
through another node with ``wsrep_sync_wait`` set, so they see every committed write. Each
case prints its figures (``-s`` shows them; the README's Galera table quotes them).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import nova_flavor_sync
from dbtools import enlarge, nova_database_connection
from galera_cluster import FlowControl, GaleraCluster
from nova_flavor_sync import service
from nova_flavor_sync.backup import load_backup
from nova_flavor_sync.demo import DEMO_CELLS
from nova_flavor_sync.spec_json import (
    INSTANCE_FLAVOR,
    REQUEST_SPEC,
    rewrite_extra_specs,
    sha256_text,
)
from nova_flavor_sync.throttle import PaceSettings

pytestmark = [pytest.mark.db, pytest.mark.galera]

INCLUDE = Path(nova_flavor_sync.__file__).resolve().parents[1]
WRITER = Path(__file__).parents[1] / "safety" / "nova_writer.py"
FIGURES: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_figures():
    yield
    if FIGURES:
        print("\n[galera figures]\n" + "\n".join(f"  {k}: {v}" for k, v in FIGURES.items()))


# -- helpers --------------------------------------------------------------------------------


@dataclass
class Result:
    code: int
    out: str
    err: str
    seconds: float

    @property
    def shown(self) -> str:
        return f"--- exit {self.code} after {self.seconds:.1f} s\n--- stdout:\n{self.out}\n--- stderr:\n{self.err}"


def cli_command(tmp_path: Path, *args: object) -> list[str]:
    return [sys.executable, "-m", "nova_flavor_sync", "--log-file", str(tmp_path / "log"),
            "--backup-dir", str(tmp_path / "backups"), *map(str, args)]


def cli_env(**overrides: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(INCLUDE), **overrides}


def start_cli(tmp_path: Path, *args: object, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, float]:
    proc = subprocess.Popen(cli_command(tmp_path, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=cli_env(**(env or {})))
    return proc, time.monotonic()


def finish_cli(proc: subprocess.Popen, started: float, timeout: float = 90) -> Result:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the CLI hung for more than {timeout} s:\n{out}\n{err}") from None
    return Result(proc.returncode, out, err, time.monotonic() - started)


def run_cli(tmp_path: Path, *args: object, timeout: float = 90, env: dict[str, str] | None = None) -> Result:
    return finish_cli(*start_cli(tmp_path, *args, env=env), timeout=timeout)


def cells_through(cloud, node: int) -> list[str]:
    """--cell-db-url for every cell through ``node``: cell_mappings name node 1 (a real cloud, a VIP)."""
    return [f"--cell-db-url={cell}={cloud.url(node)}_{cell}" for cell in DEMO_CELLS]


def log_time(out: str, pattern: str) -> float | None:
    """Seconds between the first log line and the first one matching ``pattern`` (1 s resolution)."""
    stamps = re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\] \[[A-Z]+\] (.*)$", out, re.M)
    if not stamps:
        return None
    first = time.mktime(time.strptime(stamps[0][0], "%Y-%m-%d %H:%M:%S"))
    for stamp, text in stamps:
        if re.search(pattern, text):
            return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) - first
    return None


def applied_counts(out: str) -> dict[str, int]:
    """{"nova_api" or the cell's name: rows updated} from a run's "Applied in ..." lines."""
    found = re.findall(r"(RequestSpecs in nova_api|Instance copies in (\w+) \([0-9a-f-]+\)):\n.*\] \[INFO\]   "
                       r"Applied in \d+ batches \(\d+ retries\): (\d+) updated", out)
    return {cell or "nova_api": int(updated) for _, cell, updated in found}


# Both flavor copies of an instance: its RequestSpec in nova_api, its instance copy in its cell.
# A row is keyed (where, id): where is "nova_api" or the cell's name ("cell1", "cell2").
COPIES = {"nova_api": ("", "request_specs", "spec"), "cell1": ("_cell1", "instance_extra", "flavor"),
          "cell2": ("_cell2", "instance_extra", "flavor")}
Key = tuple[str, int]


def layout_of(where: str):
    return REQUEST_SPEC if where == "nova_api" else INSTANCE_FLAVOR


def read_copies(cluster: GaleraCluster, database: str, node: int = 1) -> dict[Key, tuple[str, str]]:
    """Every row of both copies through ``node``, after it caught up with the cluster (wsrep_sync_wait):
    {(where, id): (instance uuid, text)}."""
    found = {}
    with cluster.nodes[node].connect(init_command="SET SESSION wsrep_sync_wait = 1") as conn, conn.cursor() as cur:
        for where, (suffix, table, column) in COPIES.items():
            cur.execute(f"SELECT id, instance_uuid, {column} FROM `{database}{suffix}`.{table}")
            found.update(((where, row_id), (uuid_, text)) for row_id, uuid_, text in cur.fetchall())
    return found


def plan_copies(params):
    """The plan of both copies, as the CLI makes it now with --all-keys (every cell open), and the
    cells' names by uuid."""
    with service.connect(params) as db, service.open_cells_of(db) as cells:
        flavors, scope = service.resolve_scope(db, all_keys=True)
        return service.plan_both_copies(db, cells, scope, flavors=flavors), {m.uuid: m.name for m, _ in cells}


def planned_targets(params) -> dict[Key, dict[str, str]]:
    """{(where, row id): target extra specs} of both copies' plans a run with --all-keys makes now."""
    cloud, names = plan_copies(params)
    return {(names.get(copy.cell_uuid, "nova_api"), c.id): dict(c.diff.target_extra_specs)
            for copy in cloud.copies for c in copy.plan.changes}


def assert_not_torn(before: dict[Key, tuple[str, str]], after: dict[Key, tuple[str, str]],
                    targets: dict[Key, dict[str, str]]) -> set[Key]:
    """Every row of both copies holds its old bytes or its planned new ones; returns the rows holding the new."""
    assert set(after) == set(before)
    rewritten = set()
    for key, (uuid_, text) in after.items():
        old = before[key][1]
        assert uuid_ == before[key][0]
        if text == old:
            continue
        assert key in targets, f"row {key} changed but was not planned"
        assert text == rewrite_extra_specs(old, targets[key], layout=layout_of(key[0])), f"row {key} is torn"
        rewritten.add(key)
    return rewritten


def by_copy(keys) -> dict[str, int]:
    counts = dict.fromkeys(COPIES, 0)
    for where, _ in keys:
        counts[where] += 1
    return counts


def status_counter(node, name: str) -> int:
    return int(node.status(name)[name])


# -- the cluster ----------------------------------------------------------------------------


def test_the_cluster_is_three_synced_nodes_holding_the_same_demo_cloud(galera_cloud):
    cluster = galera_cloud.env.cluster
    states = [node.status() for node in cluster.nodes]
    assert [s["wsrep_cluster_size"] for s in states] == ["3"] * 3
    assert [s["wsrep_local_state_comment"] for s in states] == ["Synced"] * 3
    assert len({s["wsrep_cluster_state_uuid"] for s in states}) == 1
    copies = [read_copies(cluster, galera_cloud.database, node) for node in range(3)]  # both copies
    counts = by_copy(copies[0])
    assert counts["nova_api"] == 1500 and counts["cell1"] > 500 and counts["cell2"] > 500, counts
    assert copies[0] == copies[1] == copies[2]
    # What the backups record: the same cluster uuid through every node, although the nodes
    # share hostname and server_id (as here) and differ only by port.
    identities = []
    for node in range(3):
        with service.connect(galera_cloud.api(node)) as db:
            identities.append(db.server_identity())
    assert len({i["galera_cluster_uuid"] for i in identities}) == 1
    assert identities[0]["galera_cluster_uuid"] == states[0]["wsrep_cluster_state_uuid"]
    assert len({(i["server_hostname"], i["server_id"]) for i in identities}) == 1


# -- writes racing across nodes -------------------------------------------------------------


def start_writer(cloud, node: int, seed: int, ids: str, log_path: Path) -> subprocess.Popen:
    params = cloud.api(node)
    cells = [f"--cell-database={params.database}_{cell}" for cell in ("cell1", "cell2")]
    return subprocess.Popen(
        [sys.executable, str(WRITER), "--host", params.host, "--port", str(params.port), "--user", params.user,
         "--database", params.database, *cells, "--seed", str(seed), "--log", str(log_path), "--max-seconds", "60",
         "--ids", ids],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def stop_writer(proc: subprocess.Popen) -> dict:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def sync_both_copies(params, settings: PaceSettings | None, backups: Path | None, cell_urls=None):
    """What a CLI run with --all-keys does, through the service: plan both copies, back them up,
    write them (cells first), each database paced; returns the plan and {(where, id)} sets."""
    with service.connect(params) as db, service.open_cells_of(db, cell_urls=cell_urls) as cells:
        names = {mapping.uuid: mapping.name for mapping, _ in cells}
        flavors, scope = service.resolve_scope(db, all_keys=True)
        cloud = service.plan_both_copies(db, cells, scope, flavors=flavors)
        databases = service.databases_of(db, cells)
        excluded = {}
        if backups is not None:
            excluded = service.back_up_copies(databases, cloud.copies, backups, digest=cloud.digest, scope=scope,
                                              cell_names=names).diverged_by_database
        with service.pacers(settings or PaceSettings(batch_size=500, target_batch_s=None)) as pacer_for:
            applied = service.apply_copies(databases, cloud.copies, batch_size=settings.batch_size if settings else 500,
                                           exclude=excluded, pacer_for=pacer_for if settings else None)
    where = {copy.key: names.get(copy.cell_uuid, "nova_api") for copy in cloud.copies}
    changes = {(where[copy.key], c.id): c for copy in cloud.copies for c in copy.plan.changes}
    outcome = {name: set() for name in ("updated", "already", "conflicts", "errors", "gone")}
    retries = 0
    for done in applied:
        retries += done.result.retries
        for name, keys in outcome.items():
            keys.update((where[done.copy.key], i) for i in getattr(done.result, name))
    return changes, outcome, retries


@pytest.mark.timeout(180)
def test_nova_writers_through_nodes_2_and_3_race_the_sync_through_node_1_and_lose_nothing(galera_cloud, tmp_path):
    """Nova saves RequestSpecs and, in the cells, instance copies through nodes 2 and 3 while the
    sync writes both copies through node 1."""
    cluster = galera_cloud.env.cluster
    node1 = cluster.nodes[0]
    enlarge(galera_cloud.api(0), 3000, seed=13)
    original = read_copies(cluster, galera_cloud.database, 0)
    logs = [tmp_path / "writer2.jsonl", tmp_path / "writer3.jsonl"]
    # Two Nova-like writers, through node 2 (even ids) and node 3 (odd ids): every row has one
    # serial writer, racing the sync through another node.
    writers = [start_writer(galera_cloud, 1, 1302, "2:0", logs[0]), start_writer(galera_cloud, 2, 1303, "2:1", logs[1])]
    cert_before = status_counter(node1, "wsrep_local_cert_failures") + status_counter(node1, "wsrep_local_bf_aborts")
    try:
        deadline = time.monotonic() + 20
        while not all(p.exists() and p.stat().st_size > 2000 for p in logs):
            assert all(w.poll() is None for w in writers), [w.communicate() for w in writers]
            assert time.monotonic() < deadline, "the writers made no writes"
            time.sleep(0.05)
        settings = PaceSettings(batch_size=200, target_batch_s=None, max_threads_running=None, max_wait_s=60)
        t_start = time.monotonic()
        changes, result, retries = sync_both_copies(galera_cloud.api(0), settings, tmp_path / "backups")
        t_applied = time.monotonic()
        time.sleep(0.2)
        outcomes = [stop_writer(w) for w in writers]
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait(10)
    cert_failures = (status_counter(node1, "wsrep_local_cert_failures")
                     + status_counter(node1, "wsrep_local_bf_aborts") - cert_before)

    where = {galera_cloud.database: "nova_api", **{f"{galera_cloud.database}_{c}": c for c in ("cell1", "cell2")}}
    entries = [json.loads(line) for path in logs for line in path.read_text().splitlines()]
    assert len(entries) == sum(o["writes"] for o in outcomes)
    last: dict[Key, dict] = {}
    for entry in sorted(entries, key=lambda e: e["seq"]):  # one writer per row: its own order
        last[where[entry["database"]], entry["id"]] = entry
    final = read_copies(cluster, galera_cloud.database, 1)
    targets = {key: dict(c.diff.target_extra_specs) for key, c in changes.items()}
    updated, already, conflicts = result["updated"], result["already"], result["conflicts"]

    # 0 lost writes, in both copies: each row's final text is its writer's last write, or the
    # sync's rewrite of exactly it.
    lost = []
    for key, write in last.items():
        text = final[key][1]
        if text == write["text"]:
            continue
        change = changes.get(key)
        if (change is not None and sha256_text(write["text"]) == change.old_sha256
                and text == rewrite_extra_specs(write["text"], targets[key], layout=layout_of(key[0]))):
            assert key in updated
            continue
        lost.append(key)
    assert lost == [], f"{len(lost)} writes lost, e.g. rows {lost[:10]}"
    # 0 torn: rows no writer touched hold their old bytes or exactly the planned new ones; all are Nova's JSON.
    untouched = {key: original[key] for key in set(final) - set(last)}
    assert_not_torn(untouched, {key: final[key] for key in untouched}, targets)
    for _, text in final.values():
        assert json.dumps(json.loads(text)) == text
    # Every planned row accounted for; the conflicts are reported, never overwritten.
    assert not result["errors"] and not result["gone"]
    assert updated | already | conflicts == set(changes)
    assert len(updated) + len(already) + len(conflicts) == len(changes)
    raced = sum(1 for e in entries if e["t1"] > t_start and e["t0"] < t_applied)
    assert raced > 100, "the writers hardly raced the sync"
    written_by_copy, conflicts_by_copy = by_copy(k for k in last), by_copy(conflicts)
    assert all(written_by_copy.values()), f"the writers did not save every copy: {written_by_copy}"
    assert conflicts_by_copy["nova_api"] and conflicts_by_copy["cell1"] + conflicts_by_copy["cell2"], \
        f"the race did not reach both copies: conflicts {conflicts_by_copy}"

    # A rerun through node 2 (its cells too), writers stopped, converges and keeps what they wrote.
    changes2, result2, _ = sync_both_copies(galera_cloud.api(1), None, None,
                                            cell_urls={c: f"{galera_cloud.url(1)}_{c}" for c in DEMO_CELLS})
    assert not result2["conflicts"] and not result2["errors"] and result2["updated"] == set(changes2)
    for _ in range(50):  # node 1 applies node 2's writes asynchronously
        after, _ = plan_copies(galera_cloud.api(0))
        if not after.to_update:
            break
        time.sleep(0.1)
    assert after.to_update == 0 and not any(copy.plan.errors for copy in after.copies)
    rerun = read_copies(cluster, galera_cloud.database, 2)
    for key in last:  # the writers' last writes survive the rerun too, flavor aside
        change = changes2.get(key)
        assert rerun[key][1] == final[key][1] or (
            change is not None and change.old_sha256 == sha256_text(final[key][1])
            and rerun[key][1] == rewrite_extra_specs(final[key][1], dict(change.diff.target_extra_specs),
                                                      layout=layout_of(key[0]))), key
    planned = by_copy(changes)
    FIGURES["racing writers"] = (
        f"rows={by_copy(final)} planned={planned} writer writes={len(entries)} "
        f"(rows written by copy {written_by_copy}) raced={raced} "
        f"writer deadlocks (certification conflicts, retried)={sum(o['deadlocks'] for o in outcomes)} "
        f"sync node certification failures/BF aborts={cert_failures} sync batch retries={retries} "
        f"updated={len(updated)} already={len(already)} conflicts reported={len(conflicts)} {conflicts_by_copy} "
        f"lost=0 torn=0 rerun through node 2 updated={len(result2['updated'])} then drift=0"
    )
    print("\n[galera] " + FIGURES["racing writers"])


def test_certification_conflicts_come_back_as_deadlocks_and_are_retried_both_ways(galera_cloud, caplog):
    """Nova's write through node 2 and the sync's batch through node 1 on the same row, both ways round.

    1. Nova's transaction holds the row on node 2 when the sync's batch commits through node 1:
       Nova's COMMIT gets 1213 (it lost the certification), and Nova retries from its read.
    2. Nova commits through node 2 while the sync's batch holds the row on node 1 (between its
       UPDATE and its COMMIT): the sync's COMMIT gets 1213, the batch is retried from a fresh
       read, Nova's write is kept and reported as a conflict.
    """
    import pymysql

    cluster = galera_cloud.env.cluster
    plan_ids = sorted(row_id for where, row_id in planned_targets(galera_cloud.api(0)) if where == "nova_api")
    nova_row, sync_row = plan_ids[0], plan_ids[30]
    nova = cluster.nodes[1].connect(galera_cloud.database)
    try:
        with nova.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute("SELECT spec FROM request_specs WHERE id = %s FOR UPDATE", (nova_row,))
            (text,) = cur.fetchone()
            document = json.loads(text)
            document["nova_object.data"]["availability_zone"] = "az-nova-1"
            cur.execute("UPDATE request_specs SET spec = %s WHERE id = %s", (json.dumps(document), nova_row))

            with service.connect(galera_cloud.api(0)) as db:
                flavors, scope = service.resolve_scope(db, all_keys=True)
                plan = service.make_plan(db, scope, flavors=flavors)
                first = [c for c in plan.changes if c.id <= sync_row]

                # The sync's COMMIT of its batch: just before it, Nova commits the same row through node 2.
                real_commit = db.conn.commit
                state = {"calls": 0}

                def commit_after_nova_wrote():
                    state["calls"] += 1
                    if state["calls"] == 1:
                        with cluster.nodes[1].connect(galera_cloud.database) as other, other.cursor() as c2:
                            c2.execute("SELECT spec FROM request_specs WHERE id = %s", (sync_row,))
                            doc = json.loads(c2.fetchone()[0])
                            doc["nova_object.data"]["availability_zone"] = "az-nova-2"
                            c2.execute("UPDATE request_specs SET spec = %s WHERE id = %s", (json.dumps(doc), sync_row))
                        time.sleep(0.5)  # node 1 applies it: its applier aborts the sync's transaction
                    return real_commit()

                db.conn.commit = commit_after_nova_wrote
                from nova_flavor_sync.apply import RetryPolicy, apply_batches, sync_targets
                with caplog.at_level("WARNING", logger="nova_flavor_sync"):
                    result = apply_batches(db, sync_targets(first), total=len(first), batch_size=len(first),
                                           retry=RetryPolicy(first_delay_s=0.1))
            with pytest.raises(pymysql.err.OperationalError) as lost:
                cur.execute("COMMIT")  # Nova's transaction on node 2: the sync committed nova_row first
    finally:
        nova.close()
    assert lost.value.args[0] == 1213, lost.value
    assert state["calls"] == 1
    assert result.retries == 1, caplog.text
    assert re.search(rf"Batch of rows {first[0].id}-{first[-1].id}: deadlock; retry 1 of 4", caplog.text)
    assert sync_row in result.conflicts and nova_row in result.updated
    assert set(result.updated) == {c.id for c in first} - {sync_row}
    final = read_copies(cluster, galera_cloud.database, 2)
    assert json.loads(final["nova_api", sync_row][1])["nova_object.data"]["availability_zone"] == "az-nova-2"
    FIGURES["certification conflicts"] = (
        "Nova's COMMIT through node 2 after the sync's: 1213 Deadlock (Nova retries); the sync's COMMIT "
        "after Nova's: 1213 Deadlock, batch retried once, Nova's write kept and reported as a conflict"
    )


# -- flow control ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_flow_control_already_on_is_waited_for_logged_and_the_run_stops_with_exit_5(galera_cloud, tmp_path):
    cluster = galera_cloud.env.cluster
    before = read_copies(cluster, galera_cloud.database, 1)
    with FlowControl(cluster) as fc:
        fc.start()
        result = run_cli(tmp_path, "--db-url", galera_cloud.url(0), "--all-keys", "--run", "--max-load-wait", "4")
        assert fc.active(), "flow control ended on its own during the run"
    assert result.code == 5, result.shown
    assert re.search(r"\[WARNING\] Waiting before the next batch: Galera flow control is active "
                     r"\(wsrep_flow_control_active true", result.out), result.shown
    assert re.search(r"\[ERROR\] the server stayed busy for 4 s, longer than the 4 s allowed \(Galera flow control "
                     r"is active .*\)\. Stopped before the batch of rows \d+-\d+: every batch before it is written in "
                     r"full \(0 rows written\)", result.err), result.shown
    assert read_copies(cluster, galera_cloud.database, 1) == before  # nothing written
    assert result.seconds < 4 + 8, result.shown
    FIGURES["flow control on before the run, stays"] = (
        f"exit 5 after {result.seconds:.1f} s (--max-load-wait 4), 0 rows written")


@pytest.mark.timeout(120)
def test_flow_control_already_on_then_off_the_run_waits_then_goes_on(galera_cloud, tmp_path):
    cluster = galera_cloud.env.cluster
    before = read_copies(cluster, galera_cloud.database, 1)
    targets = planned_targets(galera_cloud.api(0))
    with FlowControl(cluster) as fc:
        fc.start()
        proc, started = start_cli(tmp_path, "--db-url", galera_cloud.url(0), "--all-keys", "--run",
                                  "--max-load-wait", "60")
        time.sleep(3)
        assert proc.poll() is None
        assert read_copies(cluster, galera_cloud.database, 1) == before  # waiting, not writing
        released = fc.release()
    result = finish_cli(proc, started)
    assert result.code == 0, result.shown
    assert "Waiting before the next batch: Galera flow control is active" in result.out
    waited = re.search(r"Server load back under the limits after ([\d.]+) s; going on", result.out)
    # Waiting from the first check (after planning and the backup) until a check after the
    # release (checks are at most 2 s apart, and one more sees the pause's last growth).
    assert waited and 1.5 <= float(waited.group(1)) <= released - started + 5, result.shown
    assert assert_not_torn(before, read_copies(cluster, galera_cloud.database, 1), targets) == set(targets)
    FIGURES["flow control on before the run, released after 3 s"] = (
        f"waited {float(waited.group(1)):.1f} s, then applied all {len(targets)} rows, exit 0 ({result.seconds:.1f} s)")


def wait_until_written(cluster, database, before, rows: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        now = read_copies(cluster, database, 0)
        if sum(1 for i, v in now.items() if v != before[i]) >= rows:
            return
        assert time.monotonic() < deadline, "the run wrote nothing"
        time.sleep(0.05)


@pytest.mark.timeout(150)
def test_flow_control_starting_mid_run_pauses_it_and_a_run_stuck_behind_it_stops_with_exit_5(galera_cloud, tmp_path):
    """Started mid-run and left on: whether the check or a COMMIT meets it, exit 5 soon after the wait."""
    cluster = galera_cloud.env.cluster
    before = read_copies(cluster, galera_cloud.database, 1)
    targets = planned_targets(galera_cloud.api(0))
    with FlowControl(cluster) as fc:
        proc, started = start_cli(tmp_path, "--db-url", galera_cloud.url(0), "--all-keys", "--run",
                                  "--batch-size", "20", "--pause", "0.1", "--max-load-wait", "10")
        wait_until_written(cluster, galera_cloud.database, before, 40)
        on = fc.start()
        result = finish_cli(proc, started)
        stopped_after = started + result.seconds - on
        assert fc.active()
    assert result.code == 5, result.shown
    paused = re.search(r"the server stayed busy for \d+ s, longer than the 10 s allowed \(Galera flow control is "
                       r"active", result.err)
    bounded = re.search(r"the write of rows \d+-\d+ \(20 rows\) did not finish within 10 s \(Galera flow control is "
                        r"pausing the cluster", result.err)
    assert paused or bounded, result.shown
    assert stopped_after <= 10 + 6, result.shown
    written = len(assert_not_torn(before, read_copies(cluster, galera_cloud.database, 1), targets))
    assert 40 <= written < len(targets)
    # Released: a COMMIT that was given up may land now; still nothing torn, and a rerun converges.
    rerun = run_cli(tmp_path, "--db-url", galera_cloud.url(0), "--all-keys", "--run")
    assert rerun.code == 0, rerun.shown
    assert assert_not_torn(before, read_copies(cluster, galera_cloud.database, 1), targets) == set(targets)
    FIGURES["flow control starting mid-run, stays"] = (
        f"exit 5 {stopped_after:.1f} s after it began (--max-load-wait 10), by "
        f"{'the pacer' if paused else 'the bounded COMMIT'}; {written} of {len(targets)} rows written, 0 torn; "
        "rerun exit 0")


@pytest.mark.timeout(150)
def test_flow_control_starting_mid_run_then_off_the_run_pauses_and_finishes(galera_cloud, tmp_path):
    cluster = galera_cloud.env.cluster
    before = read_copies(cluster, galera_cloud.database, 1)
    targets = planned_targets(galera_cloud.api(0))
    with FlowControl(cluster) as fc:
        proc, started = start_cli(tmp_path, "--db-url", galera_cloud.url(0), "--all-keys", "--run",
                                  "--batch-size", "20", "--pause", "0.1", "--max-load-wait", "60")
        wait_until_written(cluster, galera_cloud.database, before, 40)
        fc.start()
        time.sleep(3)
        held = sum(1 for i, v in read_copies(cluster, galera_cloud.database, 0).items() if v != before[i])
        time.sleep(1)
        assert sum(1 for i, v in read_copies(cluster, galera_cloud.database, 0).items() if v != before[i]) == held
        fc.release()
    result = finish_cli(proc, started)
    assert result.code == 0, result.shown
    assert assert_not_torn(before, read_copies(cluster, galera_cloud.database, 1), targets) == set(targets)
    # One pacer per database written (cells first): its summary names the database.
    paced = re.findall(r"Paced (nova_api|cell1 \([0-9a-f-]+\)|cell2 \([0-9a-f-]+\)): \d+ batches of [\d-]+ rows, "
                       r"[\d.]+ s paused, ([\d.]+) s waited for the server", result.out)
    assert [p[0].split()[0] for p in paced] == ["cell1", "cell2", "nova_api"], result.shown
    waited = sum(float(p[1]) for p in paced)
    how = ("the pacer waited (logged: " + re.search(r"Waiting before the next batch: (.*)", result.out).group(1) + ")"
           if "Waiting before the next batch" in result.out else "a COMMIT waited behind it")
    FIGURES["flow control starting mid-run, released after 4 s"] = (
        f"no row written while it lasted; {how}; waited {waited:.1f} s in the pacers; exit 0, "
        f"all {len(targets)} rows of both copies")


@pytest.mark.timeout(120)
def test_a_commit_stuck_behind_flow_control_is_given_up_after_its_bound_and_landing_late_is_harmless(
        galera_cloud, tmp_path):
    """--no-flow-control-pause: the pacer does not wait, so batch 1's COMMIT meets flow control itself."""
    cluster = galera_cloud.env.cluster
    before = read_copies(cluster, galera_cloud.database, 1)
    targets = planned_targets(galera_cloud.api(0))
    with FlowControl(cluster) as fc:
        fc.start()
        result = run_cli(tmp_path, "--db-url", galera_cloud.url(0), "--all-keys", "--run", "--batch-size", "50",
                         "--no-flow-control-pause", "--max-load-wait", "3")
        assert fc.active()
        assert read_copies(cluster, galera_cloud.database, 1) == before  # still waiting in the cluster
    assert result.code == 5, result.shown
    assert re.search(r"\[ERROR\] the write of rows \d+-\d+ \(50 rows\) did not finish within 10 s \(Galera flow "
                     r"control is pausing the cluster: wsrep_flow_control_active true, .*\); stopped waiting for "
                     r"it\. The server may still commit it later, which is harmless", result.err), result.shown
    assert 10 <= result.seconds <= 10 + 8, result.shown
    # Flow control over: the abandoned COMMIT lands (KILL cannot stop it); exactly the planned bytes.
    # It is the first batch of the first database written: cells first, so cell1's instance copies.
    deadline = time.monotonic() + 10
    while len(late := assert_not_torn(before, read_copies(cluster, galera_cloud.database, 1), targets)) < 50:
        assert time.monotonic() < deadline, "the abandoned batch never landed"
        time.sleep(0.1)
    first_of_cell1 = sorted(key for key in targets if key[0] == "cell1")[:50]
    assert sorted(late) == first_of_cell1
    rerun = run_cli(tmp_path, "--db-url", galera_cloud.url(0), "--all-keys", "--run")
    assert rerun.code == 0, rerun.shown
    assert assert_not_torn(before, read_copies(cluster, galera_cloud.database, 1), targets) == set(targets)
    FIGURES["COMMIT behind flow control (--no-flow-control-pause)"] = (
        f"given up after 10 s, exit 5 at {result.seconds:.1f} s; landed late after release: {len(late)} rows "
        "(cell1's first batch), exactly the planned bytes; rerun exit 0, both copies")


# -- node faults ----------------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_the_node_written_through_is_killed_mid_apply_the_run_stops_and_a_rerun_through_node_2_converges(
        galera_cloud, tmp_path):
    cluster = galera_cloud.env.cluster
    before = read_copies(cluster, galera_cloud.database, 1)
    targets = planned_targets(galera_cloud.api(0))
    proc, started = start_cli(tmp_path, "--db-url", galera_cloud.url(0), "--all-keys", "--run",
                              "--batch-size", "20", "--pause", "0.1")
    wait_until_written(cluster, galera_cloud.database, before, 60)
    cluster.nodes[0].kill()  # SIGKILL, mid-apply
    killed = time.monotonic()
    result = finish_cli(proc, started)
    stopped_after = started + result.seconds - killed
    assert result.code == 5, result.shown
    assert re.search(r"\[ERROR\] batch of rows \d+-\d+ failed 5 times \((cannot reach the server|lost connection to "
                     r"the server|server has gone away)\); stopped\. Batches before it are written in full",
                     result.err), \
        result.shown
    assert stopped_after < 15, result.shown
    cluster.wait_size(2)
    written = assert_not_torn(before, read_copies(cluster, galera_cloud.database, 1), targets)
    assert 60 <= len(written) < len(targets)
    (backup_file,) = (tmp_path / "backups").glob("flavor_copies_*.json")
    backup = load_backup(backup_file)  # checks the file's digest: intact
    databases = backup.info.databases
    keys = [(databases[r.database].get("cell") or "nova_api", r.id) for r in backup.records]
    assert sorted(keys) == sorted(targets)  # both copies, each record naming its database
    assert all(r.sha256 == sha256_text(before[key][1]) for key, r in zip(keys, backup.records, strict=True))

    # Through node 2 (nova_api and every cell: cell_mappings name node 1, as a real cloud names a
    # VIP): the backup is of this cluster, and a rerun converges in both copies.
    check = run_cli(tmp_path, "--db-url", galera_cloud.url(1), *cells_through(galera_cloud, 1),
                    "--restore", backup_file)
    assert check.code == 3, check.shown  # rows to restore, not refused
    rerun = run_cli(tmp_path, "--db-url", galera_cloud.url(1), *cells_through(galera_cloud, 1), "--all-keys", "--run")
    assert rerun.code == 0, rerun.shown
    left = {where: n for where, n in by_copy(set(targets) - written).items() if n}
    assert applied_counts(rerun.out) == left, rerun.shown
    assert "Verify: 0 flavor copies still out of sync in scope" in rerun.out, rerun.shown
    assert assert_not_torn(before, read_copies(cluster, galera_cloud.database, 2), targets) == set(targets)
    FIGURES["node 1 SIGKILLed mid-apply"] = (
        f"exit 5 {stopped_after:.1f} s after the kill; {len(written)} of {len(targets)} rows written "
        f"({by_copy(written)}), 0 torn; backup intact ({len(backup.records)} records, both copies) and accepted "
        f"through node 2; rerun through node 2 exit 0, {left} updated, both copies converged")


@pytest.mark.timeout(120)
def test_a_node_that_lost_quorum_is_refused_before_anything_is_written(galera_cloud, tmp_path):
    cluster = galera_cloud.env.cluster
    before = read_copies(cluster, galera_cloud.database, 0)
    node3 = cluster.nodes[2]
    node3.sql("SET GLOBAL wsrep_provider_options = 'gmcast.isolate=1'")  # cut off from the other two
    deadline = time.monotonic() + 20
    while node3.status().get("wsrep_cluster_status") == "Primary":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    result = run_cli(tmp_path, "--db-url", galera_cloud.url(2), "--all-keys", "--run")
    assert result.code == 4, result.shown
    message = (f"[ERROR] mysql+pymysql://root@127.0.0.1:{node3.port}/{galera_cloud.database} is a Galera node outside "
               "the cluster's primary component (wsrep_cluster_status non-Primary, wsrep_ready OFF, state ")
    assert message in result.err, result.shown
    assert "it lost quorum or is not joined, and cannot take reads or writes. Nothing was written" in result.err
    assert not (tmp_path / "backups").exists() or not list((tmp_path / "backups").iterdir())
    assert read_copies(cluster, galera_cloud.database, 0) == before
    FIGURES["node without quorum"] = "exit 4: " + result.err.strip().splitlines()[-1].split("] ", 2)[-1]


# -- backups across the cluster -------------------------------------------------------------


@pytest.mark.timeout(150)
def test_a_backup_taken_through_node_1_restores_through_node_2_and_one_from_another_cluster_is_refused(
        galera_cloud, tmp_path, server_kwargs):
    from dbtools import copies_hash, db_params
    from nova_flavor_sync.demo import create_demo_cloud, drop_database

    cluster = galera_cloud.env.cluster
    before = read_copies(cluster, galera_cloud.database, 1)
    synced = run_cli(tmp_path, "--db-url", galera_cloud.url(0), "--all-keys", "--run")
    assert synced.code == 0, synced.shown
    (backup_file,) = (tmp_path / "backups").glob("flavor_copies_*.json")
    after_sync = read_copies(cluster, galera_cloud.database, 1)
    assert all(by_copy(k for k in after_sync if after_sync[k] != before[k]).values())  # both copies written

    restored = run_cli(tmp_path, "--db-url", galera_cloud.url(1), *cells_through(galera_cloud, 1),
                       "--restore", backup_file, "--run")
    assert restored.code == 0, restored.shown
    assert read_copies(cluster, galera_cloud.database, 2) == before  # both copies, exact bytes, seen through node 3

    # The same demo cloud (same schema names, same cell uuids) on another Galera cluster (one
    # node, its own cluster uuid) and on the plain server: refused, nothing written.
    foreign_name = galera_cloud.database
    other = GaleraCluster(1)
    try:
        other.start()
        kwargs = {"host": "127.0.0.1", "port": other.nodes[0].port, "user": "root", "password": ""}
        create_demo_cloud(kwargs, foreign_name)
        there_before = read_copies(other, foreign_name, 0)
        refused = run_cli(tmp_path, "--db-url", f"{other.nodes[0].url}/{foreign_name}", "--restore", backup_file,
                          "--run", env={"NOVA_DATABASE_CONNECTION": nova_database_connection(kwargs)})
        assert read_copies(other, foreign_name, 0) == there_before
        uuid_here = cluster.nodes[0].status()["wsrep_cluster_state_uuid"]
        uuid_there = other.nodes[0].status()["wsrep_cluster_state_uuid"]
    finally:
        other.remove()
    assert refused.code == 4, refused.shown
    assert (f"was taken on another server (galera_cluster_uuid={uuid_here}); this is "
            f"galera_cluster_uuid={uuid_there}") in refused.err, refused.shown
    cells = create_demo_cloud(server_kwargs, foreign_name)
    try:
        plain_before = copies_hash(db_params(server_kwargs, foreign_name))
        plain = run_cli(tmp_path, "--db-url", f"mysql+pymysql://root@{server_kwargs['host']}:{server_kwargs['port']}/"
                        f"{foreign_name}", "--restore", backup_file, "--run",
                        env={"NOVA_DATABASE_CONNECTION": nova_database_connection(server_kwargs)})
        assert copies_hash(db_params(server_kwargs, foreign_name)) == plain_before
    finally:
        for database in [foreign_name, *cells.values()]:
            drop_database(server_kwargs, database)
    assert plain.code == 4 and "was taken on another server (server_hostname=" in plain.err, plain.shown
    FIGURES["backups across the cluster"] = (
        "backup of both copies through node 1 restored through node 2: exact bytes (seen through node 3); the same "
        "demo cloud on another cluster: exit 4 (galera_cluster_uuid differs); on the single server: exit 4; "
        "nothing written there")


# -- large transactions ---------------------------------------------------------------------


def replicated(node, since: dict[str, int] | None = None) -> dict[str, int]:
    """Write-sets node 1 replicated (and their bytes), since ``since``."""
    now = {name: status_counter(node, name) for name in ("wsrep_replicated", "wsrep_replicated_bytes")}
    return {name: value - (since or {}).get(name, 0) for name, value in now.items()}


@pytest.mark.timeout(150)
def test_batches_stay_inside_the_write_set_limits(galera_cloud, tmp_path):
    cluster = galera_cloud.env.cluster
    node1 = cluster.nodes[0]
    limits = node1.sql("SHOW GLOBAL VARIABLES WHERE Variable_name IN ('wsrep_max_ws_rows', 'wsrep_max_ws_size')")
    limits = {row["Variable_name"]: int(row["Value"]) for row in limits}
    assert limits == {"wsrep_max_ws_rows": 0, "wsrep_max_ws_size": 2147483647}  # MariaDB 10.11's defaults

    # A cluster that limits write-sets to 200 rows: batches of at most 100 in every database
    # written (each its own pacer), each batch one write-set, told so.
    targets = planned_targets(galera_cloud.api(0))
    before = read_copies(cluster, galera_cloud.database, 1)
    node1.sql("SET GLOBAL wsrep_max_ws_rows = 200")
    start = replicated(node1)
    capped = run_cli(tmp_path, "--db-url", galera_cloud.url(0), "--all-keys", "--run", "--batch-size", "5000")
    capped_ws = replicated(node1, start)
    node1.sql("SET GLOBAL wsrep_max_ws_rows = 0")
    assert capped.code == 0, capped.shown
    assert capped.out.count("[WARNING] Batches of at most 100 rows: half of this cluster's wsrep_max_ws_rows "
                            "(200)") == 3, capped.out
    sizes = re.findall(r"Paced (\w+)[^:]*: (\d+) batches of (\d+)-(\d+) rows", capped.out)
    assert [(where, int(most)) for where, _, _, most in sizes] == [("cell1", 100), ("cell2", 100), ("nova_api", 100)]
    capped_batches = sum(int(count) for _, count, _, _ in sizes)
    assert capped_ws["wsrep_replicated"] == capped_batches, (capped_ws, sizes)
    assert assert_not_torn(before, read_copies(cluster, galera_cloud.database, 1), targets) == set(targets)

    # The defaults: the largest batches the tool makes (--batch-size 5000), one transaction
    # and one write-set each. 2,000 more RequestSpecs, and a new key in every flavor: about
    # 3,100 RequestSpecs and every instance copy to rewrite.
    enlarge(galera_cloud.api(0), 3500, seed=6)
    with node1.connect(galera_cloud.database) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO flavor_extra_specs (created_at, flavor_id, `key`, value) "
                    "SELECT NOW(), id, 'aggregate_instance_extra_specs:ws_test', 'yes' FROM flavors")
    targets = planned_targets(galera_cloud.api(0))
    before = read_copies(cluster, galera_cloud.database, 1)
    start = replicated(node1)
    big = run_cli(tmp_path, "--db-url", galera_cloud.url(0), "--all-keys", "--run", "--batch-size", "5000")
    big_ws = replicated(node1, start)
    assert big.code == 0, big.shown
    one_batch = re.findall(r"Applied in 1 batches \(0 retries\): (\d+) updated", big.out)
    assert applied_counts(big.out) == {where: n for where, n in by_copy(targets).items()}, big.shown
    assert len(one_batch) == 3 and by_copy(targets)["nova_api"] > 2500, big.shown
    assert big_ws["wsrep_replicated"] == 3, big_ws  # one write-set per batch (the cluster has no other writes)
    ws_bytes = big_ws["wsrep_replicated_bytes"]
    assert ws_bytes < limits["wsrep_max_ws_size"] / 20  # all three together well inside one's limit: under 5%
    assert assert_not_torn(before, read_copies(cluster, galera_cloud.database, 1), targets) == set(targets)
    per_row = ws_bytes / len(targets)

    # Bytes: a cluster whose wsrep_max_ws_size is below one batch refuses it; the run says what
    # to do, and nothing of that batch (the first: cell1's) is written.
    enlarge_flavor = "UPDATE flavor_extra_specs SET value = CONCAT(value, '-2') WHERE `key` LIKE 'quota:%%'"
    with node1.connect(galera_cloud.database) as conn, conn.cursor() as cur:
        cur.execute(enlarge_flavor)
    before = read_copies(cluster, galera_cloud.database, 1)
    node1.sql("SET GLOBAL wsrep_max_ws_rows = 0", "SET GLOBAL wsrep_max_ws_size = 65536")
    small = run_cli(tmp_path, "--db-url", galera_cloud.url(0), "--all-keys", "--run", "--batch-size", "200")
    node1.sql("SET GLOBAL wsrep_max_ws_size = 2147483647")
    assert small.code == 5, small.shown
    assert re.search(r"\[ERROR\] the batch of rows \d+-\d+ \(200 rows\) is larger than this Galera cluster accepts in "
                     r"one transaction \(\(1105\) Maximum writeset size exceeded\); nothing of it was written\. "
                     r"Run again "
                     r"with a smaller --batch-size", small.err), small.shown
    assert read_copies(cluster, galera_cloud.database, 1) == before
    FIGURES["write-set limits"] = (
        f"with wsrep_max_ws_rows=200: batches of at most 100 in each database ({capped_batches} batches = "
        f"{capped_ws['wsrep_replicated']} write-sets); defaults wsrep_max_ws_rows=0 (none), wsrep_max_ws_size=2 GiB: "
        f"one batch per database ({by_copy(targets)} rows) = 3 write-sets of {ws_bytes / 1e6:.1f} MB in all "
        f"({per_row / 1e3:.1f} KB a row: a 5,000-row batch about {5000 * per_row / 1e6:.0f} MB, "
        f"{5000 * per_row / limits['wsrep_max_ws_size']:.1%} of the limit); with wsrep_max_ws_size=64 KiB a 200-row "
        "batch is refused: exit 5, nothing written")
