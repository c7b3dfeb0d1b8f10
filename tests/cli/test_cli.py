"""The command line, end to end: ``nova_flavor_sync.cli.main([...])`` against the real MariaDB.

Each test calls the real entry point in-process (as sqlite-utils' CliRunner tests and
nova-manage's functional tests do) and asserts the exact exit code, showing the output when
it is not the expected one. Every call gets its own ``--log-file`` and ``--backup-dir`` under
``tmp_path`` so nothing touches the home directory, and the database is always named with
``--db-url`` (or, in the tests about that, ``--nova-conf`` / ``NOVA_API_DB_URL``).

Tests of bad input pass ``--run --all-keys`` wherever that keeps the same error: if the
check under test were missing, the tool would go on and write, and ``table_hash`` would
catch it.
"""

from __future__ import annotations

import hashlib
import re
import shlex
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

import pytest

from dbtools import (
    SECRET,
    assert_no_secret,
    busy_sessions,
    connect,
    copies_hash,
    map_instances,
    table_hash,
    threads_running,
)
from nova_flavor_sync import cli, dburl, service
from nova_flavor_sync.dburl import DbParams

pytestmark = pytest.mark.db

# The columns a restore must bring back byte for byte (updated_at legitimately changes).
SPEC_COLUMNS = "id, instance_uuid, spec"
# In the demo data, "24" is both flavor id 24 (i3.xlarge) and the flavorid of id 1 (gp2.small).
AMBIGUOUS_FLAVOR = "23"
# A flavor with stale copies in the demo data, and its flavorid.
C5_LARGE, C5_LARGE_FLAVORID = "c5.large", "1051b0da-6d14-4c64-953b-ddf272956d12"
# A small flavor (42 stale rows): a cheap way to get a real backup file.
SMALL_FLAVOR = "i3.small"


# -- helpers --------------------------------------------------------------------------------


class Result(NamedTuple):
    code: int
    out: str
    err: str

    @property
    def shown(self) -> str:
        """Both streams, for an assertion message."""
        return f"--- exit {self.code}\n--- stdout:\n{self.out}\n--- stderr:\n{self.err}"


def db_url(params: DbParams, *, password: str | None = None, **changes: object) -> str:
    """``params`` as a ``--db-url``; ``changes`` replace host, port, user or database."""
    parts = {"user": params.user, "host": params.host, "port": params.port, "database": params.database, **changes}
    password = params.password if password is None else password
    auth = f"{parts['user']}:{password}@" if password else f"{parts['user']}@"
    return f"mysql+pymysql://{auth}{parts['host']}:{parts['port']}/{parts['database']}"


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    return tmp_path / "log"


@pytest.fixture
def backup_dir(tmp_path: Path) -> Path:
    return tmp_path / "backups"


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], log_file: Path, backup_dir: Path) -> Callable[..., Result]:
    """``run(*args)``: call ``cli.main`` and return ``(code, out, err)`` of that call only.

    ``--log-file`` and ``--backup-dir`` come first, so a test may override either (argparse
    keeps the last value). The demo cloud's template cell is filled from NOVA_DATABASE_CONNECTION,
    which the ``demo_db`` fixture sets. argparse's own errors raise SystemExit(2): that is the code then.
    """

    def run(*args: object) -> Result:
        argv = ["--log-file", str(log_file), "--backup-dir", str(backup_dir), *map(str, args)]
        capsys.readouterr()  # forget the output of earlier calls
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


@pytest.fixture(autouse=True)
def _no_database_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOVA_API_DB_URL", raising=False)


def messages(text: str) -> list[str]:
    """The log lines of ``text`` without their ``[time] [LEVEL] `` prefix."""
    return [re.sub(r"^\[[^\]]*\] \[[A-Z]+\] ", "", line) for line in text.splitlines()]


def summary_updated(out: str) -> int:
    found = re.findall(r"^\[.*\] \[INFO\] Summary: Updated=(\d+), Skipped=\d+, Errors=\d+$", out, re.M)
    assert len(found) == 1, out
    return int(found[0])


def backups_in(directory: Path) -> list[Path]:
    return sorted(directory.glob("flavor_copies_*.json")) if directory.exists() else []


def specs_by_id(params: DbParams) -> dict[int, str]:
    with connect(params) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, spec FROM request_specs")
        return dict(cur.fetchall())


def is_subsequence(lines: list[str], of: list[str]) -> bool:
    remaining = iter(of)
    return all(line in remaining for line in lines)


# -- 1. the main flow ----------------------------------------------------------------------


