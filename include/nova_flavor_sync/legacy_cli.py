"""nova-fix-flavors.py: the old command, as a thin translation onto nova-flavor-sync.

Operators' runbooks call ``/root/nova-fix-flavors.py`` with the old tool's flags. This module
takes exactly those flags, turns them into the nova-flavor-sync command line they mean, and
runs it through ``cli.run``: the same parsing checks, the same engine (both copies: the
RequestSpecs in nova_api and ``instance_extra.flavor`` in every cell of ``cell_mappings``), the
same backup, compare-and-swap writes, verify and restore, the same log file and exit codes.
Only what is said around the run differs (``LegacyVoice``): the old tool's banner and closing
lines, around every line the new command prints.

Flags (the old tool's, nothing else):

=====================  =========================================================================
old flag               nova-flavor-sync
=====================  =========================================================================
*(none)*               dry run (default key policy: placement keys are held back, see README)
``--run``              ``--run``: back up both copies, write, verify
``--verify``           ``--verify``
``--verbose``          ``--verbose``: ``Mismatch:``/``Changes:`` lines per copy, progress
``--no-backup``        ``--no-backup``: writes without a backup file, and says so, loudly
``--restore FILE``     ``--restore FILE`` (a dry run; with ``--run`` it restores)
``--list-backups``     ``--list-backups``
=====================  =========================================================================

The database, as the old tool found it: ``[api_database] connection`` of ``/etc/nova/nova.conf``
(its ``[database] connection`` fills cell URL templates, as in nova-flavor-sync). ``$NOVA_CONF``
names another nova.conf; ``$NOVA_API_DB_URL`` gives the URL itself, as for nova-flavor-sync
(both at once is refused: exit 2). Backups go to ``~/.nova-flavor-fixes/backups/`` and the log to
``~/.nova-flavor-fixes/nova-flavor-sync.log`` (``/root/...`` for root): the old tool's places and
nova-flavor-sync's defaults.

The summary line, ``Summary: Updated=N, Skipped=N, Errors=N``, is nova-flavor-sync's, over every
flavor copy read (the ``Found N ...`` lines: RequestSpecs, and instance copies per cell);
the three always add up to that total:

* dry run and ``--verify``: Updated = copies the run would rewrite; Skipped = copies read and
  left as they are without an error (in sync, held back because only placement keys differ,
  orphans whose flavor is gone, left alone because the instance is deleted, being built,
  resizing or migrating); Errors = rows that cannot be read as a flavor copy.
* ``--run``: Updated = copies written (with those found already up to date when written);
  Skipped = copies read and not written: the above, plus conflicts (Nova saved the row after it
  was planned: never overwritten, each on its own ``Conflict:`` line, exit 5) and rows deleted
  meanwhile; Errors = unreadable rows plus rows refused when written.
* ``--restore``: ``Summary: Would restore=N`` (dry run) or ``Restored=N``, ``Skipped=N``,
  ``Errors=N``, as nova-flavor-sync says it.

Exit codes are nova-flavor-sync's (``errors.ExitCode``): 0 in sync or done, 1 unexpected error,
2 bad usage (an unknown flag, a refused combination such as ``--verify --run``, a ``--restore``
file that does not exist, both ``$NOVA_CONF`` and ``$NOVA_API_DB_URL``), 3 changes pending (a dry
run or ``--verify`` found drift; the old tool said 0), 4 refused before writing, 5 done with
conflicts or errors. Nothing is opened before the flags are checked.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

from nova_flavor_sync import cli, dburl
from nova_flavor_sync.backup import BackupInfo
from nova_flavor_sync.dburl import DbParams
from nova_flavor_sync.flavor import Flavor
from nova_flavor_sync.plan import CloudPlan

PROG = "nova-fix-flavors.py"
# The nova.conf to read instead of /etc/nova/nova.conf (the old tool had no way to say it).
NOVA_CONF_ENV = "NOVA_CONF"
log = logging.getLogger("nova_flavor_sync")

EPILOG = f"""\
Examples (the old runbook; every one still works):
  {PROG}                          dry run: what would change (exit 3 when something would)
  {PROG} --verbose                the same, with each instance's changes
  {PROG} --verify                 check only, minimal output (exit 3 on drift, 0 in sync)
  {PROG} --run                    back up, write both copies, verify
  {PROG} --run --no-backup        the same without a backup file: --restore cannot undo it
  {PROG} --list-backups
  {PROG} --restore ~/.nova-flavor-fixes/backups/flavor_copies_20260106_143210.json
  {PROG} --restore ~/.nova-flavor-fixes/backups/flavor_copies_20260106_143210.json --run

The database: [api_database] connection of /etc/nova/nova.conf, or of ${NOVA_CONF_ENV};
or ${dburl.ENV_VAR}. This is nova-flavor-sync (the same engine, checks and backups) with the
old flags: `nova-flavor-sync --help` has every option.
Return codes: 0 in sync/done, 1 unexpected error, 2 bad usage, 3 changes pending,
4 refused before writing, 5 conflicts or row errors (run again).
"""


def build_parser() -> argparse.ArgumentParser:
    """The old tool's flags, exactly (URLs in a usage error are masked, as in nova-flavor-sync)."""
    parser = cli._Parser(
        prog=PROG,
        description="Sync the flavor extra specs copied into instances' RequestSpecs (nova_api) and\n"
        "instance_extra.flavor (every cell) with their flavors. Dry run unless --run is given.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run", action="store_true", help="actually update the database (default is dry-run)")
    parser.add_argument("--verify", action="store_true", help="verify only: check for mismatches, minimal output")
    parser.add_argument("--verbose", action="store_true", help="show each instance's changes and progress")
    parser.add_argument("--no-backup", action="store_true",
                        help="write without a backup file first (--restore cannot undo such a run)")
    parser.add_argument("--restore", metavar="BACKUP_FILE", type=_existing_file,
                        help="put back the rows saved in a backup file (a dry run unless --run is given)")
    parser.add_argument("--list-backups", action="store_true", help="list the backup files")
    return parser


