"""SIGKILL the applying CLI at random moments: no torn rows, no damaged backup (issue 4, part 2).

Both flavor copies: the RequestSpecs in nova_api and the instance copies in the two cells
(instance_extra.flavor), which a run writes first. Each trial restores the demo tables to
their original bytes, starts

    python -m nova_flavor_sync --db-url URL --run --all-keys --batch-size 10 --log-file F --backup-dir D

and kills it with SIGKILL at a moment from a seeded schedule: 16 stratified uniform over the
measured duration of an un-killed run (before the backup, during it, in the apply, in the
verify, or after the end), 4 shortly after the backup's temp file appears (in the middle of
writing the backup) and 4 uniform over the apply and verify (after the backup file appears).
Trials run on two demo databases side by side, to stay fast. After each kill, once the server
has dropped the killed connection (a COMMIT the client sent may still land until then):

* every row of both copies is byte-equal to its original text or to the text the plan made
  before the trial says it gets (no torn rows), and no row changed unless a complete backup
  exists;
* a backup with its final name loads with ``backup.load_backup`` and holds every planned row's
  original bytes, each naming its database; a temp file ``.flavor_copies_*.tmp`` may be left
  (counted), nothing else;
* ``--verify`` reports exactly the instances whose two copies the kill left disagreeing (an
  instance copy written, its RequestSpec not yet) and exits 3;
* a rerun of the CLI converges: exit 0, "Verify: 0", every planned row at its new text; it
  writes a backup of the rows still to change (the rows as the killed run left them), or none
  when nothing was left;
* restoring the backups newest first (the rerun's, then the killed run's) brings back the
  original bytes of every row. No ``--force`` is needed: every row the backups hold is still
  exactly what the sync wrote, which the restore's compare-and-swap checks.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dbtools import connect, copies_hash, opened_cloud
from nova_flavor_sync import service
from nova_flavor_sync.backup import load_backup
from nova_flavor_sync.spec_json import INSTANCE_FLAVOR, REQUEST_SPEC, rewrite_extra_specs, sha256_text

pytestmark = pytest.mark.db

SEED = 20260106
UNIFORM_TRIALS = 16  # killed at a moment stratified-uniform over an un-killed run
BACKUP_TRIALS = 4  # killed while the backup's temp file is being written
APPLY_TRIALS = 4  # killed at a moment uniform over the apply and verify, after the backup
CLI_TIMEOUT_S = 60
PRISTINE = "nfs_safety_pristine"
# Where each copy lives: (database suffix, table, JSON column); a row is (database label, id).
COPIES = {"nova_api": ("", "request_specs", "spec"), "cell1": ("_cell1", "instance_extra", "flavor"),
          "cell2": ("_cell2", "instance_extra", "flavor")}


def db_url(params) -> str:
    auth = f"{params.user}:{params.password}@" if params.password else f"{params.user}@"
    return f"mysql+pymysql://{auth}{params.host}:{params.port}/{params.database}"


def cli_args(params, workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "nova_flavor_sync", "--db-url", db_url(params), *args,
            "--log-file", str(workdir / "log"), "--backup-dir", str(workdir / "backups")]


def killed_cli_env(workdir: Path) -> dict[str, str]:
    """The environment of a CLI run that is killed: its temporary files go under ``workdir``
    (killed while it plans, it leaves its plan's spool directory behind)."""
    tmp = workdir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp)}


