"""The old command, ``nova-fix-flavors.py``: every step of its runbook, against the real MariaDB.

The old tool's README documented these invocations (its runbook); each one runs here as an
operator runs it: nothing but the old flags, the database found in a nova.conf's
``[api_database] connection`` (``$NOVA_CONF`` standing in for /etc/nova/nova.conf, whose path
``dburl.DEFAULT_NOVA_CONF`` the default-path test moves) or in ``$NOVA_API_DB_URL``, and the
backups and the log in their default places under a temporary ``$HOME``. Each step checks the
old tool's lines, the exit code, and what is in both flavor copies afterwards
(``copies_hash``, ``stale_copies``).

The single-file build (``make legacy-script``) and the console script of the package are run
too, as separate processes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

import pytest

from dbtools import SECRET, assert_no_secret, copies_hash, nova_database_connection, stale_copies
from nova_flavor_sync import cli, dburl, legacy_cli
from nova_flavor_sync.dburl import DbParams

pytestmark = pytest.mark.db

ROOT = Path(__file__).resolve().parents[2]
PROG = "nova-fix-flavors.py"
CELL1 = "cell1 (835ce9b0-6a5b-5709-b701-5eb36f22fdca)"
CELL2 = "cell2 (ada1b992-1bb5-5458-b47a-3407ad251e9e)"
# The demo cloud: its flavors, and the flavor copies read (RequestSpecs, instance copies per cell).
FLAVORS = 22
FOUND = {"request specs": 1500, f"instance copies in {CELL1}": 884, f"instance copies in {CELL2}": 576}


class Result(NamedTuple):
    code: int
    out: str
    err: str

    @property
    def shown(self) -> str:
        return f"--- exit {self.code}\n--- stdout:\n{self.out}\n--- stderr:\n{self.err}"

    @property
    def said(self) -> list[str]:
        """stdout's lines without their ``[time] [LEVEL] `` prefix."""
        return messages(self.out)


def messages(text: str) -> list[str]:
    return [re.sub(r"^\[[^\]]*\] \[[A-Z]+\] ", "", line) for line in text.splitlines()]


def db_url(params: DbParams) -> str:
    auth = f"{params.user}:{params.password}@" if params.password else f"{params.user}@"
    return f"mysql+pymysql://{auth}{params.host}:{params.port}/{params.database}"


def summary(result: Result) -> tuple[int, int, int]:
    found = re.findall(r"^Summary: Updated=(\d+), Skipped=(\d+), Errors=(\d+)$", "\n".join(result.said), re.M)
    assert len(found) == 1, result.shown
    return tuple(int(n) for n in found[0])


