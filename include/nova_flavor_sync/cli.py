"""nova-flavor-sync: find and fix stale flavor extra specs in both of Nova's copies of an instance's flavor.

The RequestSpec (nova_api.request_specs) and the instance's own copy (instance_extra.flavor in
its cell database).

Dry run by default: nothing is written without ``--run``.

Return codes (the same for every mode):

* 0: in sync, or applied and verified
* 1: unexpected error (the log file has the trace)
* 2: bad usage (flags or flag values)
* 3: changes pending (dry run, ``--verify``, restore without ``--run``)
* 4: refused before writing (connection, schema, bad or foreign backup, plan changed)
* 5: done, but with conflicts, row errors or a stop partway: run again
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from nova_flavor_sync import report, service
from nova_flavor_sync.apply import DEFAULT_BATCH_SIZE
from nova_flavor_sync.backup import DEFAULT_BACKUP_DIR, HOME_DIR, BackupInfo, list_backups, private_dir
from nova_flavor_sync.cells import DATABASE_CONNECTION_ENV, CellMapping, parse_cell_urls
from nova_flavor_sync.db import NovaApiDb, NovaCellDb, NovaDb
from nova_flavor_sync.dburl import DbParams, parse_db_url, read_nova_conf_cell_url, redact_url, resolve_db_params
from nova_flavor_sync.errors import ConfigError, ExitCode, NovaFlavorSyncError, UsageError
from nova_flavor_sync.flavor import Flavor
from nova_flavor_sync.plan import CloudPlan
from nova_flavor_sync.progress import terminal_progress
from nova_flavor_sync.storage import StoragePath, as_path
from nova_flavor_sync.throttle import (
    DEFAULT_MAX_REPLICA_LAG_S,
    DEFAULT_MAX_THREADS_RUNNING,
    DEFAULT_MAX_WAIT_S,
    DEFAULT_TARGET_BATCH_S,
    MAX_PAUSE_S,
    MAX_REPLICA_LAG_S,
    MAX_TARGET_BATCH_S,
    MAX_WAIT_S,
    Pacer,
    PaceSettings,
)
from nova_flavor_sync.value_changes import write_changes

PROG = "nova-flavor-sync"
# How resolve_db_params names a nova.conf as the API database's source: "<path> [api_database] connection".
NOVA_CONF_SOURCE = " [api_database] connection"

DEFAULT_LOG_FILE = HOME_DIR / "nova-flavor-sync.log"
log = logging.getLogger("nova_flavor_sync")


class PlanChangedError(NovaFlavorSyncError):
    """--plan-digest names a plan that is no longer what the database holds."""

    exit_code = ExitCode.REFUSED


class _Parser(argparse.ArgumentParser):
    """argparse, but a URL quoted in a usage error (a mistyped flag) has its password masked."""

    def error(self, message: str) -> NoReturn:
        super().error(" ".join(_redact_word(word) for word in message.split(" ")))


def _redact_word(word: str) -> str:
    if "://" not in word:
        return word
    flag, eq, value = word.partition("=")
    if not eq or "://" in flag:
        return redact_url(word)
    return f"{flag}={redact_url(value)}"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Find instances whose flavor copies (RequestSpec in nova_api, instance_extra.flavor in "
        "each cell) are stale and rewrite only their extra_specs. "
        "Dry run unless --run is given.",
        epilog="Return codes: 0 in sync/done, 1 unexpected error, 2 bad usage, 3 changes pending, "
        "4 refused before writing, 5 conflicts or row errors (run again).",
    )
    where = parser.add_argument_group("database (one of; default /etc/nova/nova.conf)")
    where.add_argument("--db-url", help="mysql+pymysql://user:pass@host:port/nova_api (or env NOVA_API_DB_URL)")
    where.add_argument("--nova-conf", metavar="FILE", help="read [api_database] connection from this nova.conf")
    cells = parser.add_argument_group(
        "cells (found in nova_api's cell_mappings; every one is opened before anything is written)")
    cells.add_argument("--cell-db-url", action="append", default=[], metavar="CELL=URL",
                       help="the database of a cell, by name or uuid (repeatable); wins over its cell_mappings URL")
    cells.add_argument("--database-connection", metavar="URL",
                       help="Nova's [database] connection, which cell URL templates in cell_mappings are filled "
                       "from as Nova fills them (or env NOVA_DATABASE_CONNECTION; default: from the nova.conf "
                       "the API database came from)")

    mode = parser.add_argument_group("what to do (default: dry run)")
    mode.add_argument("--run", action="store_true", help="write the changes (with --restore: restore)")
    mode.add_argument("--verify", action="store_true", help="only check for drift; minimal output")
    mode.add_argument("--restore", metavar="FILE", type=_location,
                      help="put back the rows saved in this backup (a path, or a URL as for --backup-dir)")
    mode.add_argument("--list-backups", action="store_true", help="list backups in --backup-dir")
    mode.add_argument("--force", action="store_true", help="with --restore: also restore rows changed since the sync")
    mode.add_argument("--plan-digest", metavar="DIGEST", type=_digest,
                      help="with --run: refuse unless the plan is still this one")

    scope = parser.add_argument_group("scope (repeatable; default everything)")
    scope.add_argument("--flavor", action="append", default=[], metavar="FLAVOR",
                       help="flavor id, name or flavorid (or id:N, name:X, flavorid:X)")
    scope.add_argument("--instance", action="append", default=[], metavar="UUID", help="instance UUID")
    scope.add_argument("--key-prefix", action="append", default=[], metavar="PREFIX",
                       help="only extra spec keys starting with PREFIX")
    scope.add_argument("--all-keys", action="store_true",
                       help="also sync keys that change placement allocations or NUMA/PCI topology")

    options = parser.add_argument_group("options")
    options.add_argument("--batch-size", type=_batch_size, default=None,
                         help=f"rows per write transaction (1-{service.MAX_BATCH_SIZE}, default {DEFAULT_BATCH_SIZE}); "
                         "alone it fixes the size, with --batch-seconds it is the first size")
    options.add_argument("--backup-dir", type=_location, default=DEFAULT_BACKUP_DIR,
                         help="a directory, or a URL of object storage such as s3://bucket/prefix (credentials "
                         "and endpoint from the environment: AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...); "
                         "default %(default)s")
    options.add_argument("--no-backup", action="store_true", help="write without a backup file first")
    options.add_argument("--backup-all", action="store_true", help="back up every row read, not only changed ones")
    options.add_argument("--log-file", type=Path, default=DEFAULT_LOG_FILE, help="default %(default)s")
    options.add_argument("--export-changes", type=Path, metavar="FILE",
                         help="write every change to FILE (JSON Lines, one line per changed key per flavor copy, "
                         "and the rows left untouched, with why)")
    options.add_argument("--verbose", "-v", action="store_true", help="show every instance's changes and progress")
    options.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")

    pace = parser.add_argument_group("pacing (gentle on a shared database; for writes and their dry runs)")
    pace.add_argument("--batch-seconds", type=_batch_seconds, metavar="S",
                      help=f"size the batches so each takes about S seconds (default {DEFAULT_TARGET_BATCH_S:g}, "
                      "unless --batch-size is given; 0: fixed --batch-size)")
    pace.add_argument("--pause", type=_seconds(0, MAX_PAUSE_S), metavar="S",
                      help="sleep S seconds between two batches (default 0)")
    pace.add_argument("--max-threads-running", type=_threads, metavar="N",
                      help="wait while the server's Threads_running is above N "
                      f"(default {DEFAULT_MAX_THREADS_RUNNING}; 0: do not check)")
    pace.add_argument("--replica-db-url", action="append", default=[], type=_replica_url, metavar="URL",
                      help="a replica to watch, repeatable: wait while it lags (its user needs REPLICA MONITOR "
                      "or REPLICATION CLIENT)")
    pace.add_argument("--max-replica-lag", type=_seconds(0, MAX_REPLICA_LAG_S), metavar="S",
                      help=f"wait while a --replica-db-url is more than S seconds behind "
                      f"(default {DEFAULT_MAX_REPLICA_LAG_S:g})")
    pace.add_argument("--no-flow-control-pause", action="store_true",
                      help="do not wait while Galera flow control pauses replication")
    pace.add_argument("--max-load-wait", type=_seconds(1, MAX_WAIT_S), metavar="S",
                      help=f"stop (exit 5) if the server stays loaded for more than S seconds "
                      f"(default {DEFAULT_MAX_WAIT_S:g})")
    return parser


PACING_FLAGS = ("batch_seconds", "pause", "max_threads_running", "max_replica_lag", "max_load_wait")


def parse_args(argv: Sequence[str], *, error: Callable[[str], NoReturn] | None = None) -> argparse.Namespace:
    """Parse and refuse flag combinations before anything is opened (exit 2).

    ``error``: what reports a refused combination (default: this parser's ``error``); the old
    command's parser (``legacy_cli``) passes its own, so the message names that command.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    fail = error or parser.error
    modes = [name for name in ("verify", "restore", "list_backups") if getattr(args, name)]
    scoped = args.flavor or args.instance or args.key_prefix or args.all_keys
    problems = [
        (len(modes) > 1, "use only one of --verify, --restore and --list-backups"),
        (args.run and (args.verify or args.list_backups), "--run cannot be used with --verify or --list-backups"),
        (args.force and not args.restore, "--force is only for --restore"),
        (args.plan_digest and (not args.run or args.restore), "--plan-digest goes with --run (not --restore)"),
        (args.export_changes is not None and bool(args.restore or args.list_backups),
         "--export-changes is for a plan (a dry run, --run or --verify), not --restore or --list-backups"),
        (bool(scoped) and bool(args.restore or args.list_backups),
         "--flavor, --instance, --key-prefix and --all-keys do not apply to --restore or --list-backups"),
        (args.no_backup and args.backup_all, "--no-backup and --backup-all contradict each other"),
        (args.db_url is not None and args.nova_conf is not None, "use one of --db-url and --nova-conf"),
        (bool(args.verify or args.list_backups) and (
            any(getattr(args, name) is not None for name in PACING_FLAGS)
            or bool(args.replica_db_url) or args.no_flow_control_pause),
         "--batch-seconds, --pause, --max-threads-running, --replica-db-url, --max-replica-lag, "
         "--no-flow-control-pause and --max-load-wait pace writes: not for --verify or --list-backups"),
        (args.max_replica_lag is not None and not args.replica_db_url,
         "--max-replica-lag needs --replica-db-url (the replicas to watch)"),
    ]
    for failed, message in problems:
        if failed:
            fail(message)
    try:
        args.pace = pace_settings(args)
    except UsageError as exc:
        fail(str(exc))
    args.batch_size = args.pace.batch_size
    return args


def pace_settings(args: argparse.Namespace) -> PaceSettings:
    """The pacing options as PaceSettings: --batch-size alone fixes the size, as before."""
    if args.batch_seconds is not None:
        target = args.batch_seconds or None  # 0: fixed size
    else:
        target = None if args.batch_size is not None else DEFAULT_TARGET_BATCH_S
    return PaceSettings(
        batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
        target_batch_s=target,
        pause_s=args.pause or 0.0,
        max_threads_running=(DEFAULT_MAX_THREADS_RUNNING if args.max_threads_running is None
                             else args.max_threads_running or None),
        max_replica_lag_s=DEFAULT_MAX_REPLICA_LAG_S if args.max_replica_lag is None else args.max_replica_lag,
        pause_on_flow_control=not args.no_flow_control_pause,
        max_wait_s=DEFAULT_MAX_WAIT_S if args.max_load_wait is None else args.max_load_wait,
    )


class Voice:
    """What the command says around the engine's steps, where commands differ: this is
    nova-flavor-sync's. ``legacy_cli`` speaks as the old nova-fix-flavors.py around the very
    same run (its banner, ``Loaded N active flavors``, ``>>> To apply changes, run: ...``).

    Every hook only logs: what is read, checked, backed up and written never depends on it.
    """

    def started(self, args: argparse.Namespace) -> None:
        """The log is set up; nothing is opened yet."""

    def opening(self, params: DbParams, source: str) -> None:
        """About to connect to nova_api (found in ``source``)."""
        log.debug("Database %s (from %s)", params.safe_url(), source)

    def planned(self, flavors: dict[int, Flavor], cloud: CloudPlan) -> None:
        """Both copies are planned (with ``flavors``, as read); nothing of the plan is shown yet."""

    def summary(self, line: str) -> None:
        """The ``Summary: ...`` line of a sync, a verify or a restore."""
        log.info("%s", line)

    def dry_run_done(self, argv: Sequence[str], cloud: CloudPlan, *, verify: bool) -> None:
        """A dry run (or ``verify``) is done; its summary is out."""
        if verify:
            return
        if cloud.to_update:
            log.info("DRY RUN: nothing was written. To apply exactly this plan:")
            log.info("  %s", _command_line(list(argv), "--run", "--plan-digest", cloud.digest))
        else:
            log.info("DRY RUN: nothing to change.")

    def written(self, backup: BackupInfo | None) -> None:
        """--run wrote and verified (its summary is out): ``backup`` is the file written first, None
        with --no-backup."""

    def restore_dry_run_done(self, argv: Sequence[str]) -> None:
        log.info("DRY RUN: nothing was written. To restore: %s", _command_line(list(argv), "--run"))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(parse_args(argv), argv)


def run(args: argparse.Namespace, argv: Sequence[str], voice: Voice | None = None) -> int:
    """Run what ``parse_args`` made of ``argv``: the log, the engine, one exit code for every outcome."""
    argv = list(argv)
    voice = voice or Voice()
    try:
        _set_up_logging(args.log_file.expanduser(), verbose=args.verbose)
    except ConfigError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        return _run(args, argv, voice)
    except NovaFlavorSyncError as exc:
        log.debug("Stopped", exc_info=True)
        log.error("%s", exc)
        return exc.exit_code
    except Exception:
        if args.debug:
            raise
        log.debug("Unexpected error", exc_info=True)
        log.error("Unexpected error, see %s for the full trace", args.log_file)
        return ExitCode.UNEXPECTED
    finally:
        logging.shutdown()


def _run(args: argparse.Namespace, argv: list[str], voice: Voice) -> int:
    voice.started(args)
    if args.list_backups:
        for line in report.backup_list_lines(list_backups(args.backup_dir), as_path(args.backup_dir)):
            log.info("%s", line)
        return ExitCode.OK
    params, source = resolve_db_params(args.db_url, args.nova_conf, os.environ)
    voice.opening(params, source)
    cell_urls = parse_cell_urls(args.cell_db_url)
    template_url = args.database_connection
    if template_url is None and source.endswith(NOVA_CONF_SOURCE) and not os.environ.get(DATABASE_CONNECTION_ENV):
        template_url = read_nova_conf_cell_url(source.removesuffix(NOVA_CONF_SOURCE))  # the API's nova.conf
    with service.connect(params) as db, service.pacers(args.pace, args.replica_db_url) as pacer_for, \
            service.open_cells_of(db, template_url=template_url, cell_urls=cell_urls) as cells:
        if args.restore:
            return _restore(db, cells, args, argv, pacer_for, voice)
        return _sync(db, cells, args, argv, pacer_for, voice)


def _sync(
    db: NovaApiDb,
    cells: list[tuple[CellMapping, NovaCellDb]],
    args: argparse.Namespace,
    argv: list[str],
    pacer_for: Callable[[NovaDb], Pacer],
    voice: Voice,
) -> int:
    flavors, scope = service.resolve_scope(
        db,
        flavor_selectors=args.flavor,
        instance_uuids=args.instance,
        key_prefixes=args.key_prefix,
        all_keys=args.all_keys,
    )
    if args.run and not args.no_backup:
        private_dir(args.backup_dir)  # refuse a bad backup directory before reading everything
    reading = terminal_progress("Reading request specs", enabled=args.verbose)
    cloud = service.plan_both_copies(db, cells, scope, flavors=flavors, progress=reading.update if reading else None)
    if reading:
        reading.finish()
    voice.planned(flavors, cloud)
    full_view = report.ALL_VALUE_CHANGES
    if args.export_changes is not None:  # before anything is written: a file that cannot be written stops the run
        exported = write_changes(cloud.copies, args.export_changes)
        log.info("Every change written to %s (one line per changed key per flavor copy)", exported)
        full_view = f"--verbose, or every row in {exported}"
    plans = [copy.plan for copy in cloud.copies]
    errors = sum(len(plan.errors) for plan in plans)
    skipped = sum(plan.skipped for plan in plans)
    if args.verify:
        _log_lines([line for copy in cloud.copies for line in report.summary_lines(
            copy.plan, what=copy.rows_named, digest=False)[:1]])
        _log_lines([line for line in report.both_copies_lines(cloud) if line.startswith(("Copies disagree", "Both"))])
        voice.summary(report.summary_line(cloud.to_update, skipped, errors))
        voice.dry_run_done(argv, cloud, verify=True)
        return _pending_code(cloud.to_update, errors)

    _log_lines(report.cloud_plan_lines(cloud, verbose=args.verbose, full_view=full_view))
    if not args.run:
        voice.summary(report.summary_line(cloud.to_update, skipped, errors))
        voice.dry_run_done(argv, cloud, verify=False)
        return _pending_code(cloud.to_update, errors)

    if args.plan_digest and args.plan_digest != cloud.digest:
        raise PlanChangedError(
            f"the plan is no longer {args.plan_digest} (now {cloud.digest}): the data changed since "
            "that dry run. Nothing was written; run the dry run again and check it"
        )
    if not cloud.to_update:
        voice.summary(report.summary_line(0, skipped, errors))
        return ExitCode.INCOMPLETE if errors else ExitCode.OK

    databases = service.databases_of(db, cells)
    excluded: dict[str, list[int]] = {}
    backup = None
    if args.no_backup:
        log.warning("--no-backup: writing without a backup file")
    else:
        backup = service.back_up_copies(
            databases, cloud.copies, args.backup_dir, digest=cloud.digest, scope=scope,
            cell_names={mapping.uuid: mapping.name for mapping, _ in cells}, backup_all=args.backup_all,
        )
        excluded = backup.diverged_by_database
    log.info("Pacing: %s", args.pace.describe(len(args.replica_db_url)))
    log.info("Writing the instance copies in each cell first, then the RequestSpecs")
    writing = terminal_progress("Writing flavor copies", enabled=args.verbose)
    applied = service.apply_copies(
        databases, cloud.copies, batch_size=args.batch_size, exclude=excluded, pacer_for=pacer_for,
        progress=(lambda copy, r, total: writing.update(r.done, total)) if writing else None,
    )
    if writing:
        writing.finish()
    for done in applied:
        log.info("Paced %s: %s", done.copy.where, pacer_for(databases[done.copy.key]).summary())
    _log_lines(report.copies_applied_lines(applied))

    after = service.plan_both_copies(db, cells, scope)
    log.info("Verify: %d flavor copies still out of sync in scope", after.to_update)
    _log_lines(report.both_copies_lines(after)[:-1])
    conflicts = sum(len(done.result.conflicts) for done in applied)
    write_errors = sum(len(done.result.errors) for done in applied)
    if after.to_update and not (conflicts or write_errors):
        log.warning(
            "Drift remains although no conflicts were seen: Nova may have saved some rows from a copy it "
            "read just before this run wrote them. Run again; if drift stays, run --verify --verbose"
        )
    written = sum(len(done.result.updated) + len(done.result.already) for done in applied)
    read = sum(plan.rows_read for plan in plans)
    voice.summary(report.summary_line(written, read - written - errors - write_errors, errors + write_errors))
    voice.written(backup.info if backup else None)
    if conflicts or errors or write_errors or after.to_update:
        return ExitCode.INCOMPLETE
    return ExitCode.OK


def _restore(
    db: NovaApiDb,
    cells: list[tuple[CellMapping, NovaCellDb]],
    args: argparse.Namespace,
    argv: list[str],
    pacer_for: Callable[[NovaDb], Pacer],
    voice: Voice,
) -> int:
    if args.run:
        log.info("Pacing: %s", args.pace.describe(len(args.replica_db_url)))
    result = service.restore(
        db, args.restore, cells=cells, run=args.run, force=args.force, batch_size=args.batch_size,
        pacer_for=pacer_for,
    )
    *lines, summary = report.restore_lines(result, verbose=args.verbose)
    _log_lines(lines)
    voice.summary(summary)
    if not args.run:
        voice.restore_dry_run_done(argv)
        return ExitCode.DRIFT if result.restored else ExitCode.OK
    if result.errors or result.not_verified:
        return ExitCode.INCOMPLETE
    return ExitCode.OK


def _pending_code(to_update: int, errors: int) -> int:
    if to_update:
        return ExitCode.DRIFT
    return ExitCode.INCOMPLETE if errors else ExitCode.OK


def _command_line(argv: list[str], *more: str) -> str:
    """This command with ``more`` arguments added, any password masked, ready to paste."""
    shown, mask_next = [], False
    for arg in argv:
        if mask_next:
            arg, mask_next = redact_url(arg), False
        elif arg in URL_FLAGS:
            mask_next = True
        elif arg.startswith(tuple(f"{flag}=" for flag in URL_FLAGS)):
            flag, _, value = arg.partition("=")
            arg = f"{flag}={redact_url(value)}"
        shown.append(arg)
    return shlex.join([PROG, *shown, *more])


def _log_lines(lines: Sequence[str]) -> None:
    for line in lines:
        log.info("%s", line)


def _location(value: str) -> StoragePath:
    """A local path, or a URL of a file system fsspec knows (s3fs for s3://)."""
    try:
        return as_path(value)
    except (ValueError, ImportError) as exc:  # an unknown scheme, or its fsspec package is not installed
        raise argparse.ArgumentTypeError(f"{value}: {exc}") from None


def _digest(value: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise argparse.ArgumentTypeError("a plan digest is 64 hex digits, as a dry run prints it")
    return value


URL_FLAGS = ("--db-url", "--replica-db-url")


def _seconds(low: float, high: float):
    def parse(value: str) -> float:
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds):
            raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds")
        if not low <= seconds <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g} seconds")
        return seconds

    return parse