def run_cli(params, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli_args(params, workdir, *args), capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


def read_copies(params) -> dict[tuple[str, int], str]:
    """Both copies of every instance, by (database label, row id)."""
    found = {}
    for label, (suffix, table, column) in COPIES.items():
        with connect(params, database=params.database + suffix) as conn, conn.cursor() as cur:
            cur.execute(f"SELECT id, {column} FROM {table}")
            found.update(((label, row_id), text) for row_id, text in cur.fetchall())
    return found


def plan_both(params):
    """The plan of both copies, as the CLI makes it, and each cell's label by its uuid."""
    with opened_cloud(params) as (db, cells, flavors, scope):
        cloud = service.plan_both_copies(db, cells, scope, flavors=flavors)
        return cloud, {mapping.uuid: mapping.name for mapping, _ in cells}


def wait_until_server_dropped_others(params, timeout: float = 15.0) -> None:
    """Wait until no other connection uses the databases: the killed one is rolled back or committed."""
    deadline = time.monotonic() + timeout
    with connect(params) as conn, conn.cursor() as cur:
        while True:
            cur.execute(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB LIKE %s AND ID <> CONNECTION_ID()",
                (params.database + "%",),
            )
            if cur.fetchone()[0] == 0:
                return
            assert time.monotonic() < deadline, "the killed run's connection is still open on the server"
            time.sleep(0.01)


def backup_files(directory: Path) -> tuple[list[Path], list[Path]]:
    """(finished backups, temp files) in the directory; anything else fails the test."""
    if not directory.exists():
        return [], []
    finished, temps = [], []
    for path in sorted(directory.iterdir()):
        if re.fullmatch(r"flavor_copies_\d{8}_\d{6}(_\d+)?\.json", path.name):
            finished.append(path)
        elif re.fullmatch(r"\.flavor_copies_\d{8}_\d{6}\.\d+\.tmp", path.name):
            temps.append(path)
        else:
            pytest.fail(f"unexpected file in the backup directory: {path.name}")
    return finished, temps


def trigger_seen(directory: Path, trigger: str) -> bool:
    """Has the run reached ``trigger``: its start, its backup temp file, its finished backup?"""
    if trigger == "start":
        return True
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return False
    if trigger == "tmp":
        return any(name.endswith(".tmp") for name in names)
    return any(name.startswith("flavor_copies_") and name.endswith(".json") for name in names)


def summary_count(stdout: str, name: str) -> int:
    match = re.search(rf"Summary: .*\b{name}=(\d+)", stdout)
    assert match, stdout
    return int(match.group(1))


class Lane:
    """One demo database trials run on, one after the other; two lanes run side by side."""

    def __init__(self, params, reset, workdir: Path) -> None:
        self.params, self.reset, self.workdir = params, reset, workdir
        self.original = read_copies(params)
        cloud, self.cell_names = plan_both(params)
        assert not cloud.disagreement().count  # the demo's stale instances are stale in both copies
        self.new_text, self.instance = {}, {}
        for copy in cloud.copies:
            label = self.cell_names.get(copy.cell_uuid, "nova_api")
            layout = REQUEST_SPEC if copy.cell_uuid is None else INSTANCE_FLAVOR
            for c in copy.plan.changes:
                text = rewrite_extra_specs(self.original[label, c.id], dict(c.diff.target_extra_specs), layout=layout)
                assert sha256_text(text) == c.new_sha256
                self.new_text[label, c.id], self.instance[label, c.id] = text, c.instance_uuid
        self.planned = set(self.new_text)
        assert len([key for key in self.planned if key[0] == "nova_api"]) > 600
        assert len([key for key in self.planned if key[0] != "nova_api"]) > 600

    def disagreeing(self, written: set[tuple[str, int]]) -> set[str]:
        """Instances with one copy written and the other still to write."""
        done = {self.instance[key] for key in written}
        pending = {self.instance[key] for key in self.planned - written}
        return done & pending

    def record_key(self, record, databases) -> tuple[str, int]:
        return (databases[record.database].get("cell") or "nova_api", record.id)

    def apply_command(self, workdir: Path) -> list[str]:
        return cli_args(self.params, workdir, "--run", "--all-keys", "--batch-size", "10")

    def reference_run(self) -> tuple[float, float, float]:
        """An un-killed run: (its duration, when its backup temp file and its backup appeared)."""
        workdir = self.workdir / "reference"
        workdir.mkdir(parents=True)
        seen: dict[str, float] = {}
        started = time.monotonic()
        proc = subprocess.Popen(self.apply_command(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            while proc.poll() is None:
                for trigger in ("tmp", "backup"):
                    if trigger not in seen and trigger_seen(workdir / "backups", trigger):
                        seen[trigger] = time.monotonic() - started
                assert time.monotonic() - started < CLI_TIMEOUT_S, "the CLI run did not end"
                time.sleep(0.0005)
            duration = time.monotonic() - started
            assert proc.returncode == 0, proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            proc.stderr.close()
        assert all(spec == self.new_text.get(k, self.original[k]) for k, spec in read_copies(self.params).items())
        self.reset()
        return duration, seen.get("tmp", 0.0), seen.get("backup", 0.0)

    def run_and_kill(self, workdir: Path, trigger: str, delay: float) -> bool:
        """Start the CLI apply; SIGKILL it ``delay`` s after ``trigger``. False: it ended first."""
        workdir.mkdir(parents=True)
        with open(workdir / "stdout", "w") as out, open(workdir / "stderr", "w") as err:
            proc = subprocess.Popen(self.apply_command(workdir), stdout=out, stderr=err, env=killed_cli_env(workdir))
        start = time.monotonic()
        kill_at = None
        try:
            while proc.poll() is None:
                now = time.monotonic()
                if kill_at is None and trigger_seen(workdir / "backups", trigger):
                    kill_at = now + delay
                if kill_at is not None and now >= kill_at:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(timeout=10)
                    return True
                assert now - start < CLI_TIMEOUT_S, "the CLI run did not end"
                time.sleep(0.0005)
            return False
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)

    def trial(self, index: int, trigger: str, delay: float) -> dict[str, int]:
        """Kill, check, rerun, restore, check, reset; return what happened."""
        where = f"trial {index} (kill {delay:.3f}s after {trigger})"
        workdir = self.workdir / f"trial{index:02d}"
        original, new_text, planned = self.original, self.new_text, self.planned
        killed = self.run_and_kill(workdir, trigger, delay)
        wait_until_server_dropped_others(self.params)

        # No torn row: each one is its old text or its planned new text.
        now = read_copies(self.params)
        assert set(now) == set(original)
        torn = [k for k, spec in now.items() if spec != original[k] and spec != new_text.get(k)]
        assert torn == [], f"{where}: torn rows {torn[:10]}"
        written = {k for k in planned if now[k] == new_text[k]}
        # Cells first: no RequestSpec is written before every instance copy is.
        if any(key[0] == "nova_api" for key in written):
            assert {k for k in planned if k[0] != "nova_api"} <= written, where

        # The backup: complete and verifiable, or absent (a temp file may be left).
        finished, temps = backup_files(workdir / "backups")
        assert len(finished) <= 1, where
        killed_backup = finished[0] if finished else None
        if killed_backup is not None:
            backup = load_backup(killed_backup)
            keys = [self.record_key(r, backup.info.databases) for r in backup.records]
            assert set(keys) == planned, where
            for key, r in zip(keys, backup.records, strict=True):
                assert r.spec == original[key] and r.new_sha256 == sha256_text(new_text[key]), where
        else:
            assert written == set(), f"{where}: {len(written)} rows written without a backup"
        if not killed:
            outcome = "finished before the kill"
            assert written == planned, where
        elif killed_backup is None:
            outcome = "during backup" if temps else "before backup"
        elif not written:
            outcome = "after backup, nothing written"
        elif written != planned:
            outcome = "mid-apply"
        else:
            outcome = "all written"

        # --verify names the instances whose copies now disagree (exit 3 while anything is stale).
        disagreeing = self.disagreeing(written)
        verify = run_cli(self.params, workdir, "--verify", "--all-keys")
        assert verify.returncode == (0 if written == planned else 3), f"{where}: {verify.stdout}\n{verify.stderr}"
        reported = re.search(r"Copies disagree for (\d+) instances", verify.stdout)
        assert (int(reported[1]) if reported else 0) == len(disagreeing), f"{where}: {verify.stdout}"
        if disagreeing:
            outcome += ", copies disagree"

        # A rerun converges, and backs up exactly the rows the killed run left.
        rerun = run_cli(self.params, workdir, "--run", "--all-keys")
        assert rerun.returncode == 0, f"{where}: {rerun.stdout}\n{rerun.stderr}"
        if written == planned:  # nothing left to do: no backup, no write, no verify line
            assert "Both copies: 0 to update" in rerun.stdout, f"{where}: {rerun.stdout}"
        else:
            assert "Verify: 0 flavor copies still out of sync in scope" in rerun.stdout, f"{where}: {rerun.stdout}"
            assert "Copies disagree" not in rerun.stdout.split("Verify:")[1], f"{where}: {rerun.stdout}"
            assert summary_count(rerun.stdout, "Updated") == len(planned - written), f"{where}: {rerun.stdout}"
        assert all(spec == new_text.get(k, original[k]) for k, spec in read_copies(self.params).items()), where
        rerun_backups = [p for p in backup_files(workdir / "backups")[0] if p != killed_backup]
        assert len(rerun_backups) == (0 if written == planned else 1), where
        if rerun_backups:
            backup = load_backup(rerun_backups[0])
            keys = [self.record_key(r, backup.info.databases) for r in backup.records]
            assert set(keys) == planned - written, where
            assert all(r.spec == original[key] for key, r in zip(keys, backup.records, strict=True)), where

        # Restore newest first: the rerun's backup, then the killed run's.
        restores = [(rerun_backups[0], len(planned - written))] if rerun_backups else []
        restores += [(killed_backup, len(written))] if killed_backup else []
        for path, expected in restores:
            restored = run_cli(self.params, workdir, "--restore", str(path), "--run")
            assert restored.returncode == 0, f"{where}: {restored.stdout}\n{restored.stderr}"
            assert summary_count(restored.stdout, "Restored") == expected, f"{where}: {restored.stdout}"
            assert summary_count(restored.stdout, "Errors") == 0, where
        after_restore = read_copies(self.params)
        assert [k for k in original if after_restore[k] != original[k]] == [], f"{where}: not restored"
        self.reset()
        return {outcome: 1, "disagreeing instances healed": len(disagreeing), "torn rows": len(torn),
                "temp files left": len(temps),
                "backups verified": 1 + len(rerun_backups) if killed_backup else len(rerun_backups),
                "rows restored": len(planned)}


def pristine_copy(params):
    """Save both copies' tables in side tables; return a function that puts them back."""
    for suffix, table, _ in COPIES.values():
        with connect(params, database=params.database + suffix) as conn, conn.cursor() as cur:
            cur.execute(f"CREATE TABLE {PRISTINE} LIKE {table}")
            cur.execute(f"INSERT INTO {PRISTINE} SELECT * FROM {table}")
    original_hash = copies_hash(params)

    def reset() -> None:
        for suffix, table, _ in COPIES.values():
            with connect(params, database=params.database + suffix) as conn, conn.cursor() as cur:
                cur.execute(f"DELETE FROM {table} WHERE id NOT IN (SELECT id FROM {PRISTINE})")
                cur.execute(f"REPLACE INTO {table} SELECT * FROM {PRISTINE}")
        assert copies_hash(params) == original_hash

    return reset


@pytest.fixture
def lanes(demo_db, other_demo_db, tmp_path) -> list[Lane]:
    """Two fresh demo databases, each with a fast way back to its original rows."""
    return [Lane(params, pristine_copy(params), tmp_path / f"lane{n}")
            for n, params in enumerate((demo_db, other_demo_db))]


@pytest.mark.timeout(170)
def test_sigkill_at_random_moments_leaves_no_torn_row_and_a_usable_backup(lanes):
    with ThreadPoolExecutor(len(lanes)) as pool:
        references = list(pool.map(Lane.reference_run, lanes))  # side by side, as the trials run
    duration, t_tmp, t_backup = (sum(r[i] for r in references) / len(references) for i in range(3))

    rng = random.Random(SEED)
    schedule = [("start", (i + rng.random()) / UNIFORM_TRIALS * duration) for i in range(UNIFORM_TRIALS)]
    schedule += [("tmp", rng.uniform(0, (t_backup - t_tmp) / 2)) for _ in range(BACKUP_TRIALS)]
    schedule += [("backup", rng.uniform(0, duration - t_backup)) for _ in range(APPLY_TRIALS)]

    def run_lane(n: int) -> list[dict[str, int]]:
        return [lanes[n].trial(i, *when) for i, when in enumerate(schedule) if i % len(lanes) == n]

    with ThreadPoolExecutor(len(lanes)) as pool:
        outcomes = [o for results in pool.map(run_lane, range(len(lanes))) for o in results]
    totals: dict[str, int] = {}
    for outcome in outcomes:
        for key, value in outcome.items():
            totals[key] = totals.get(key, 0) + value

    assert len(outcomes) == len(schedule) >= 20
    assert totals["torn rows"] == 0
    for where in ("before backup", "during backup", "mid-apply, copies disagree"):
        assert totals.get(where, 0) >= 1, totals
    assert totals["disagreeing instances healed"] > 0
    phases = ("before backup", "during backup", "after backup, nothing written", "mid-apply",
              "mid-apply, copies disagree", "all written", "finished before the kill")
    print(
        f"\n[crash] trials={len(schedule)} (un-killed run {duration:.2f}s, backup temp file at {t_tmp:.3f}s, "
        f"backup at {t_backup:.3f}s) killed: " + ", ".join(f"{p}={totals.get(p, 0)}" for p in phases)
        + f"; disagreeing instances reported and healed={totals['disagreeing instances healed']}"
        + f"; torn rows={totals['torn rows']} backups verified={totals['backups verified']} damaged backups=0 "
        f"temp files left={totals['temp files left']} reruns converged={len(outcomes)} "
        f"restores to the original bytes={len(outcomes)} ({totals['rows restored']} rows)"
    )