def in_order(lines: list[str], of: list[str]) -> bool:
    remaining = iter(of)
    return all(line in remaining for line in lines)


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary $HOME (root's would be /root): the old tool's files go under it."""
    home = tmp_path / "root"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(legacy_cli.NOVA_CONF_ENV, raising=False)
    monkeypatch.delenv(dburl.ENV_VAR, raising=False)
    return home


@pytest.fixture
def fixes(home: Path) -> Path:
    """~/.nova-flavor-fixes: the old tool's place for its backups and its log."""
    return home / ".nova-flavor-fixes"


def write_nova_conf(path: Path, params: DbParams) -> Path:
    """A controller's nova.conf: the API database, and [database] for the cell URL templates."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"[DEFAULT]\ndebug = false\n\n[api_database]\nconnection = {db_url(params)}\n\n"
                    f"[database]\nconnection = {nova_database_connection(params)}\n", encoding="utf-8")
    return path


@pytest.fixture
def nova_conf(demo_db: DbParams, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$NOVA_CONF names the controller's nova.conf; cell2's template is filled from its [database]."""
    monkeypatch.delenv("NOVA_DATABASE_CONNECTION", raising=False)
    path = write_nova_conf(tmp_path / "etc" / "nova" / "nova.conf", demo_db)
    monkeypatch.setenv(legacy_cli.NOVA_CONF_ENV, str(path))
    return path


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """``run(*old_flags)``: the old command in-process; argparse's exits give their code."""

    def run(*args: object) -> Result:
        capsys.readouterr()
        try:
            code = legacy_cli.main([str(arg) for arg in args])
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def banner(mode: str) -> list[str]:
    return ["=== Starting Flavor Sync ===", f"Mode: {mode}"]


def found_lines() -> list[str]:
    return [f"Loaded {FLAVORS} active flavors", *(f"Found {n} {what}" for what, n in FOUND.items())]


# -- the runbook ------------------------------------------------------------------------------


def test_the_old_runbook(run, demo_db, nova_conf, fixes):
    """Dry run, --verbose, --verify, --run --verbose, --verify, --list-backups, --restore, --restore --run."""
    before = copies_hash(demo_db)
    before_copies = copies_hash(demo_db, copies_only=True)
    stale = stale_copies(demo_db, all_keys=False)  # the default key policy: placement keys held back
    assert stale > 0
    connecting = f"Connecting to database: {demo_db.database}@{demo_db.host}:{demo_db.port} " \
                 f"(from {nova_conf} [api_database] connection)"
    stdout_seen: list[str] = []

    # 1. Dry run (the default): what would change; nothing written.
    dry = run()
    assert dry.code == 3, dry.shown
    stdout_seen += dry.out.splitlines()
    assert in_order([*banner("DRY RUN"), connecting, *found_lines(), "=== Sync Complete ==="], dry.said), dry.shown
    updated, skipped, errors = summary(dry)
    assert (updated, errors) == (stale, 0)
    assert updated + skipped + errors == sum(FOUND.values())  # every copy read is counted once
    assert dry.said[-4:-2] == [f"Summary: Updated={updated}, Skipped={skipped}, Errors=0",
                               "DRY RUN: nothing was written."], dry.shown
    assert dry.said[-2] == f">>> To apply changes, run: {PROG} --run"
    exact = re.fullmatch(r">>> Or, refused unless the plan is still exactly this one: (.*)", dry.said[-1])
    digest = re.search(r"^Plan digest: ([0-9a-f]{64})$", "\n".join(dry.said), re.M)[1]
    assert shlex.split(exact[1]) == ["nova-flavor-sync", "--nova-conf", str(nova_conf), "--run",
                                     "--plan-digest", digest], dry.shown
    assert "Mismatch:" not in dry.out and not dry.err
    assert copies_hash(demo_db) == before

    # 2. --verbose: each instance's changes, in both copies.
    verbose = run("--verbose")
    assert verbose.code == 3, verbose.shown
    stdout_seen += verbose.out.splitlines()
    assert len(re.findall(r"^Mismatch: [0-9a-f-]{36} \(Flavor: [^)]+\)$", "\n".join(verbose.said), re.M)) == stale
    assert sum(line.startswith("Changes: {") for line in verbose.said) == stale
    assert summary(verbose) == (updated, skipped, 0)
    assert verbose.said[-2] == f">>> To apply changes, run: {PROG} --verbose --run"
    assert copies_hash(demo_db) == before

    # 3. --verify: minimal output, exit 3 while there is drift.
    verify = run("--verify")
    assert verify.code == 3, verify.shown
    stdout_seen += verify.out.splitlines()
    assert in_order([*banner("VERIFY ONLY"), connecting, *found_lines()], verify.said), verify.shown
    assert summary(verify) == (updated, skipped, 0)
    assert not any(line.startswith(("Mismatch:", "Orphan:", "Left alone:")) for line in verify.said)
    assert verify.said[-2] == f">>> To apply changes, run: {PROG} --run"
    assert copies_hash(demo_db) == before

    # 4. --run --verbose: back up, write both copies (cells first), verify.
    applied = run("--run", "--verbose")
    assert applied.code == 0, applied.shown
    stdout_seen += applied.out.splitlines()
    assert in_order([*banner("LIVE MODE"), connecting, *found_lines(),
                     "Writing the instance copies in each cell first, then the RequestSpecs",
                     "Verify: 0 flavor copies still out of sync in scope", "=== Sync Complete ===",
                     f"Summary: Updated={stale}, Skipped={skipped}, Errors=0"], applied.said), applied.shown
    [backup] = sorted((fixes / "backups").glob("flavor_copies_*.json"))
    assert applied.said[-1] == f">>> Backup available at: {backup}"
    assert any(line.startswith(f"Backup written: {backup} ({stale} records: nova_api=") for line in applied.said)
    assert stat.S_IMODE((fixes / "backups").stat().st_mode) == 0o700
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert stale_copies(demo_db, all_keys=False) == 0
    synced = copies_hash(demo_db)

    # 5. --verify after the run: in sync, exit 0.
    verify_after = run("--verify")
    assert verify_after.code == 0, verify_after.shown
    stdout_seen += verify_after.out.splitlines()
    assert summary(verify_after) == (0, sum(FOUND.values()), 0)
    assert verify_after.said[-1].startswith("Summary: Updated=0, ")

    # 6. A dry run again: nothing to change.
    again = run()
    assert again.code == 0, again.shown
    assert again.said[-2:] == [f"Summary: Updated=0, Skipped={sum(FOUND.values())}, Errors=0",
                               "DRY RUN: nothing to change."]
    assert copies_hash(demo_db) == synced

    # 7. --list-backups
    listed = run("--list-backups")
    assert listed.code == 0, listed.shown
    stdout_seen += listed.out.splitlines()
    assert listed.said[:2] == ["=== Available Backups ===", f"Backups in {fixes / 'backups'}:"]
    assert re.match(rf"{re.escape(backup.name)}  records={stale}  .*plan={digest[:12]}  \(nova_api=\d+  "
                    rf"{re.escape(CELL1)}=\d+  {re.escape(CELL2)}=\d+\)$", listed.said[2]), listed.shown

    # 8. --restore FILE: a dry run of the restore.
    restore_dry = run("--restore", backup)
    assert restore_dry.code == 3, restore_dry.shown
    stdout_seen += restore_dry.out.splitlines()
    assert restore_dry.said[:4] == ["=== Starting Restore from Backup ===", "Mode: DRY RUN", f"Backup file: {backup}",
                                    connecting], restore_dry.shown
    assert restore_dry.said[-4:] == ["=== Restore Complete ===", f"Summary: Would restore={stale}, Skipped=0, Errors=0",
                                     "DRY RUN: nothing was written.",
                                     f">>> To apply restore, run: {PROG} --restore {backup} --run"]
    assert copies_hash(demo_db) == synced

    # 9. --restore FILE --run: both copies back, byte for byte (FILE as an operator may quote it).
    restored = run("--restore", f"~/{backup.relative_to(Path.home())}", "--run")
    assert restored.code == 0, restored.shown
    stdout_seen += restored.out.splitlines()
    assert restored.said[:2] == ["=== Starting Restore from Backup ===", "Mode: LIVE MODE"]
    assert restored.said[-2:] == ["=== Restore Complete ===", f"Summary: Restored={stale}, Skipped=0, Errors=0"]
    assert copies_hash(demo_db, copies_only=True) == before_copies

    # The log, in the old tool's place: every stdout line, in order; private.
    log_file = fixes / "nova-flavor-sync.log"
    assert in_order(stdout_seen, log_file.read_text(encoding="utf-8").splitlines())
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600


def test_run_with_no_backup_writes_and_says_there_is_no_backup(run, demo_db, nova_conf, fixes):
    stale = stale_copies(demo_db, all_keys=False)
    applied = run("--run", "--no-backup")
    assert applied.code == 0, applied.shown
    warning = "Backup: NONE (--no-backup): nothing this run writes can be put back with --restore"
    assert applied.said[:3] == [*banner("LIVE MODE"), warning], applied.shown
    assert f"[WARNING] {warning}" in applied.out
    assert "--no-backup: writing without a backup file" in applied.said
    assert summary(applied)[0] == stale
    assert applied.said[-1] == ">>> No backup was written (--no-backup): --restore cannot undo this run"
    assert "Backup written" not in applied.out
    assert not list((fixes / "backups").glob("*"))
    assert stale_copies(demo_db, all_keys=False) == 0


# -- where the database comes from --------------------------------------------------------------


def test_nova_api_db_url_and_the_exact_plan_command_of_nova_flavor_sync(run, demo_db, capsys, monkeypatch):
    monkeypatch.setenv("NOVA_API_DB_URL", db_url(demo_db))
    dry = run()
    assert dry.code == 3, dry.shown
    assert f"Connecting to database: {demo_db.database}@{demo_db.host}:{demo_db.port} (from NOVA_API_DB_URL)" \
        in dry.said
    command = shlex.split(dry.said[-1].split(": ", 1)[1])
    assert command[:2] == ["nova-flavor-sync", "--run"] and command[2] == "--plan-digest", dry.shown

    # The printed nova-flavor-sync command applies exactly that plan: the same engine, the same defaults.
    capsys.readouterr()
    assert cli.main(command[1:]) == 0, capsys.readouterr()
    assert stale_copies(demo_db, all_keys=False) == 0
    assert len(list((Path.home() / ".nova-flavor-fixes" / "backups").glob("flavor_copies_*.json"))) == 1


def test_etc_nova_nova_conf_by_default(run, demo_db, tmp_path, monkeypatch):
    monkeypatch.delenv("NOVA_DATABASE_CONNECTION", raising=False)
    default = tmp_path / "etc" / "nova" / "nova.conf"
    monkeypatch.setattr(dburl, "DEFAULT_NOVA_CONF", str(default))
    before = copies_hash(demo_db)

    missing = run("--run")
    assert missing.code == 4, missing.shown
    assert re.search(rf"\[ERROR\] nova\.conf {re.escape(str(default))}: not found$", missing.err, re.M), missing.shown

    write_nova_conf(default, demo_db)
    verify = run("--verify")
    assert verify.code == 3, verify.shown
    assert f"Connecting to database: {demo_db.database}@{demo_db.host}:{demo_db.port} " \
           f"(from {default} [api_database] connection)" in verify.said
    assert summary(verify)[0] == stale_copies(demo_db, all_keys=False)
    assert copies_hash(demo_db) == before


def test_no_password_anywhere(run, secret_account, demo_db, home, tmp_path, monkeypatch):
    """A nova.conf or $NOVA_API_DB_URL with a password: not in stdout, stderr, the log or a backup."""
    user, url = secret_account
    monkeypatch.setenv(legacy_cli.NOVA_CONF_ENV, str(write_nova_conf(tmp_path / "nova.conf", demo_db)))
    conf = tmp_path / "nova.conf"
    conf.write_text(conf.read_text().replace(db_url(demo_db), url), encoding="utf-8")
    results = [run("--verbose"), run("--run", "--verbose"), run("--verify"), run("--list-backups")]
    [backup] = (home / ".nova-flavor-fixes" / "backups").glob("flavor_copies_*.json")
    results.append(run("--restore", backup))
    monkeypatch.delenv(legacy_cli.NOVA_CONF_ENV)
    monkeypatch.setenv("NOVA_API_DB_URL", url)
    results += [run("--restore", backup, "--run"), run("--run", f"--db-url={url}")]
    assert [result.code for result in results] == [3, 0, 0, 0, 3, 0, 2], [result.shown for result in results]
    for result in results:
        assert_no_secret(result.out, "stdout")
        assert_no_secret(result.err, "stderr")
    for path in home.rglob("*"):
        if path.is_file():
            assert_no_secret(path.read_text(encoding="utf-8", errors="replace"), str(path))
    assert any(user in line for line in results[0].said)  # the search above looked at real output


# -- bad input: exit 2, a clear message, nothing opened or written ------------------------------

# (id, old flags, regex on stderr); {tmp} is the test's tmp_path.
USAGE_ERRORS = [
    ("unknown-flag", ["--frobnicate", "--run"], r"unrecognized arguments: --frobnicate"),
    ("new-flag-all-keys", ["--all-keys", "--run"], r"unrecognized arguments: --all-keys"),
    ("new-flag-db-url", ["--run", "--db-url", "mysql://nova:{secret}@db/nova_api"],
     r"unrecognized arguments: --db-url mysql://nova:\*\*\*@db/nova_api"),
    ("verify-run", ["--verify", "--run"], r"--run cannot be used with --verify or --list-backups"),
    ("list-backups-run", ["--list-backups", "--run"], r"--run cannot be used with --verify or --list-backups"),
    ("verify-restore", ["--verify", "--restore", "{backup}"],
     r"use only one of --verify, --restore and --list-backups"),
    ("restore-missing", ["--restore", "{tmp}/no-such-backup.json", "--run"],
     r"argument --restore: no such backup file: \S+/no-such-backup\.json"),
    ("restore-directory", ["--restore", "{tmp}", "--run"], r"argument --restore: not a backup file: "),
    ("restore-without-file", ["--run", "--restore"], r"argument --restore: expected one argument"),
    ("run-with-value", ["--run=yes"], r"argument --run: ignored explicit argument 'yes'"),
]


def test_bad_usage_exits_2_and_changes_nothing(run, demo_db, nova_conf, fixes, tmp_path):
    before = copies_hash(demo_db)
    backup = tmp_path / "flavor_copies_20260106_143210.json"
    backup.write_text("{}", encoding="utf-8")
    for case, args, message in USAGE_ERRORS:
        argv = [arg.format(tmp=tmp_path, backup=backup, secret=quote(SECRET, safe="")) for arg in args]
        result = run(*argv)
        assert result.code == 2, (case, result.shown)
        assert re.search(rf"^{re.escape(PROG)}: error: .*{message}", result.err, re.M), (case, result.shown)
        assert result.err.startswith(f"usage: {PROG} "), (case, result.shown)
        assert not result.out, (case, result.shown)
        assert_no_secret(result.err, case)
    assert copies_hash(demo_db) == before
    assert not fixes.exists()  # not even the log was opened


def test_nova_conf_and_nova_api_db_url_together_are_refused(run, demo_db, nova_conf, fixes, monkeypatch):
    before = copies_hash(demo_db)
    monkeypatch.setenv("NOVA_API_DB_URL", db_url(demo_db))
    result = run("--run")
    assert result.code == 2, result.shown
    assert f"{PROG}: error: $NOVA_API_DB_URL and $NOVA_CONF are both set: unset the one not meant" in result.err
    assert copies_hash(demo_db) == before
    assert not fixes.exists()


# -- what the old tool left behind ----------------------------------------------------------


def test_the_old_tools_backups_and_backup_directory(run, demo_db, nova_conf, fixes):
    """The old tool made ~/.nova-flavor-fixes/backups with the umask (0755) and wrote whole-table
    request_specs_*.json there: listed for what they are, never restored; the directory is
    refused for a new backup until it is private."""
    backups = fixes / "backups"
    backups.mkdir(parents=True, mode=0o755)
    backups.chmod(0o755)
    old = backups / "request_specs_20260105_143210.json"
    old.write_text(json.dumps({"timestamp": "20260105_143210", "count": 1,
                               "specs": [{"id": 1, "instance_uuid": "47819a47-cd10-4dea-b6a3-31e339db3048",
                                          "spec": "{}"}]}, indent=2), encoding="utf-8")
    before = copies_hash(demo_db)

    listed = run("--list-backups")
    assert listed.code == 0, listed.shown
    assert listed.said[2] == (f"{old.name}  UNREADABLE: {old.name}: written by the old nova-fix-flavors.py "
                              "(no checksum, no record of its database): this tool cannot check it and does not "
                              "restore it; restore its specs by hand if you must"), listed.shown

    restore = run("--restore", old, "--run")
    assert restore.code == 4, restore.shown
    assert re.search(r"\[ERROR\] backup \S+request_specs_20260105_143210\.json was written by the old "
                     r"nova-fix-flavors\.py", restore.err), restore.shown

    refused = run("--run")
    assert refused.code == 4, refused.shown
    assert re.search(r"\[ERROR\] backup directory \S+ can be read by others \(mode 0755\)", refused.err), refused.shown
    assert copies_hash(demo_db) == before

    backups.chmod(0o700)
    applied = run("--run")
    assert applied.code == 0, applied.shown
    assert stale_copies(demo_db, all_keys=False) == 0


# -- shipped as one file, and installed with the package ---------------------------------------


@pytest.fixture(scope="module")
def legacy_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``make legacy-script``'s file, built into a temporary directory with the same script."""
    output = tmp_path_factory.mktemp("dist") / PROG
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_legacy_script.py"), "--output", str(output)],
                   check=True, capture_output=True)
    return output


