"""The sync on a real three-node MariaDB Galera cluster, with faults (issue 13).

The command line runs as an operator runs it (a process of its own, ``python -m
nova_flavor_sync``), writing through node 1 unless a case says otherwise; the checks read
through another node with ``wsrep_sync_wait`` set, so they see every committed write. Each
case prints its figures (``-s`` shows them; the README's Galera table quotes them).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

import nova_flavor_sync
from galera_cluster import FlowControl, GaleraCluster
from nova_flavor_sync import service
from nova_flavor_sync.backup import load_backup
from nova_flavor_sync.spec_json import read_embedded_flavor, rewrite_extra_specs, sha256_text
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


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(INCLUDE)}


def start_cli(tmp_path: Path, *args: object) -> tuple[subprocess.Popen, float]:
    proc = subprocess.Popen(cli_command(tmp_path, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=cli_env())
    return proc, time.monotonic()


def finish_cli(proc: subprocess.Popen, started: float, timeout: float = 90) -> Result:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the CLI hung for more than {timeout} s:\n{out}\n{err}") from None
    return Result(proc.returncode, out, err, time.monotonic() - started)


def run_cli(tmp_path: Path, *args: object, timeout: float = 90) -> Result:
    return finish_cli(*start_cli(tmp_path, *args), timeout=timeout)


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


def read_specs(cluster: GaleraCluster, database: str, node: int = 1) -> dict[int, tuple[str, str]]:
    """Every request_specs row through ``node``, after it caught up with the cluster (wsrep_sync_wait)."""
    with cluster.nodes[node].connect(database, init_command="SET SESSION wsrep_sync_wait = 1") as conn, \
            conn.cursor() as cur:
        cur.execute("SELECT id, instance_uuid, spec FROM request_specs")
        return {row_id: (uuid_, spec) for row_id, uuid_, spec in cur.fetchall()}


def planned_targets(params) -> dict[int, dict[str, str]]:
    """{row id: target extra specs} of the plan a run with --all-keys makes now."""
    from dbtools import plan_request_specs

    return {c.id: dict(c.diff.target_extra_specs) for c in plan_request_specs(params).changes}


def assert_not_torn(before: dict[int, tuple[str, str]], after: dict[int, tuple[str, str]],
                    targets: dict[int, dict[str, str]]) -> int:
    """Every row holds its old bytes or its planned new ones; returns how many hold the new ones."""
    assert set(after) == set(before)
    rewritten = 0
    for row_id, (uuid_, text) in after.items():
        old = before[row_id][1]
        assert uuid_ == before[row_id][0]
        if text == old:
            continue
        assert row_id in targets, f"row {row_id} changed but was not planned"
        assert text == rewrite_extra_specs(old, targets[row_id]), f"row {row_id} is torn"
        rewritten += 1
    return rewritten


def status_counter(node, name: str) -> int:
    return int(node.status(name)[name])


def enlarge(params, total: int, seed: int) -> None:
    """Copies of the demo specs (new instance uuids, mapped to cell1) up to ``total`` rows."""
    from dbtools import connect, map_instances

    rng = random.Random(seed)
    with connect(params, autocommit=False) as conn, conn.cursor() as cur:
        cur.execute("SELECT created_at, updated_at, spec FROM request_specs ORDER BY id")
        base = cur.fetchall()
        rows = []
        for i in range(total - len(base)):
            created_at, updated_at, spec = base[i % len(base)]
            new_uuid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            document = json.loads(spec)
            document["nova_object.data"]["instance_uuid"] = new_uuid
            rows.append((created_at, updated_at, new_uuid, json.dumps(document)))
        cur.executemany(
            "INSERT INTO request_specs (created_at, updated_at, instance_uuid, spec) VALUES (%s, %s, %s, %s)", rows
        )
        conn.commit()
    map_instances(params, [row[2] for row in rows])


# -- the cluster ----------------------------------------------------------------------------


def test_the_cluster_is_three_synced_nodes_holding_the_same_demo_cloud(galera_cloud):
    cluster = galera_cloud.env.cluster
    states = [node.status() for node in cluster.nodes]
    assert [s["wsrep_cluster_size"] for s in states] == ["3"] * 3
    assert [s["wsrep_local_state_comment"] for s in states] == ["Synced"] * 3
    assert len({s["wsrep_cluster_state_uuid"] for s in states}) == 1
    copies = [read_specs(cluster, galera_cloud.database, node) for node in range(3)]
    assert len(copies[0]) == 1500 and copies[0] == copies[1] == copies[2]
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
    return subprocess.Popen(
        [sys.executable, str(WRITER), "--host", params.host, "--port", str(params.port), "--user", params.user,
         "--database", params.database, "--seed", str(seed), "--log", str(log_path), "--max-seconds", "60",
         "--ids", ids],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def stop_writer(proc: subprocess.Popen) -> dict:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.timeout(180)
def test_nova_writers_through_nodes_2_and_3_race_the_sync_through_node_1_and_lose_nothing(galera_cloud, tmp_path):
    cluster = galera_cloud.env.cluster
    node1 = cluster.nodes[0]
    enlarge(galera_cloud.api(0), 3000, seed=13)
    original = read_specs(cluster, galera_cloud.database, 0)
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
        with service.connect(galera_cloud.api(0)) as db:
            t_start = time.monotonic()
            flavors, scope = service.resolve_scope(db, all_keys=True)
            plan = service.make_plan(db, scope, flavors=flavors)
            backup = service.back_up(db, plan, tmp_path / "backups")
            with service.pacing(db, settings) as pacer:
                result = service.apply_plan(db, plan, exclude_ids=backup.diverged, pacer=pacer)
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

    entries = [json.loads(line) for path in logs for line in path.read_text().splitlines()]
    assert len(entries) == sum(o["writes"] for o in outcomes)
    last: dict[int, dict] = {}
    for entry in sorted(entries, key=lambda e: e["seq"]):  # one writer per row: its own order
        last[entry["id"]] = entry
    final = read_specs(cluster, galera_cloud.database, 1)
    changes = {c.id: c for c in plan.changes}
    targets = {c.id: dict(c.diff.target_extra_specs) for c in plan.changes}
    updated, already, conflicts = set(result.updated), set(result.already), set(result.conflicts)

    # 0 lost writes: each row's final text is its writer's last write, or the sync's rewrite of exactly it.
    lost = []
    for row_id, write in last.items():
        text = final[row_id][1]
        if text == write["text"]:
            continue
        change = changes.get(row_id)
        if (change is not None and sha256_text(write["text"]) == change.old_sha256
                and text == rewrite_extra_specs(write["text"], targets[row_id])):
            assert row_id in updated
            continue
        lost.append(row_id)
    assert lost == [], f"{len(lost)} writes lost, e.g. rows {lost[:10]}"
    # 0 torn: rows no writer touched hold their old bytes or exactly the planned new ones; all are Nova's JSON.
    untouched = {i: original[i] for i in set(final) - set(last)}
    assert_not_torn(untouched, {i: final[i] for i in untouched}, targets)
    for _, text in final.values():
        assert json.dumps(json.loads(text)) == text
    # Every planned row accounted for; the conflicts are reported, never overwritten.
    assert not result.errors and not result.gone
    assert updated | already | conflicts == set(changes)
    assert len(updated) + len(already) + len(conflicts) == len(changes)
    raced = sum(1 for e in entries if e["t1"] > t_start and e["t0"] < t_applied)
    assert raced > 100, "the writers hardly raced the sync"
    assert conflicts, "no conflict at all: the race did not happen"

    # A rerun through node 2, writers stopped, converges and keeps what they wrote.
    with service.connect(galera_cloud.api(1)) as db:
        flavors, scope = service.resolve_scope(db, all_keys=True)
        plan2 = service.make_plan(db, scope, flavors=flavors)
        result2 = service.apply_plan(db, plan2, batch_size=500)
    with service.connect(galera_cloud.api(0)) as db:
        for _ in range(50):  # node 1 applies node 2's writes asynchronously
            after = service.verify(db, service.resolve_scope(db, all_keys=True)[1])
            if not after.changes:
                break
            time.sleep(0.1)
    assert not result2.conflicts and not result2.errors
    assert after.changes == [] and after.errors == []
    for row_id, text in ((i, t) for i, (_, t) in read_specs(cluster, galera_cloud.database, 2).items()):
        if row_id in last and final[row_id][1] == last[row_id]["text"]:
            assert read_embedded_flavor(text).extra_specs is not None
    FIGURES["racing writers"] = (
        f"rows={len(final)} planned={len(changes)} writer writes={len(entries)} raced={raced} "
        f"writer deadlocks (certification conflicts, retried)={sum(o['deadlocks'] for o in outcomes)} "
        f"sync node certification failures/BF aborts={cert_failures} sync batch retries={result.retries} "
        f"updated={len(updated)} already={len(already)} conflicts reported={len(conflicts)} lost=0 torn=0 "
        f"rerun through node 2 updated={len(result2.updated)} then drift=0"
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
    plan_ids = sorted(planned_targets(galera_cloud.api(0)))
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
    final = read_specs(cluster, galera_cloud.database, 2)
    assert json.loads(final[sync_row][1])["nova_object.data"]["availability_zone"] == "az-nova-2"
    FIGURES["certification conflicts"] = (
        "Nova's COMMIT through node 2 after the sync's: 1213 Deadlock (Nova retries); the sync's COMMIT "
        "after Nova's: 1213 Deadlock, batch retried once, Nova's write kept and reported as a conflict"
    )


# -- flow control ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_flow_control_already_on_is_waited_for_logged_and_the_run_stops_with_exit_5(galera_cloud, tmp_path):
    cluster = galera_cloud.env.cluster
    before = read_specs(cluster, galera_cloud.database, 1)
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
    assert read_specs(cluster, galera_cloud.database, 1) == before  # nothing written
    assert result.seconds < 4 + 8, result.shown
    FIGURES["flow control on before the run, stays"] = f"exit 5 after {result.seconds:.1f} s (--max-load-wait 4), 0 rows written"


@pytest.mark.timeout(120)
def test_flow_control_already_on_then_off_the_run_waits_then_goes_on(galera_cloud, tmp_path):
    cluster = galera_cloud.env.cluster
    before = read_specs(cluster, galera_cloud.database, 1)
    targets = planned_targets(galera_cloud.api(0))
    with FlowControl(cluster) as fc:
        fc.start()
        proc, started = start_cli(tmp_path, "--db-url", galera_cloud.url(0), "--all-keys", "--run",
                                  "--max-load-wait", "60")
        time.sleep(3)
        assert proc.poll() is None
        assert read_specs(cluster, galera_cloud.database, 1) == before  # waiting, not writing
        released = fc.release()
    result = finish_cli(proc, started)
    assert result.code == 0, result.shown
    assert "Waiting before the next batch: Galera flow control is active" in result.out
    waited = re.search(r"Server load back under the limits after ([\d.]+) s; going on", result.out)
    # Waiting from the first check (after planning and the backup) until a check after the
    # release (checks are at most 2 s apart, and one more sees the pause's last growth).
    assert waited and 1.5 <= float(waited.group(1)) <= released - started + 5, result.shown
    assert assert_not_torn(before, read_specs(cluster, galera_cloud.database, 1), targets) == len(targets)
    FIGURES["flow control on before the run, released after 3 s"] = (
        f"waited {float(waited.group(1)):.1f} s, then applied all {len(targets)} rows, exit 0 ({result.seconds:.1f} s)")


def wait_until_written(cluster, database, before, rows: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        now = read_specs(cluster, database, 0)
        if sum(1 for i, v in now.items() if v != before[i]) >= rows:
            return
        assert time.monotonic() < deadline, "the run wrote nothing"
        time.sleep(0.05)


@pytest.mark.timeout(150)
def test_flow_control_starting_mid_run_pauses_it_and_a_run_stuck_behind_it_stops_with_exit_5(galera_cloud, tmp_path):
    """Started mid-run and left on: whether the check or a COMMIT meets it, exit 5 soon after the wait."""
    cluster = galera_cloud.env.cluster
    before = read_specs(cluster, galera_cloud.database, 1)
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
    written = assert_not_torn(before, read_specs(cluster, galera_cloud.database, 1), targets)
    assert 40 <= written < len(targets)
    # Released: a COMMIT that was given up may land now; still nothing torn, and a rerun converges.
    rerun = run_cli(tmp_path, "--db-url", galera_cloud.url(0), "--all-keys", "--run")
    assert rerun.code == 0, rerun.shown
    assert assert_not_torn(before, read_specs(cluster, galera_cloud.database, 1), targets) == len(targets)
    FIGURES["flow control starting mid-run, stays"] = (
        f"exit 5 {stopped_after:.1f} s after it began (--max-load-wait 10), by "
        f"{'the pacer' if paused else 'the bounded COMMIT'}; {written} of {len(targets)} rows written, 0 torn; rerun exit 0")


@pytest.mark.timeout(150)
def test_flow_control_starting_mid_run_then_off_the_run_pauses_and_finishes(galera_cloud, tmp_path):
    cluster = galera_cloud.env.cluster
    before = read_specs(cluster, galera_cloud.database, 1)
    targets = planned_targets(galera_cloud.api(0))
    with FlowControl(cluster) as fc:
        proc, started = start_cli(tmp_path, "--db-url", galera_cloud.url(0), "--all-keys", "--run",
                                  "--batch-size", "20", "--pause", "0.1", "--max-load-wait", "60")
        wait_until_written(cluster, galera_cloud.database, before, 40)
        fc.start()
        time.sleep(3)
        held = sum(1 for i, v in read_specs(cluster, galera_cloud.database, 0).items() if v != before[i])
        time.sleep(1)
        assert sum(1 for i, v in read_specs(cluster, galera_cloud.database, 0).items() if v != before[i]) == held
        fc.release()
    result = finish_cli(proc, started)
    assert result.code == 0, result.shown
    assert assert_not_torn(before, read_specs(cluster, galera_cloud.database, 1), targets) == len(targets)
    waited = re.search(r"Paced: \d+ batches of [\d-]+ rows, [\d.]+ s paused, ([\d.]+) s waited for the server",
                       result.out)
    assert waited, result.shown
    how = ("the pacer waited (logged: " + re.search(r"Waiting before the next batch: (.*)", result.out).group(1) + ")"
           if "Waiting before the next batch" in result.out else "a COMMIT waited behind it")
    FIGURES["flow control starting mid-run, released after 4 s"] = (
        f"no row written while it lasted; {how}; waited {float(waited.group(1)):.1f} s in the pacer; exit 0, "
        f"all {len(targets)} rows")


@pytest.mark.timeout(120)
def test_a_commit_stuck_behind_flow_control_is_given_up_after_its_bound_and_landing_late_is_harmless(
        galera_cloud, tmp_path):
    """--no-flow-control-pause: the pacer does not wait, so batch 1's COMMIT meets flow control itself."""
    cluster = galera_cloud.env.cluster
    before = read_specs(cluster, galera_cloud.database, 1)
    targets = planned_targets(galera_cloud.api(0))
    with FlowControl(cluster) as fc:
        fc.start()
        result = run_cli(tmp_path, "--db-url", galera_cloud.url(0), "--all-keys", "--run", "--batch-size", "50",
                         "--no-flow-control-pause", "--max-load-wait", "3")
        assert fc.active()
        assert read_specs(cluster, galera_cloud.database, 1) == before  # still waiting in the cluster
    assert result.code == 5, result.shown
    assert re.search(r"\[ERROR\] the write of rows \d+-\d+ \(50 rows\) did not finish within 10 s \(Galera flow "
                     r"control is pausing the cluster: wsrep_flow_control_active true, .*\); stopped waiting for "
                     r"it\. The server may still commit it later, which is harmless", result.err), result.shown
    assert 10 <= result.seconds <= 10 + 8, result.shown
    # Flow control over: the abandoned COMMIT lands (KILL cannot stop it); exactly the planned bytes.
    deadline = time.monotonic() + 10
    while (late := assert_not_torn(before, read_specs(cluster, galera_cloud.database, 1), targets)) < 50:
        assert time.monotonic() < deadline, "the abandoned batch never landed"
        time.sleep(0.1)
    assert late == 50
    rerun = run_cli(tmp_path, "--db-url", galera_cloud.url(0), "--all-keys", "--run")
    assert rerun.code == 0, rerun.shown
    assert assert_not_torn(before, read_specs(cluster, galera_cloud.database, 1), targets) == len(targets)
    FIGURES["COMMIT behind flow control (--no-flow-control-pause)"] = (
        f"given up after 10 s, exit 5 at {result.seconds:.1f} s; landed late after release: {late} rows, exactly "
        "the planned bytes; rerun exit 0")