def test_dry_run_apply_verify_list_restore(run, demo_db, log_file, backup_dir):
    url = db_url(demo_db)
    specs_before = copies_hash(demo_db, copies_only=True)
    untouched = copies_hash(demo_db)
    stdout_seen: list[str] = []

    # Dry run (with --all-keys from the start: the printed command repeats the dry run's flags).
    dry = run("--db-url", url, "--all-keys")
    assert dry.code == 3, dry.shown
    stdout_seen += dry.out.splitlines()
    to_update = summary_updated(dry.out)
    assert to_update > 0
    assert "Mismatch:" not in dry.out
    digest = re.search(r"Plan digest: ([0-9a-f]{64})$", dry.out, re.M)[1]
    command = messages(dry.out)[-1].strip()
    assert re.fullmatch(r"nova-flavor-sync .* --run --plan-digest [0-9a-f]{64}", command), dry.shown
    assert command.endswith(f"--run --plan-digest {digest}")
    assert copies_hash(demo_db) == untouched

    verbose = run("--db-url", url, "--all-keys", "--verbose")
    assert verbose.code == 3, verbose.shown
    stdout_seen += verbose.out.splitlines()
    mismatches = re.findall(r"\] Mismatch: ([0-9a-f-]{36}) \(Flavor: [^)]+\)$", verbose.out, re.M)
    # Both copies of an instance: its RequestSpec, then (under its cell's heading) its own copy.
    assert len(mismatches) == to_update and len(set(mismatches)) == to_update // 2
    assert verbose.out.count("] Changes: {") == to_update
    assert copies_hash(demo_db) == untouched

    # Run exactly the printed command.
    argv = shlex.split(command)
    assert argv[0] == "nova-flavor-sync"
    applied = run(*argv[1:])
    assert applied.code == 0, applied.shown
    stdout_seen += applied.out.splitlines()
    assert "Verify: 0 flavor copies still out of sync in scope" in applied.out
    assert "Writing the instance copies in each cell first, then the RequestSpecs" in applied.out
    assert summary_updated(applied.out) == to_update
    [backup] = backups_in(backup_dir)
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert stat.S_IMODE(backup_dir.stat().st_mode) == 0o700
    assert re.search(rf"\] Backup written: {re.escape(str(backup))} \({to_update} records: nova_api=\d+, "
                     r"cell1 \([0-9a-f-]{36}\)=\d+, cell2 \([0-9a-f-]{36}\)=\d+\)$", applied.out, re.M), applied.shown
    assert copies_hash(demo_db, copies_only=True) != specs_before

    again = run("--db-url", url, "--all-keys")
    assert again.code == 0, again.shown
    stdout_seen += again.out.splitlines()
    assert summary_updated(again.out) == 0
    assert "DRY RUN: nothing to change." in again.out

    verify = run("--db-url", url, "--all-keys", "--verify")
    assert verify.code == 0, verify.shown
    stdout_seen += verify.out.splitlines()
    # Minimal: one line per copy (nova_api, cell1, cell2), the total, the summary.
    assert [line.split(":")[0] for line in messages(verify.out)] == [
        "Read 1500 request specs", "Read 884 instance copies in cell1 (835ce9b0-6a5b-5709-b701-5eb36f22fdca)",
        "Read 576 instance copies in cell2 (ada1b992-1bb5-5458-b47a-3407ad251e9e)", "Both copies", "Summary"
    ], verify.shown
    assert not verify.err
    assert "Summary: Updated=0, " in verify.out

    listed = run("--list-backups")
    assert listed.code == 0, listed.shown
    stdout_seen += listed.out.splitlines()
    assert re.search(rf"\] {re.escape(backup.name)}  records={to_update}  .*plan={digest[:12]}  "
                     r"\(nova_api=\d+  cell1 ", listed.out, re.M), listed.shown

    synced = copies_hash(demo_db)
    restore_dry = run("--db-url", url, "--restore", backup)
    assert restore_dry.code == 3, restore_dry.shown
    assert f"Summary: Would restore={to_update}, Skipped=0, Errors=0" in restore_dry.out
    restore_command = re.search(r"\] DRY RUN: nothing was written\. To restore: (.*)$", restore_dry.out, re.M)[1]
    assert shlex.split(restore_command)[-3:] == ["--restore", str(backup), "--run"], restore_command
    assert copies_hash(demo_db) == synced
    stdout_seen += restore_dry.out.splitlines()

    restored = run("--db-url", url, "--restore", backup, "--run")
    assert restored.code == 0, restored.shown
    stdout_seen += restored.out.splitlines()
    assert f"Summary: Restored={to_update}, Skipped=0, Errors=0" in restored.out
    assert copies_hash(demo_db, copies_only=True) == specs_before

    # Every stdout line is in the log file, in the same order; the log file is private.
    logged = log_file.read_text(encoding="utf-8").splitlines()
    assert stdout_seen and is_subsequence(stdout_seen, logged)
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600


# -- 2. the default key policy ---------------------------------------------------------------


def test_without_all_keys_placement_keys_are_held_back_and_not_drift(run, demo_db):
    url = db_url(demo_db)
    untouched = table_hash(demo_db)

    dry = run("--db-url", url)
    assert dry.code == 3, dry.shown
    held = r"\] Held back \(placement keys; --all-keys syncs them\): .*hw:cpu_policy=\d+, trait1:CUSTOM_NVME_GEN4"
    assert re.search(held, dry.out), dry.shown
    assert table_hash(demo_db) == untouched

    before = run("--db-url", url, "--verify")
    assert before.code == 3, before.shown

    applied = run("--db-url", url, "--run")
    assert applied.code == 0, applied.shown
    assert "Verify: 0 flavor copies still out of sync in scope" in applied.out

    after = run("--db-url", url, "--verify")
    assert after.code == 0, after.shown
    # The held-back keys were not written: the rows that had them now differ only there ...
    again = run("--db-url", url)
    assert re.search(r" 0 to update, .* [1-9]\d* with only risky changes \(held back\)", again.out), again.shown
    # ... and with --all-keys they are still drift.
    risky = run("--db-url", url, "--verify", "--all-keys")
    assert risky.code == 3, risky.shown


# -- 3. scope flags ---------------------------------------------------------------------------


def test_flavor_limits_the_plan_and_the_run_to_that_flavor(run, demo_db):
    url = db_url(demo_db)
    dry = run("--db-url", url, "--all-keys", "--flavor", C5_LARGE, "--verbose")
    assert dry.code == 3, dry.shown
    assert re.search(rf"\] To update by flavor: {re.escape(C5_LARGE)}=\d+$", dry.out, re.M), dry.shown
    flavors_shown = set(re.findall(r"\] Mismatch: \S+ \(Flavor: ([^)]+)\)$", dry.out, re.M))
    assert flavors_shown == {C5_LARGE_FLAVORID}

    applied = run("--db-url", url, "--all-keys", "--flavor", C5_LARGE, "--run")
    assert applied.code == 0, applied.shown

    rest = run("--db-url", url, "--all-keys")
    assert rest.code == 3, rest.shown  # the other flavors were left alone
    by_flavor = re.search(r"\] To update by flavor: (.*)$", rest.out, re.M)[1]
    assert C5_LARGE not in by_flavor and "r5.large=" in by_flavor