def test_the_single_file_build(legacy_script, tmp_path):
    assert legacy_script.read_bytes().startswith(b"#!/usr/bin/env python3\nPK")
    assert os.access(legacy_script, os.X_OK)
    names = zipfile.ZipFile(legacy_script).namelist()
    assert "__main__.py" in names and "nova_flavor_sync/legacy_cli.py" in names and "_fallback/orjson.py" in names
    assert not any("/demo/" in name for name in names)  # the demo cloud's data stays out
    again = tmp_path / PROG
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_legacy_script.py"), "--output", str(again)],
                   check=True, capture_output=True)
    assert again.read_bytes() == legacy_script.read_bytes()  # the same bytes for the same sources


def _python_without_orjson(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """This Python as a Nova controller's: PyMySQL importable, orjson not (-S: no site-packages)."""
    import pymysql

    site = tmp_path / "controller-site"
    site.mkdir()
    (site / "pymysql").symlink_to(Path(pymysql.__file__).parent)
    return [sys.executable, "-S"], {"PYTHONPATH": str(site)}


def test_the_single_file_runs_with_python3_on_a_controller_without_orjson(legacy_script, demo_db, home, tmp_path):
    python, env_extra = _python_without_orjson(tmp_path)
    conf = write_nova_conf(tmp_path / "nova.conf", demo_db)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), legacy_cli.NOVA_CONF_ENV: str(conf), **env_extra}
    check = subprocess.run([*python, "-c", "import orjson"], env=env, capture_output=True, text=True)
    assert check.returncode != 0  # really no orjson

    shown = subprocess.run([*python, str(legacy_script), "--help"], env=env, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"usage: {PROG} [-h] [--run] [--verify] [--verbose] [--no-backup]")

    before = copies_hash(demo_db)
    dry = subprocess.run([*python, str(legacy_script)], env=env, capture_output=True, text=True, timeout=120)
    result = Result(dry.returncode, dry.stdout, dry.stderr)
    assert result.code == 3, result.shown
    assert in_order([*banner("DRY RUN"), *found_lines(), "=== Sync Complete ==="], result.said), result.shown
    assert summary(result)[0] == stale_copies(demo_db, all_keys=False)
    # The command to run next is this file, as it was run.
    assert result.said[-2] == f">>> To apply changes, run: {legacy_script} --run"
    assert copies_hash(demo_db) == before

    applied = subprocess.run([*python, str(legacy_script), "--run"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert stale_copies(demo_db, all_keys=False) == 0
    [backup] = (home / ".nova-flavor-fixes" / "backups").glob("flavor_copies_*.json")
    # The stand-in's backup is a backup like any other: the installed command restores it.
    restore = subprocess.run([sys.executable, "-m", "nova_flavor_sync.legacy_cli", "--restore", str(backup)],
                             env={**os.environ, "HOME": str(home), legacy_cli.NOVA_CONF_ENV: str(conf)},
                             capture_output=True, text=True, timeout=120)
    assert restore.returncode == 3, restore.stdout + restore.stderr
    assert f"Summary: Would restore={summary(Result(0, applied.stdout, ''))[0]}, Skipped=0, Errors=0" \
        in restore.stdout


def test_the_single_file_says_what_it_needs(legacy_script, tmp_path):
    """Without PyMySQL: one clear line, exit 4, before anything is opened."""
    bare = subprocess.run([sys.executable, "-S", str(legacy_script), "--run"], env={"PATH": os.environ["PATH"]},
                          capture_output=True, text=True)
    assert bare.returncode == 4, bare.stdout + bare.stderr
    assert bare.stderr.startswith("ERROR: nova-fix-flavors.py needs PyMySQL")
    assert not bare.stdout


def test_installed_with_the_package_as_nova_fix_flavors_py(tmp_path):
    """A wheel of the project installs a ``nova-fix-flavors.py`` command that runs legacy_cli.main."""
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copytree(ROOT / "include", source / "include", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheels"), str(source)],
                   check=True, capture_output=True, timeout=300)
    [wheel] = (tmp_path / "wheels").glob("nova_flavor_sync-*.whl")
    target = tmp_path / "target"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    script = target / "bin" / PROG
    assert "from nova_flavor_sync.legacy_cli import main" in script.read_text()
    shown = subprocess.run([str(script), "--help"], env={**os.environ, "PYTHONPATH": str(target)},
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"usage: {PROG} ")