def _existing_file(value: str) -> str:
    """A backup file that exists (a quoted ``~/...`` too); a missing one is bad usage (exit 2)."""
    path = Path(value).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such backup file: {value}")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"not a backup file: {value}")
    return str(path)


def translate(old: argparse.Namespace, environ: Mapping[str, str], error: Callable[[str], NoReturn]) -> list[str]:
    """The nova-flavor-sync arguments that the old flags mean (the database as the old tool found it)."""
    argv = [flag for flag, given in (("--run", old.run), ("--verify", old.verify), ("--verbose", old.verbose),
                                     ("--no-backup", old.no_backup), ("--list-backups", old.list_backups)) if given]
    if old.restore is not None:
        argv += ["--restore", old.restore]
    if old.list_backups:
        return argv  # no database is opened
    nova_conf = environ.get(NOVA_CONF_ENV, "").strip()
    if environ.get(dburl.ENV_VAR, "").strip():
        if nova_conf:
            error(f"${dburl.ENV_VAR} and ${NOVA_CONF_ENV} are both set: unset the one not meant")
        return argv  # nova-flavor-sync reads $NOVA_API_DB_URL itself
    return ["--nova-conf", nova_conf or dburl.DEFAULT_NOVA_CONF, *argv]


class LegacyVoice(cli.Voice):
    """The old tool's lines around nova-flavor-sync's own (which all stay)."""

    def __init__(self, prog: str, old: argparse.Namespace) -> None:
        self.prog = prog
        self.old = old

    def _shown(self, *args: str) -> str:
        return shlex.join([self.prog, *args])

    def started(self, args: argparse.Namespace) -> None:
        mode = "LIVE MODE" if args.run else "DRY RUN"
        if args.list_backups:
            log.info("=== Available Backups ===")
        elif args.restore:
            log.info("=== Starting Restore from Backup ===")
            log.info("Mode: %s", mode)
            log.info("Backup file: %s", args.restore)
        else:
            log.info("=== Starting Flavor Sync ===")
            log.info("Mode: %s", "VERIFY ONLY" if args.verify else mode)
            if args.run and args.no_backup:
                log.warning("Backup: NONE (--no-backup): nothing this run writes can be put back with --restore")

    def opening(self, params: DbParams, source: str) -> None:
        super().opening(params, source)
        log.info("Connecting to database: %s@%s:%d (from %s)", params.database, params.host, params.port, source)

    def planned(self, flavors: dict[int, Flavor], cloud: CloudPlan) -> None:
        log.info("Loaded %d active flavors", len(flavors))
        for copy in cloud.copies:
            log.info("Found %d %s", copy.plan.rows_read, copy.rows_named)

    def summary(self, line: str) -> None:
        log.info("%s", "=== Restore Complete ===" if self.old.restore else "=== Sync Complete ===")
        super().summary(line)

    def dry_run_done(self, argv: Sequence[str], cloud: CloudPlan, *, verify: bool) -> None:
        if not cloud.to_update:
            super().dry_run_done(argv, cloud, verify=verify)
            return
        if not verify:
            log.info("DRY RUN: nothing was written.")
        flags = [flag for flag in ("--verbose", "--no-backup") if getattr(self.old, flag[2:].replace("-", "_"))]
        log.info(">>> To apply changes, run: %s", self._shown(*flags, "--run"))
        exact = [arg for arg in argv if arg != "--verify"]
        log.info(">>> Or, refused unless the plan is still exactly this one: %s",
                 cli._command_line(exact, "--run", "--plan-digest", cloud.digest))

    def written(self, backup: BackupInfo | None) -> None:
        if backup is None:
            log.warning(">>> No backup was written (--no-backup): --restore cannot undo this run")
        else:
            log.info(">>> Backup available at: %s", backup.path)

    def restore_dry_run_done(self, argv: Sequence[str]) -> None:
        log.info("DRY RUN: nothing was written.")
        log.info(">>> To apply restore, run: %s", self._shown("--restore", str(self.old.restore), "--run"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the old command line ``argv`` (default ``sys.argv[1:]``; commands it prints start with
    ``sys.argv[0]`` then, the path it was run as).

    Bad usage exits 2 (argparse's SystemExit) before anything is opened.
    """
    prog = PROG
    if argv is None:
        argv = sys.argv[1:]
        if os.path.basename(sys.argv[0]).startswith("nova-fix-flavors"):  # not python -m ...legacy_cli
            prog = sys.argv[0]
    parser = build_parser()
    old = parser.parse_args(list(argv))
    new_argv = translate(old, os.environ, parser.error)
    args = cli.parse_args(new_argv, error=parser.error)
    return cli.run(args, new_argv, LegacyVoice(prog, old))


if __name__ == "__main__":
    sys.exit(main())