def test_instance_limits_the_run_to_one_row(run, demo_db):
    url = db_url(demo_db)
    everything = run("--db-url", url, "--all-keys", "--verbose")
    assert everything.code == 3, everything.shown
    instance = re.search(r"\] Mismatch: ([0-9a-f-]{36}) ", everything.out)[1]
    before = specs_by_id(demo_db)

    dry = run("--db-url", url, "--all-keys", "--instance", instance, "--verbose")
    assert dry.code == 3, dry.shown
    assert re.findall(r"\] Mismatch: ([0-9a-f-]{36}) ", dry.out) == [instance, instance]  # both copies
    assert "] Read 1 request specs: 1 to update" in dry.out
    assert re.search(r"\] Read 1 instance copies in cell\d \([0-9a-f-]{36}\): 1 to update", dry.out), dry.shown

    applied = run("--db-url", url, "--all-keys", "--instance", instance.upper(), "--run")
    assert applied.code == 0, applied.shown
    after = specs_by_id(demo_db)
    changed = [row_id for row_id in before if before[row_id] != after[row_id]]
    with connect(demo_db) as conn, conn.cursor() as cur:
        cur.execute("SELECT id FROM request_specs WHERE instance_uuid = %s", (instance,))
        assert changed == [cur.fetchone()[0]]


def test_key_prefix_limits_the_keys_that_change(run, demo_db):
    url = db_url(demo_db)
    prefix = "aggregate_instance_extra_specs:"
    dry = run("--db-url", url, "--all-keys", "--key-prefix", prefix)
    assert dry.code == 3, dry.shown
    keys = re.findall(r"(\S+)=\d+", re.search(r"\] Key changes by key: (.*)$", dry.out, re.M)[1])
    assert keys and all(key.startswith(prefix) for key in keys), keys

    applied = run("--db-url", url, "--all-keys", "--key-prefix", prefix, "--run")
    assert applied.code == 0, applied.shown

    rest = run("--db-url", url, "--all-keys")
    assert rest.code == 3, rest.shown  # other keys are still stale, the prefixed ones are not
    keys_left = re.search(r"\] Key changes by key: (.*)$", rest.out, re.M)[1]
    assert prefix not in keys_left and "quota:" in keys_left


# -- 4. a plan digest from an older dry run --------------------------------------------------


def test_run_with_the_digest_of_an_older_plan_is_refused(run, demo_db, backup_dir):
    url = db_url(demo_db)
    dry = run("--db-url", url, "--all-keys")
    assert dry.code == 3, dry.shown
    command = shlex.split(messages(dry.out)[-1].strip())
    with connect(demo_db) as conn, conn.cursor() as cur:
        changed = cur.execute(
            "UPDATE flavor_extra_specs SET value = 'hdd' "
            "WHERE flavor_id = 1 AND `key` = 'aggregate_instance_extra_specs:storage_type'"
        )
        assert changed == 1
    before = table_hash(demo_db)

    refused = run(*command[1:])
    assert refused.code == 4, refused.shown
    assert re.search(r"\[ERROR\] the plan is no longer [0-9a-f]{64} .*data changed.*Nothing was written", refused.err)
    assert table_hash(demo_db) == before
    assert backups_in(backup_dir) == []


# -- 5. bad input ---------------------------------------------------------------------------