# -- node faults ----------------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_the_node_written_through_is_killed_mid_apply_the_run_stops_and_a_rerun_through_node_2_converges(
        galera_cloud, tmp_path):
    cluster = galera_cloud.env.cluster
    before = read_specs(cluster, galera_cloud.database, 1)
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
                     r"the server|server has gone away)\); stopped\. Batches before it are written in full", result.err), \
        result.shown
    assert stopped_after < 15, result.shown
    cluster.wait_size(2)
    written = assert_not_torn(before, read_specs(cluster, galera_cloud.database, 1), targets)
    assert 60 <= written < len(targets)
    (backup_file,) = (tmp_path / "backups").glob("request_specs_*.json")
    records = load_backup(backup_file).records  # checks the file's digest: intact
    assert {r.id for r in records} == set(targets)
    assert all(r.sha256 == sha256_text(before[r.id][1]) for r in records)

    # Through node 2: the backup is of this cluster, and a rerun converges.
    check = run_cli(tmp_path, "--db-url", galera_cloud.url(1), "--restore", backup_file)
    assert check.code == 3, check.shown  # rows to restore, not refused
    # cell_mappings name node 1 (a real cloud names a VIP): each cell through node 2 instead.
    cells = [f"--cell-db-url={cell}={galera_cloud.url(1)}_{cell}" for cell in ("cell0", "cell1", "cell2")]
    rerun = run_cli(tmp_path, "--db-url", galera_cloud.url(1), *cells, "--all-keys", "--run")
    assert rerun.code == 0, rerun.shown
    assert re.search(rf"Applied in \d+ batches \(0 retries\): {len(targets) - written} updated", rerun.out), rerun.shown
    assert assert_not_torn(before, read_specs(cluster, galera_cloud.database, 2), targets) == len(targets)
    FIGURES["node 1 SIGKILLed mid-apply"] = (
        f"exit 5 {stopped_after:.1f} s after the kill; {written} of {len(targets)} rows written, 0 torn; backup intact "
        f"({len(records)} records) and accepted through node 2; rerun through node 2 exit 0, "
        f"{len(targets) - written} updated")