def _batch_seconds(value: str) -> float:
    seconds = _seconds(0, MAX_TARGET_BATCH_S)(value)
    if 0 < seconds < 0.01:
        raise argparse.ArgumentTypeError("must be 0 (fixed --batch-size) or at least 0.01 seconds")
    return seconds


def _threads(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if not 0 <= count <= 1_000_000:
        raise argparse.ArgumentTypeError("must be between 0 (do not check) and 1000000")
    return count


def _replica_url(value: str) -> DbParams:
    problem = ""
    try:
        return parse_db_url(value, source="replica URL")
    except ConfigError as exc:
        problem = str(exc)  # masks the password, as every dburl message does
    raise argparse.ArgumentTypeError(problem)


def _batch_size(value: str) -> int:
    try:
        size = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if not 1 <= size <= service.MAX_BATCH_SIZE:
        raise argparse.ArgumentTypeError(f"must be between 1 and {service.MAX_BATCH_SIZE}")
    return size


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def _set_up_logging(log_file: Path, *, verbose: bool) -> None:
    """INFO and WARNING to stdout, ERROR to stderr, everything to the log file."""
    try:
        log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))  # new log: 0600
        file_handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write the log file {log_file}: {exc.strerror or exc}") from None
    formatter = logging.Formatter("[%(asctime)s] [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S")
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(_BelowError())
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.ERROR)
    file_handler.setLevel(logging.DEBUG)
    out.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.handlers.clear()
    for handler in (out, err, file_handler):
        handler.setFormatter(formatter)
        log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