# (args after --db-url <demo_db>, regex on stderr); {tmp} is the test's tmp_path.
USAGE_ERRORS = [
    pytest.param(["--verify", "--run", "--all-keys"], r"--run cannot be used with --verify", id="verify-run"),
    pytest.param(["--verify", "--restore", "{tmp}/b.json"], r"only one of --verify, --restore", id="verify-restore"),
    pytest.param(["--list-backups", "--run"], r"--run cannot be used with .*--list-backups", id="list-backups-run"),
    pytest.param(["--force", "--run", "--all-keys"], r"--force is only for --restore", id="force-without-restore"),
    pytest.param(["--plan-digest", "0" * 64, "--all-keys"], r"--plan-digest goes with --run", id="digest-without-run"),
    pytest.param(["--run", "--plan-digest", "abc"], r"a plan digest is 64 hex digits", id="digest-malformed"),
    pytest.param(["--run", "--restore", "{tmp}/b.json", "--plan-digest", "0" * 64],
                 r"--plan-digest goes with --run \(not --restore\)", id="digest-with-restore"),
    pytest.param(["--no-backup", "--backup-all", "--run", "--all-keys"], r"--no-backup and --backup-all contradict",
                 id="no-backup-backup-all"),
    pytest.param(["--nova-conf", "{tmp}/nova.conf", "--run", "--all-keys"], r"use one of --db-url and --nova-conf",
                 id="db-url-and-nova-conf"),
    pytest.param(["--batch-size", "0", "--run", "--all-keys"], r"--batch-size: must be between 1 and 5000",
                 id="batch-size-0"),
    pytest.param(["--batch-size", "-5", "--run", "--all-keys"], r"--batch-size: must be between 1 and 5000",
                 id="batch-size-negative"),
    pytest.param(["--batch-size", "abc", "--run", "--all-keys"], r"--batch-size: 'abc' is not a whole number",
                 id="batch-size-not-a-number"),
    pytest.param(["--batch-size", "999999", "--run", "--all-keys"], r"--batch-size: must be between 1 and 5000",
                 id="batch-size-too-big"),
    pytest.param(["--batch-seconds", "-1", "--run", "--all-keys"],
                 r"--batch-seconds: must be between 0 and 60 seconds", id="batch-seconds-negative"),
    pytest.param(["--batch-seconds", "abc", "--run", "--all-keys"],
                 r"--batch-seconds: 'abc' is not a number of seconds", id="batch-seconds-not-a-number"),
    pytest.param(["--batch-seconds", "nan", "--run", "--all-keys"],
                 r"--batch-seconds: 'nan' is not a number of seconds", id="batch-seconds-nan"),
    pytest.param(["--batch-seconds", "0.001", "--run", "--all-keys"],
                 r"--batch-seconds: must be 0 \(fixed --batch-size\) or at least 0.01 seconds",
                 id="batch-seconds-tiny"),
    pytest.param(["--pause", "-0.5", "--run", "--all-keys"], r"--pause: must be between 0 and 3600 seconds",
                 id="pause-negative"),
    pytest.param(["--pause", "inf", "--run", "--all-keys"], r"--pause: 'inf' is not a number of seconds",
                 id="pause-infinite"),
    pytest.param(["--max-threads-running", "-1", "--run", "--all-keys"],
                 r"--max-threads-running: must be between 0 \(do not check\) and 1000000", id="threads-negative"),
    pytest.param(["--max-threads-running", "2.5", "--run", "--all-keys"],
                 r"--max-threads-running: '2.5' is not a whole number", id="threads-not-whole"),
    pytest.param(["--max-replica-lag", "5", "--run", "--all-keys"], r"--max-replica-lag needs --replica-db-url",
                 id="replica-lag-without-replica"),
    pytest.param(["--replica-db-url", "mysql://r/nova_api", "--max-replica-lag", "-1", "--run", "--all-keys"],
                 r"--max-replica-lag: must be between 0 and 86400 seconds", id="replica-lag-negative"),
    pytest.param(["--replica-db-url", "mysql://replica:3306", "--run", "--all-keys"],
                 r"--replica-db-url: replica URL: a database name is needed", id="replica-url-no-database"),
    pytest.param(["--replica-db-url", "http://replica/nova_api", "--run", "--all-keys"],
                 r"--replica-db-url: replica URL: unsupported URL scheme 'http'", id="replica-url-bad-scheme"),
    pytest.param(["--max-load-wait", "0", "--run", "--all-keys"], r"--max-load-wait: must be between 1 and 86400",
                 id="max-load-wait-0"),
    pytest.param(["--verify", "--pause", "1"], r"pace writes: not for --verify or --list-backups", id="verify-pause"),
    pytest.param(["--list-backups", "--replica-db-url", "mysql://r/nova_api"],
                 r"pace writes: not for --verify or --list-backups", id="list-backups-replica"),
    pytest.param(["--frobnicate", "--run", "--all-keys"], r"unrecognized arguments: --frobnicate", id="unknown-flag"),
    pytest.param(["--restore", "{tmp}/b.json", "--flavor", "x"], r"do not apply to --restore",
                 id="restore-with-flavor"),
    pytest.param(["--list-backups", "--backup-dir", "nosuchfs://bucket/backups"],
                 r"argument --backup-dir: nosuchfs://bucket/backups: Unsupported filesystem: 'nosuchfs'",
                 id="backup-dir-unknown-scheme"),
    pytest.param(["--list-backups", "--all-keys"], r"do not apply to --restore or --list-backups",
                 id="list-backups-with-all-keys"),
    pytest.param(["--flavor", "no-such-flavor", "--run", "--all-keys"], r"--flavor 'no-such-flavor' matches no flavor",
                 id="unknown-flavor"),
    pytest.param(["--flavor", AMBIGUOUS_FLAVOR, "--run", "--all-keys"],
                 r"--flavor '23' is ambiguous \(id:1 name:gp2\.small flavorid:23, id:23 name:bm\.xlarge.*say which",
                 id="ambiguous-flavor"),
    pytest.param(["--flavor", "x' OR '1'='1", "--run", "--all-keys"], r"--flavor \"x' OR '1'='1\" matches no flavor",
                 id="flavor-sql-injection"),
    pytest.param(["--instance", "not-a-uuid", "--run", "--all-keys"], r"--instance 'not-a-uuid' is not a UUID",
                 id="instance-not-a-uuid"),
    pytest.param(["--key-prefix", " ", "--run", "--all-keys"], r"--key-prefix ' ' must be 1 to 255 non-blank",
                 id="key-prefix-blank"),
]


@pytest.mark.parametrize(("args", "message"), USAGE_ERRORS)
def test_bad_usage_exits_2_and_writes_nothing(run, demo_db, tmp_path, backup_dir, args, message):
    before = table_hash(demo_db)
    result = run("--db-url", db_url(demo_db), *(arg.format(tmp=tmp_path) for arg in args))
    assert result.code == 2, result.shown
    assert re.search(message, result.err), result.shown
    assert table_hash(demo_db) == before
    assert backups_in(backup_dir) == []


def _nova_conf(tmp: Path, text: str) -> str:
    path = tmp / "nova.conf"
    path.write_text(text, encoding="utf-8")
    return str(path)


# (args from (demo_db params, tmp_path), regex on stderr); each is followed by --run --all-keys.
REFUSED_LOCATIONS = [
    pytest.param(lambda p, tmp: ["--db-url", f"postgresql://{p.user}@{p.host}:{p.port}/{p.database}"],
                 r"--db-url: unsupported URL scheme 'postgresql'", id="url-scheme-postgresql"),
    pytest.param(lambda p, tmp: ["--db-url", f"mysql+pymysql://{p.user}@{p.host}:{p.port}/"],
                 r"--db-url: a database name is needed", id="url-without-database"),
    pytest.param(lambda p, tmp: ["--db-url", f"mysql+pymysql://{p.user}@{p.host}:33o6/{p.database}"],
                 r"--db-url: the port must be a number", id="url-port-not-numeric"),
    pytest.param(lambda p, tmp: ["--db-url", db_url(p, database=p.database + "_nope")],
                 r"cannot connect to .*Unknown database", id="unknown-database"),
    pytest.param(lambda p, tmp: ["--db-url", db_url(p, host="127.0.0.1", port=1)],
                 r"cannot connect to mysql\+pymysql://\S*127\.0\.0\.1:1/.*Can't connect", id="closed-port"),
    pytest.param(lambda p, tmp: ["--nova-conf", str(tmp / "missing.conf")],
                 r"nova\.conf \S*missing\.conf: not found", id="nova-conf-missing"),
    pytest.param(lambda p, tmp: ["--nova-conf", _nova_conf(tmp, f"[DEFAULT]\n[database]\nconnection = {db_url(p)}\n")],
                 r"nova\.conf \S+: no \[api_database\] section", id="nova-conf-without-api-database"),
]