@pytest.mark.timeout(120)
def test_a_node_that_lost_quorum_is_refused_before_anything_is_written(galera_cloud, tmp_path):
    cluster = galera_cloud.env.cluster
    before = read_specs(cluster, galera_cloud.database, 0)
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
    assert read_specs(cluster, galera_cloud.database, 0) == before
    FIGURES["node without quorum"] = "exit 4: " + result.err.strip().splitlines()[-1].split("] ", 2)[-1]


# -- backups across the cluster -------------------------------------------------------------


@pytest.mark.timeout(150)
def test_a_backup_taken_through_node_1_restores_through_node_2_and_one_from_another_cluster_is_refused(
        galera_cloud, tmp_path, server_kwargs):
    from nova_flavor_sync.demo import create_nova_api_database, drop_database

    cluster = galera_cloud.env.cluster
    before = read_specs(cluster, galera_cloud.database, 1)
    synced = run_cli(tmp_path, "--db-url", galera_cloud.url(0), "--all-keys", "--run")
    assert synced.code == 0, synced.shown
    (backup_file,) = (tmp_path / "backups").glob("request_specs_*.json")
    assert read_specs(cluster, galera_cloud.database, 1) != before

    restored = run_cli(tmp_path, "--db-url", galera_cloud.url(1), "--restore", backup_file, "--run")
    assert restored.code == 0, restored.shown
    assert read_specs(cluster, galera_cloud.database, 2) == before  # exact bytes, seen through node 3

    # The same schema name on another Galera cluster (one node, its own cluster uuid) and on
    # the plain server: refused, nothing written.
    foreign_name = galera_cloud.database
    other = GaleraCluster(1)
    try:
        other.start()
        kwargs = {"host": "127.0.0.1", "port": other.nodes[0].port, "user": "root", "password": ""}
        create_nova_api_database(kwargs, foreign_name, with_demo_data=True)
        refused = run_cli(tmp_path, "--db-url", f"{other.nodes[0].url}/{foreign_name}", "--restore", backup_file,
                          "--run")
        uuid_here = cluster.nodes[0].status()["wsrep_cluster_state_uuid"]
        uuid_there = other.nodes[0].status()["wsrep_cluster_state_uuid"]
    finally:
        other.remove()
    assert refused.code == 4, refused.shown
    assert (f"was taken on another server (galera_cluster_uuid={uuid_here}); this is "
            f"galera_cluster_uuid={uuid_there}") in refused.err, refused.shown
    create_nova_api_database(server_kwargs, foreign_name, with_demo_data=True)
    try:
        plain = run_cli(tmp_path, "--db-url", f"mysql+pymysql://root@{server_kwargs['host']}:{server_kwargs['port']}/"
                        f"{foreign_name}", "--restore", backup_file, "--run")
    finally:
        drop_database(server_kwargs, foreign_name)
    assert plain.code == 4 and "was taken on another server (server_hostname=" in plain.err, plain.shown
    FIGURES["backups across the cluster"] = (
        "backup through node 1 restored through node 2: exact bytes (seen through node 3); another cluster, same "
        "schema: exit 4 (galera_cluster_uuid differs); the single server, same schema: exit 4")


