"""SIGKILL the applying CLI at random moments: no torn rows, no damaged backup (issue 4, part 2).

Each trial restores the demo table to its original bytes, starts

    python -m nova_flavor_sync --db-url URL --run --all-keys --batch-size 10 --log-file F --backup-dir D

and kills it with SIGKILL at a moment from a seeded schedule: 16 stratified uniform over the
measured duration of an un-killed run (before the backup, during it, in the apply, in the
verify, or after the end), 4 shortly after the backup's temp file appears (in the middle of
writing the backup) and 4 uniform over the apply and verify (after the backup file appears).
Trials run on two demo databases side by side, to stay fast. After each kill, once the server
has dropped the killed connection (a COMMIT the client sent may still land until then):

* every row is byte-equal to its original text or to the text the plan made before the trial
  says it gets (no torn rows), and no row changed unless a complete backup exists;
* a backup with its final name loads with ``backup.load_backup`` and holds every planned row's
  original bytes; a temp file ``.request_specs_*.tmp`` may be left (counted), nothing else;
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

from dbtools import connect, plan_request_specs, table_hash
from nova_flavor_sync.backup import load_backup
from nova_flavor_sync.spec_json import rewrite_extra_specs, sha256_text

pytestmark = pytest.mark.db

SEED = 20260106
UNIFORM_TRIALS = 16  # killed at a moment stratified-uniform over an un-killed run
BACKUP_TRIALS = 4  # killed while the backup's temp file is being written
APPLY_TRIALS = 4  # killed at a moment uniform over the apply and verify, after the backup
CLI_TIMEOUT_S = 60
PRISTINE = "nfs_safety_pristine_request_specs"


def db_url(params) -> str:
    auth = f"{params.user}:{params.password}@" if params.password else f"{params.user}@"
    return f"mysql+pymysql://{auth}{params.host}:{params.port}/{params.database}"


def cli_args(params, workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "nova_flavor_sync", "--db-url", db_url(params), *args,
            "--log-file", str(workdir / "log"), "--backup-dir", str(workdir / "backups")]


def run_cli(params, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli_args(params, workdir, *args), capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


def read_specs(params) -> dict[int, str]:
    with connect(params) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, spec FROM request_specs")
        return dict(cur.fetchall())


def wait_until_server_dropped_others(params, timeout: float = 15.0) -> None:
    """Wait until no other connection uses the database: the killed one is rolled back or committed."""
    deadline = time.monotonic() + timeout
    with connect(params) as conn, conn.cursor() as cur:
        while True:
            cur.execute(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = %s AND ID <> CONNECTION_ID()",
                (params.database,),
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
        if re.fullmatch(r"request_specs_\d{8}_\d{6}(_\d+)?\.json", path.name):
            finished.append(path)
        elif re.fullmatch(r"\.request_specs_\d{8}_\d{6}\.\d+\.tmp", path.name):
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
    return any(name.startswith("request_specs_") and name.endswith(".json") for name in names)


def summary_count(stdout: str, name: str) -> int:
    match = re.search(rf"Summary: .*\b{name}=(\d+)", stdout)
    assert match, stdout
    return int(match.group(1))


class Lane:
    """One demo database trials run on, one after the other; two lanes run side by side."""

    def __init__(self, params, reset, workdir: Path) -> None:
        self.params, self.reset, self.workdir = params, reset, workdir
        self.original = read_specs(params)
        plan = plan_request_specs(params)
        self.new_text = {
            c.id: rewrite_extra_specs(self.original[c.id], dict(c.diff.target_extra_specs)) for c in plan.changes
        }
        assert all(sha256_text(self.new_text[c.id]) == c.new_sha256 for c in plan.changes)
        self.planned = set(self.new_text)
        assert len(self.planned) > 600

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
        assert all(spec == self.new_text.get(i, self.original[i]) for i, spec in read_specs(self.params).items())
        self.reset()
        return duration, seen.get("tmp", 0.0), seen.get("backup", 0.0)

    def run_and_kill(self, workdir: Path, trigger: str, delay: float) -> bool:
        """Start the CLI apply; SIGKILL it ``delay`` s after ``trigger``. False: it ended first."""
        workdir.mkdir(parents=True)
        with open(workdir / "stdout", "w") as out, open(workdir / "stderr", "w") as err:
            proc = subprocess.Popen(self.apply_command(workdir), stdout=out, stderr=err)
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
        now = read_specs(self.params)
        assert set(now) == set(original)
        torn = [i for i, spec in now.items() if spec != original[i] and spec != new_text.get(i)]
        assert torn == [], f"{where}: torn rows {torn[:10]}"
        written = {i for i in planned if now[i] == new_text[i]}

        # The backup: complete and verifiable, or absent (a temp file may be left).
        finished, temps = backup_files(workdir / "backups")
        assert len(finished) <= 1, where
        killed_backup = finished[0] if finished else None
        if killed_backup is not None:
            records = load_backup(killed_backup).records
            assert {r.id for r in records} == planned, where
            for r in records:
                assert r.spec == original[r.id] and r.new_sha256 == sha256_text(new_text[r.id]), where
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

        # A rerun converges, and backs up exactly the rows the killed run left.
        rerun = run_cli(self.params, workdir, "--run", "--all-keys")
        assert rerun.returncode == 0, f"{where}: {rerun.stdout}\n{rerun.stderr}"
        if written == planned:  # nothing left to do: no backup, no write, no verify line
            assert re.search(r"Read \d+ request specs: 0 to update", rerun.stdout), f"{where}: {rerun.stdout}"
        else:
            assert "Verify: 0 request specs still out of sync in scope" in rerun.stdout, f"{where}: {rerun.stdout}"
            assert summary_count(rerun.stdout, "Updated") == len(planned - written), f"{where}: {rerun.stdout}"
        assert all(spec == new_text.get(i, original[i]) for i, spec in read_specs(self.params).items()), where
        rerun_backups = [p for p in backup_files(workdir / "backups")[0] if p != killed_backup]
        assert len(rerun_backups) == (0 if written == planned else 1), where
        if rerun_backups:
            records = load_backup(rerun_backups[0]).records
            assert {r.id for r in records} == planned - written, where
            assert all(r.spec == original[r.id] for r in records), where

        # Restore newest first: the rerun's backup, then the killed run's.
        restores = [(rerun_backups[0], len(planned - written))] if rerun_backups else []
        restores += [(killed_backup, len(written))] if killed_backup else []
        for path, expected in restores:
            restored = run_cli(self.params, workdir, "--restore", str(path), "--run")
            assert restored.returncode == 0, f"{where}: {restored.stdout}\n{restored.stderr}"
            assert summary_count(restored.stdout, "Restored") == expected, f"{where}: {restored.stdout}"
            assert summary_count(restored.stdout, "Errors") == 0, where
        after_restore = read_specs(self.params)
        assert [i for i in original if after_restore[i] != original[i]] == [], f"{where}: not restored"
        self.reset()
        return {outcome: 1, "torn rows": len(torn), "temp files left": len(temps),
                "backups verified": 1 + len(rerun_backups) if killed_backup else len(rerun_backups),
                "rows restored": len(planned)}


def pristine_copy(params):
    """Save request_specs in a side table; return a function that puts it back (one REPLACE)."""
    with connect(params) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE TABLE {PRISTINE} LIKE request_specs")
        cur.execute(f"INSERT INTO {PRISTINE} SELECT * FROM request_specs")
    original_hash = table_hash(params)

    def reset() -> None:
        with connect(params) as conn, conn.cursor() as cur:
            cur.execute(f"DELETE FROM request_specs WHERE id NOT IN (SELECT id FROM {PRISTINE})")
            cur.execute(f"REPLACE INTO request_specs SELECT * FROM {PRISTINE}")
        assert table_hash(params) == original_hash

    return reset


@pytest.fixture
def lanes(demo_db, other_demo_db, tmp_path) -> list[Lane]:
    """Two fresh demo databases, each with a fast way back to its original rows."""
    return [Lane(params, pristine_copy(params), tmp_path / f"lane{n}")
            for n, params in enumerate((demo_db, other_demo_db))]


@pytest.mark.timeout(110)
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
    for where in ("before backup", "during backup", "mid-apply"):
        assert totals.get(where, 0) >= 1, totals
    phases = ("before backup", "during backup", "after backup, nothing written", "mid-apply", "all written",
              "finished before the kill")
    print(
        f"\n[crash] trials={len(schedule)} (un-killed run {duration:.2f}s, backup temp file at {t_tmp:.3f}s, "
        f"backup at {t_backup:.3f}s) killed: " + ", ".join(f"{p}={totals.get(p, 0)}" for p in phases)
        + f"; torn rows={totals['torn rows']} backups verified={totals['backups verified']} damaged backups=0 "
        f"temp files left={totals['temp files left']} reruns converged={len(outcomes)} "
        f"restores to the original bytes={len(outcomes)} ({totals['rows restored']} rows)"
    )