@pytest.mark.parametrize(("where", "message"), REFUSED_LOCATIONS)
def test_unusable_database_location_exits_4(run, demo_db, tmp_path, where, message):
    before = table_hash(demo_db)
    result = run(*where(demo_db, tmp_path), "--run", "--all-keys")
    assert result.code == 4, result.shown
    assert re.search(message, result.err), result.shown
    assert table_hash(demo_db) == before


def test_a_wrong_password_is_refused_and_never_shown(run, demo_db, log_file):
    secret = "wrongpass-5ecr3t"
    # root has no password on the test server, so any password is wrong; otherwise use a user that does not exist.
    user = demo_db.user if not demo_db.password else "nfs_no_such_user"
    before = table_hash(demo_db)
    result = run("--db-url", db_url(demo_db, user=user, password=secret), "--run", "--all-keys")
    assert result.code == 4, result.shown
    assert re.search(r"cannot connect to mysql\+pymysql://\w+:\*\*\*@.*Access denied", result.err), result.shown
    logged = log_file.read_text(encoding="utf-8")
    assert secret not in result.out + result.err + logged
    assert table_hash(demo_db) == before


@pytest.mark.parametrize("spelling", ["--db-ur1={url}", "{url}"], ids=["mistyped-flag", "stray-url"])
def test_a_password_in_an_unknown_argument_is_not_echoed(run, demo_db, spelling):
    secret = "wrongpass-5ecr3t"
    result = run(spelling.format(url=db_url(demo_db, password=secret)), "--all-keys")
    assert result.code == 2, result.shown
    assert "unrecognized arguments" in result.err and ":***@" in result.err
    assert secret not in result.out + result.err


def test_a_database_without_request_specs_is_refused(run, nova_db):
    with connect(nova_db) as conn, conn.cursor() as cur:
        cur.execute("DROP TABLE request_specs")
    flavors_before = table_hash(nova_db, table="flavors", columns="id, flavorid, name")
    result = run("--db-url", db_url(nova_db), "--run", "--all-keys")
    assert result.code == 4, result.shown
    assert re.search(rf"{nova_db.database} is not a nova_api database .*missing table request_specs", result.err)
    with connect(nova_db) as conn, conn.cursor() as cur:
        cur.execute("SHOW TABLES LIKE 'request_specs'")
        assert cur.fetchall() == ()
    assert table_hash(nova_db, table="flavors", columns="id, flavorid, name") == flavors_before


def _sync_with_backup(run, params: DbParams, backup_dir: Path) -> Path:
    """Sync one flavor of ``params`` through the CLI and return the new backup file."""
    before = set(backups_in(backup_dir))
    result = run("--db-url", db_url(params), "--flavor", SMALL_FLAVOR, "--all-keys", "--run")
    assert result.code == 0, result.shown
    [new] = set(backups_in(backup_dir)) - before
    return new


def _reseal(data: bytes) -> bytes:
    """The checksum trailer for ``data`` as backup.py's docstring defines it (sha256 of all before it)."""
    body = data[: data.rindex(b', "checksum": "')]
    return body + b', "checksum": "sha256:' + hashlib.sha256(body).hexdigest().encode() + b'"}\n'


def _edited(path: Path, edit: Callable[[bytes], bytes], *, reseal: bool = False) -> Path:
    data = path.read_bytes()
    assert _reseal(data) == data  # the helper seals exactly as the tool does
    new = edit(data)
    assert new != data
    out = path.with_name("edited_" + path.name)
    out.write_bytes(_reseal(new) if reseal else new)
    return out


def _flip_one_byte(data: bytes) -> bytes:
    at = data.index(b"nova_object.name", data.index(b'"records": [')) + len(b"nova_object.n")
    assert data[at : at + 1] == b"a"
    return data[:at] + b"b" + data[at + 1 :]


# Each builder returns the file to restore into demo_db. demo_db is synced first wherever a
# real backup is involved, so a restore that went ahead despite the damage would write.


def _missing(run, demo, other, bdir, tmp):
    return tmp / "no-such-backup.json"


def _unreadable(run, demo, other, bdir, tmp):
    # We run as root, who reads any mode; a path through a regular file fails for root too.
    (tmp / "not-a-dir").write_text("x")
    return tmp / "not-a-dir" / "request_specs_20260101_000000.json"