# -- large transactions ---------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_batches_stay_inside_the_write_set_limits(galera_cloud, tmp_path):
    cluster = galera_cloud.env.cluster
    node1 = cluster.nodes[0]
    enlarge(galera_cloud.api(0), 10000, seed=6)
    targets = planned_targets(galera_cloud.api(0))
    before = read_specs(cluster, galera_cloud.database, 1)
    limits = node1.sql("SHOW GLOBAL VARIABLES WHERE Variable_name IN ('wsrep_max_ws_rows', 'wsrep_max_ws_size')")
    limits = {row["Variable_name"]: int(row["Value"]) for row in limits}
    assert limits == {"wsrep_max_ws_rows": 0, "wsrep_max_ws_size": 2147483647}  # MariaDB 10.11's defaults

    # The largest batch the tool makes (5,000 rows) in one transaction, with the default limits.
    counters = ("wsrep_replicated", "wsrep_replicated_bytes")
    start = {name: status_counter(node1, name) for name in counters}
    big = run_cli(tmp_path, "--db-url", galera_cloud.url(0), "--all-keys", "--run", "--batch-size", "5000",
                  "--key-prefix", "aggregate_instance_extra_specs:")
    assert big.code == 0, big.shown
    batches = re.search(r"Applied in (\d+) batches \(0 retries\): (\d+) updated", big.out)
    assert batches, big.shown
    rows = int(batches.group(2))
    assert int(batches.group(1)) == 1 and rows > 2500
    replicated = {name: status_counter(node1, name) - start[name] for name in counters}
    # One write-set for the batch (plus the odd other transaction of the cluster, none here).
    ws_bytes = replicated["wsrep_replicated_bytes"] / max(replicated["wsrep_replicated"], 1)
    assert replicated["wsrep_replicated"] == 1, replicated
    assert ws_bytes < limits["wsrep_max_ws_size"] / 20  # well inside: under 5%

    # A cluster that limits write-sets to 1,000 rows: batches of at most 500, told so.
    node1.sql("SET GLOBAL wsrep_max_ws_rows = 1000")
    capped = run_cli(tmp_path, "--db-url", galera_cloud.url(0), "--all-keys", "--run", "--batch-size", "5000")
    assert capped.code == 0, capped.shown
    assert "[WARNING] Batches of at most 500 rows: half of this cluster's wsrep_max_ws_rows (1000)" in capped.out
    sizes = re.search(r"Paced: (\d+) batches of (\d+)-(\d+) rows", capped.out)
    assert sizes and int(sizes.group(3)) == 500, capped.out
    assert assert_not_torn(before, read_specs(cluster, galera_cloud.database, 1), targets) == len(targets)

    # Bytes: a cluster whose wsrep_max_ws_size is below one batch refuses it; the run says what to do.
    enlarge_flavor = "UPDATE flavor_extra_specs SET value = CONCAT(value, '-2') WHERE `key` LIKE 'quota:%%'"
    with cluster.nodes[0].connect(galera_cloud.database) as conn, conn.cursor() as cur:
        cur.execute(enlarge_flavor)
    node1.sql("SET GLOBAL wsrep_max_ws_rows = 0", "SET GLOBAL wsrep_max_ws_size = 65536")
    small = run_cli(tmp_path, "--db-url", galera_cloud.url(0), "--all-keys", "--run", "--batch-size", "200")
    node1.sql("SET GLOBAL wsrep_max_ws_size = 2147483647")
    assert small.code == 5, small.shown
    assert re.search(r"\[ERROR\] the batch of rows \d+-\d+ \(200 rows\) is larger than this Galera cluster accepts in "
                     r"one transaction \(\(1105\) Maximum writeset size exceeded\); nothing of it was written\. Run again "
                     r"with a smaller --batch-size", small.err), small.shown
    FIGURES["write-set limits"] = (
        f"defaults wsrep_max_ws_rows=0 (none), wsrep_max_ws_size=2 GiB; one batch of {rows} rows = one write-set of "
        f"{ws_bytes / 1e6:.1f} MB ({ws_bytes / limits['wsrep_max_ws_size']:.2%} of the limit); with "
        f"wsrep_max_ws_rows=1000 batches of at most 500 ({sizes.group(1)} batches); with wsrep_max_ws_size=64 KiB "
        "a 200-row batch is refused: exit 5, nothing of it written")