def _truncated(run, demo, other, bdir, tmp):
    return _edited(_sync_with_backup(run, demo, bdir), lambda data: data[: len(data) // 2])


def _one_byte_flipped(run, demo, other, bdir, tmp):
    return _edited(_sync_with_backup(run, demo, bdir), _flip_one_byte)


def _spec_edited_and_resealed(run, demo, other, bdir, tmp):
    return _edited(_sync_with_backup(run, demo, bdir), _flip_one_byte, reseal=True)


def _format_version_3(run, demo, other, bdir, tmp):
    def bump(data: bytes) -> bytes:
        return data.replace(b'"format_version": 2,', b'"format_version": 3,', 1)

    return _edited(_sync_with_backup(run, demo, bdir), bump, reseal=True)


def _from_the_other_database(run, demo, other, bdir, tmp):
    # Same data, same plan: the foreign records match demo_db byte for byte, so only the
    # database check stands between this file and a write.
    _sync_with_backup(run, demo, bdir)
    return _sync_with_backup(run, other, bdir)


BAD_BACKUPS = [
    pytest.param(_missing, r"backup \S+no-such-backup\.json does not exist", id="missing-file"),
    pytest.param(_unreadable, r"cannot read backup \S+: Not a directory", id="unreadable"),
    pytest.param(_truncated, r"backup \S+ is damaged or truncated", id="truncated"),
    pytest.param(_one_byte_flipped, r"backup \S+ fails its checksum", id="one-byte-flipped"),
    pytest.param(_spec_edited_and_resealed, r"backup \S+: record 0 \(id \d+\) does not match its sha256",
                 id="spec-edited-and-resealed"),
    pytest.param(_format_version_3, r"backup \S+ has format version 3; this tool reads versions 1 and 2",
                 id="unknown-format-version"),
    pytest.param(_from_the_other_database, r"backup \S+ is of schema 'nfs_test_\w+', this is 'nfs_test_\w+'",
                 id="foreign-database"),
]


@pytest.mark.parametrize(("make_backup", "message"), BAD_BACKUPS)
def test_restore_of_a_bad_backup_exits_4_and_writes_nothing(
    run, demo_db, other_demo_db, backup_dir, tmp_path, make_backup, message
):
    path = make_backup(run, demo_db, other_demo_db, backup_dir, tmp_path)
    before, other_before = table_hash(demo_db), table_hash(other_demo_db)
    result = run("--db-url", db_url(demo_db), "--restore", path, "--run")
    assert result.code == 4, result.shown
    assert re.search(message, result.err), result.shown
    assert "Restored=" not in result.out
    assert table_hash(demo_db) == before
    assert table_hash(other_demo_db) == other_before


def _public_dir(tmp: Path) -> Path:
    path = tmp / "public-backups"
    path.mkdir()
    path.chmod(0o755)
    return path


def _under_a_regular_file(tmp: Path) -> Path:
    (tmp / "a-file").write_text("not a directory\n")
    return tmp / "a-file" / "logs" / "nova-flavor-sync.log"


REFUSED_LOCAL_FILES = [
    pytest.param(lambda tmp: ["--backup-dir", _public_dir(tmp)],
                 r"backup directory \S+public-backups can be read by others \(mode 0755\)", id="backup-dir-0755"),
    pytest.param(lambda tmp: ["--log-file", _under_a_regular_file(tmp)],
                 r"cannot write the log file \S+a-file/logs/nova-flavor-sync\.log", id="log-dir-cannot-be-created"),
]


@pytest.mark.parametrize(("option", "message"), REFUSED_LOCAL_FILES)
def test_unusable_backup_dir_or_log_file_exits_4_before_writing(run, demo_db, tmp_path, backup_dir, option, message):
    before = table_hash(demo_db)
    result = run("--db-url", db_url(demo_db), *option(tmp_path), "--run", "--all-keys")
    assert result.code == 4, result.shown
    assert re.search(message, result.err), result.shown
    assert table_hash(demo_db) == before
    assert backups_in(backup_dir) == backups_in(tmp_path / "public-backups") == []


# -- 5. where the database comes from ---------------------------------------------------------


def test_nova_api_db_url_is_used_when_no_flag_is_given(run, demo_db, log_file, monkeypatch):
    monkeypatch.setenv("NOVA_API_DB_URL", db_url(demo_db))
    result = run("--all-keys")
    assert result.code == 3, result.shown
    assert summary_updated(result.out) > 0
    assert re.search(rf"Database \S+/{demo_db.database} \(from NOVA_API_DB_URL\)$", log_file.read_text(), re.M)


def test_nova_conf_api_database_connection_is_used(run, demo_db, tmp_path, log_file):
    text = f"[database]\nconnection = mysql://cell/db\n[api_database]\nconnection = {db_url(demo_db)}\n"
    conf = _nova_conf(tmp_path, text)
    result = run("--nova-conf", conf, "--all-keys")
    assert result.code == 3, result.shown
    assert summary_updated(result.out) > 0
    assert re.search(rf"Database \S+/{demo_db.database} \(from \S+nova\.conf \[api_database\] connection\)$",
                     log_file.read_text(), re.M)


def test_no_database_anywhere_exits_4_naming_the_three_ways(run, tmp_path, monkeypatch):
    monkeypatch.setattr(dburl, "DEFAULT_NOVA_CONF", str(tmp_path / "etc-nova" / "nova.conf"))
    result = run("--all-keys")
    assert result.code == 4, result.shown
    assert re.search(r"no database given and \S+nova\.conf does not exist", result.err), result.shown
    for way in ("--db-url", "--nova-conf", "NOVA_API_DB_URL"):
        assert way in result.err


# -- 6. rows the tool cannot read ------------------------------------------------------------


def test_a_malformed_row_is_reported_left_alone_and_does_not_stop_the_run(run, demo_db):
    url = db_url(demo_db)
    bad_uuid = str(uuid.uuid4())
    with connect(demo_db) as conn, conn.cursor() as cur:
        cur.execute("SELECT spec FROM request_specs ORDER BY id LIMIT 1")
        (spec,) = cur.fetchone()
        cur.execute(
            "INSERT INTO request_specs (created_at, instance_uuid, spec) VALUES (NOW(), %s, %s)",
            (bad_uuid, spec[: len(spec) // 2]),
        )
        bad_id = cur.lastrowid
    map_instances(demo_db, [bad_uuid])

    def bad_row():
        with connect(demo_db) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT instance_uuid, spec, created_at, updated_at FROM request_specs WHERE id = %s", (bad_id,)
            )
            return cur.fetchone()

    bad_before = bad_row()
    before = table_hash(demo_db)

    dry = run("--db-url", url, "--all-keys")
    assert dry.code == 3, dry.shown  # changes pending wins over row errors in a dry run
    assert re.search(rf"\] Error: row {bad_id} \({bad_uuid}\): spec is not valid JSON", dry.out), dry.shown
    assert "Errors=1" in dry.out
    assert table_hash(demo_db) == before

    applied = run("--db-url", url, "--all-keys", "--run")
    assert applied.code == 5, applied.shown
    assert f"Error: row {bad_id} " in applied.out
    assert "Verify: 0 flavor copies still out of sync in scope" in applied.out
    assert bad_row() == bad_before

    again = run("--db-url", url, "--all-keys")
    assert again.code == 5, again.shown  # nothing left to change, but one row is still unreadable
    assert re.search(r"\] Read 1501 request specs: 0 to update, .* 1 errors", again.out), again.shown


# -- 7. unexpected errors --------------------------------------------------------------------


def _boom(*args, **kwargs):
    raise RuntimeError("boom: a bug inside the run")


def test_an_unexpected_error_exits_1_and_logs_the_trace(run, demo_db, log_file, monkeypatch):
    monkeypatch.setattr(service, "make_plan", _boom)
    before = table_hash(demo_db)
    result = run("--db-url", db_url(demo_db), "--all-keys", "--run")
    assert result.code == 1, result.shown
    assert re.search(rf"\[ERROR\] Unexpected error, see {re.escape(str(log_file))}", result.err), result.shown
    assert "Traceback" not in result.out + result.err
    logged = log_file.read_text(encoding="utf-8")
    assert "Traceback (most recent call last):" in logged
    assert "RuntimeError: boom: a bug inside the run" in logged
    assert table_hash(demo_db) == before


def test_with_debug_an_unexpected_error_propagates(run, demo_db, monkeypatch):
    monkeypatch.setattr(service, "make_plan", _boom)
    with pytest.raises(RuntimeError, match="boom"):
        run("--db-url", db_url(demo_db), "--all-keys", "--debug")


# -- 8. gentle on a shared database ----------------------------------------------------------


def test_pacing_options_are_used_and_said(run, demo_db):
    url = db_url(demo_db)
    tuned = run("--db-url", url, "--run", "--all-keys", "--batch-seconds", "0.2", "--pause", "0.05",
                "--max-threads-running", "1000", "--max-load-wait", "5", "--no-flow-control-pause")
    assert tuned.code == 0, tuned.shown
    assert "Pacing: batches sized to take 0.2 s (50-5000 rows, starting at 500), pause 0.05 s between batches; " \
           "waiting while Threads_running > 1000 (at most 5 s)" in messages(tuned.out), tuned.shown
    for where in (r"cell1 \([0-9a-f-]{36}\)", r"cell2 \([0-9a-f-]{36}\)", "nova_api"):  # a pacer per database
        assert re.search(rf"^Paced {where}: \d+ batches of \d+-\d+ rows, \d+\.\d s paused, 0\.0 s waited for the "
                         "server$", tuned.out.replace("] [INFO] ", "\n"), re.M), tuned.shown


def test_batch_size_alone_keeps_the_size_fixed_and_the_default_tunes_it(run, demo_db):
    dry = run("--db-url", db_url(demo_db), "--all-keys", "--batch-size", "100")
    assert dry.code == 3, dry.shown
    assert "Pacing:" not in dry.out  # a dry run writes nothing, so it paces nothing
    command = shlex.split(messages(dry.out)[-1].strip())
    fixed = run(*command[1:])
    assert fixed.code == 0, fixed.shown
    assert "Pacing: batches of 100 rows, pause 0 s between batches; waiting while Threads_running > 25, " \
           "Galera flow control (at most 600 s)" in messages(fixed.out)
    assert re.search(r"Paced nova_api: \d+ batches of \d+-100 rows", fixed.out), fixed.shown


def test_a_replica_url_that_is_no_replica_exits_4_before_anything_is_written(run, demo_db, backup_dir):
    before = table_hash(demo_db)
    refused = run("--db-url", db_url(demo_db), "--run", "--all-keys", "--replica-db-url", db_url(demo_db))
    assert refused.code == 4, refused.shown
    assert re.search(r"\[ERROR\] mysql\+pymysql://root@127\.0\.0\.1:\d+/nfs_test_\w+ is not a replica "
                     r"\(SHOW REPLICA STATUS is empty\)", refused.err), refused.shown
    assert table_hash(demo_db) == before and backups_in(backup_dir) == []

    away = run("--db-url", db_url(demo_db), "--run", "--all-keys", "--replica-db-url",
               db_url(demo_db, password="pw-of-the-replica", port=1))
    assert away.code == 4, away.shown
    assert "cannot connect to replica mysql+pymysql://root:***@127.0.0.1:1/" in away.err, away.shown
    assert "pw-of-the-replica" not in away.out + away.err
    assert table_hash(demo_db) == before and backups_in(backup_dir) == []


def test_a_password_in_a_replica_url_is_never_shown(run, demo_db, secret_account, log_file):
    _, url = secret_account
    bad = run("--db-url", db_url(demo_db), "--replica-db-url", url.replace("mysql+pymysql", "postgres"))
    assert bad.code == 2, bad.shown
    refused = run("--db-url", db_url(demo_db), "--run", "--all-keys", "--replica-db-url", url)
    assert refused.code == 4, refused.shown  # this account may not even read the replication status
    assert re.search(r"\[ERROR\] cannot read the replication status of mysql\+pymysql://nfs_\w+:\*\*\*@.*"
                     r"\(1227\) Access denied.* \(the user needs the REPLICA MONITOR privilege", refused.err), \
        refused.shown
    for text, where in ((bad.out + bad.err, "usage error"), (refused.out + refused.err, "output"),
                        (log_file.read_text(encoding="utf-8"), "log file")):
        assert_no_secret(text, where)
    command = cli._command_line(["--replica-db-url", url, f"--replica-db-url={url}", "--db-url", url], "--run")
    assert_no_secret(command, "printed command")
    assert command.count(":***@") == 3 and SECRET not in command


@pytest.mark.serial  # its limit is Threads_running + 2: another test process's load moves it
def test_a_server_busy_for_longer_than_max_load_wait_exits_5_with_nothing_written(run, demo_db, backup_dir):
    before = table_hash(demo_db)
    limit = threads_running(demo_db) + 2
    with busy_sessions(demo_db, 5, 30):
        busy = run("--db-url", db_url(demo_db), "--run", "--all-keys", "--max-threads-running", limit,
                   "--max-load-wait", "1")
    assert busy.code == 5, busy.shown
    assert re.search(rf"\[ERROR\] the server stayed busy for 1 s, longer than the 1 s allowed \(Threads_running is "
                     rf"\d+ \(limit {limit}\)\)\. Stopped before the batch of rows \d+-\d+: every batch before it "
                     r"is written in full \(0 rows written\), this one and the rest not at all: run again when the "
                     r"server is less busy", busy.err), busy.shown
    assert "Waiting before the next batch: Threads_running is" in busy.out
    assert table_hash(demo_db) == before
    assert len(backups_in(backup_dir)) == 1  # the backup comes first, as for any run


# -- 7. cells --------------------------------------------------------------------------------


def test_every_cell_is_found_and_both_copies_are_reported_per_cell(run, demo_db):
    dry = run("--db-url", db_url(demo_db), "--all-keys")
    assert dry.code == 3, dry.shown
    shown = messages(dry.out)
    assert "Read 1500 request specs: 726 to update, 512 in sync, 0 with only risky changes (held back), " \
           "60 orphans, 202 left alone, 0 errors" in shown, dry.shown
    assert any(line.startswith("Instance copies in cell1 (835ce9b0-6a5b-5709-b701-5eb36f22fdca): read 884, "
                               "409 to update") for line in shown), dry.shown
    assert any(line.startswith("Instance copies in cell2 (ada1b992-1bb5-5458-b47a-3407ad251e9e): read 576, "
                               "317 to update") for line in shown), dry.shown
    assert "Cell cell0 (00000000-0000-0000-0000-000000000000): 30 instances that never scheduled; counted, " \
           "never written" in shown
    left_alone = next(line for line in shown if line.startswith("  left alone in nova_api: "))
    for reason in ("instance is queued for delete=56", "instance has no cell yet (still being built)=10",
                   "instance never scheduled (in cell0)=30", "task_state resize_prep)=17"):
        assert reason in left_alone, left_alone


def test_both_copies_of_busy_and_deleted_instances_are_never_written(run, demo_db):
    with connect(demo_db) as conn, conn.cursor() as cur:
        cur.execute("SELECT name, database_connection FROM cell_mappings WHERE name = 'cell1'")
        cell1 = dburl.parse_db_url(cur.fetchone()[1])
    with connect(cell1) as conn, conn.cursor() as cur:
        cur.execute("SELECT uuid FROM instances WHERE deleted = 0 AND (vm_state = 'resized' OR task_state IS NOT NULL)")
        busy = [uuid for (uuid,) in cur.fetchall()]
        cur.execute("SELECT uuid FROM instances WHERE deleted != 0")
        deleted = [uuid for (uuid,) in cur.fetchall()]
    assert len(busy) == 71 and deleted

    def both_copies():
        uuids = (tuple(busy + deleted),)
        with connect(demo_db) as conn, conn.cursor() as cur:
            cur.execute("SELECT id, spec, updated_at FROM request_specs WHERE instance_uuid IN %s", uuids)
            specs = cur.fetchall()
        with connect(cell1) as conn, conn.cursor() as cur:
            cur.execute("SELECT id, flavor, updated_at FROM instance_extra WHERE instance_uuid IN %s", uuids)
            return specs, cur.fetchall()

    before = both_copies()
    applied = run("--db-url", db_url(demo_db), "--all-keys", "--run")
    assert applied.code == 0, applied.shown
    assert both_copies() == before  # byte for byte, updated_at too


def test_a_cell_that_cannot_be_reached_stops_the_run_before_anything_is_written(run, demo_db, backup_dir):
    with connect(demo_db) as conn, conn.cursor() as cur:
        cur.execute("UPDATE cell_mappings SET database_connection = "
                    "REPLACE(database_connection, '127.0.0.1:', '127.0.0.1:1') WHERE name = 'cell1'")
    before = copies_hash(demo_db)
    result = run("--db-url", db_url(demo_db), "--all-keys", "--run")
    assert result.code == 4, result.shown
    assert re.search(r"\[ERROR\] cell cell1 \(835ce9b0-6a5b-5709-b701-5eb36f22fdca\): cannot connect to "
                     r"mysql\+pymysql://", result.err), result.shown
    assert copies_hash(demo_db) == before and backups_in(backup_dir) == []  # neither copy, in no cell


def test_a_template_cell_needs_database_connection_or_its_own_url(demo_db, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NOVA_DATABASE_CONNECTION")
    base = ["--log-file", str(tmp_path / "log"), "--backup-dir", str(tmp_path / "b"), "--db-url", db_url(demo_db)]
    assert cli.main(base) == 4
    assert re.search(r"cell cell2 \(ada1b992-1bb5-5458-b47a-3407ad251e9e\) database_connection is a template "
                     r".* give --nova-conf, or --cell-db-url cell2=URL", capsys.readouterr().err)

    cell2 = db_url(demo_db, database=f"{demo_db.database}_cell2")
    assert cli.main([*base, "--cell-db-url", f"cell2={cell2}"]) == 3  # a dry run with changes pending
    capsys.readouterr()

    # What a Nova service's nova.conf holds. "user:@host" is an empty password; "user@host" would
    # fill the template with the password "None", as Nova fills it (dburl.format_cell_db_url).
    auth = f"{demo_db.user}:{quote(demo_db.password or '', safe='')}"
    conf = tmp_path / "nova.conf"
    conf.write_text(f"[api_database]\nconnection = {db_url(demo_db)}\n"
                    f"[database]\nconnection = mysql+pymysql://{auth}@{demo_db.host}:{demo_db.port}/nova\n")
    assert cli.main(base[:4] + ["--nova-conf", str(conf)]) == 3
    capsys.readouterr()
    monkeypatch.setenv("NOVA_DATABASE_CONNECTION", f"mysql+pymysql://{auth}@{demo_db.host}:{demo_db.port}/nova")
    assert cli.main(base) == 3
