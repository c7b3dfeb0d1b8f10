"""Backup files: written atomically before the first write, checked before a restore.

One backup per run holds the rows of both flavor copies it may write: RequestSpecs from
nova_api and instance copies from each cell. It is one JSON document, written and read as
a stream so memory does not grow with it (one record a line)::

    {"format": "nova-flavor-sync-backup", "format_version": 2, "created_at": ...,
     "databases": {"nova_api": {<server identity>}, "<cell uuid>": {"cell": "cell1", ...}},
     "plan_digest": ..., "scope": {...}, "records": [
    {"database": "nova_api", "table": "request_specs", "id": 7, "instance_uuid": ..., "spec": ...,
     "updated_at": ..., "sha256": ..., "new_sha256": ...},
    {"database": "<cell uuid>", "table": "instance_extra", "id": 3, ..., "spec": <the flavor column>, ...},
    ...
    ], "record_count": 2, "records_by_database": {"nova_api": 1, "<cell uuid>": 1},
     "checksum": "sha256:<hex>"}

``database`` names where a record's row lives: ``nova_api`` or the uuid of its cell (as
in ``cell_mappings``); ``spec`` is that row's JSON column (``request_specs.spec`` or
``instance_extra.flavor``) byte for byte. ``checksum`` is the sha256 of every byte of the
file before ``, "checksum"``. Each record's ``sha256`` is that of its ``spec``;
``new_sha256`` is what the sync planned to write there (null for a row it does not
change), so a restore can tell "still as the sync left it". Version 1 files (before cells:
RequestSpecs only, one ``database``) are still read.

A restore reads a backup twice or more, never holding its records: ``open_backup`` checks
all of it in one pass (the checksum covers the whole file, so nothing can be trusted
before its end), then ``BackupFile.records`` reads one database's records at a time (this
tool writes each database's records together, in id order: one read of its own lines).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from nova_flavor_sync.db import identity_keys
from nova_flavor_sync.errors import BackupError
from nova_flavor_sync.spec_json import sha256_text
from nova_flavor_sync.storage import OBJECT_STORAGE_PRIVACY, StoragePath, as_path, local_path, upload

log = logging.getLogger(__name__)

FORMAT = "nova-flavor-sync-backup"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
API_DATABASE = "nova_api"  # a record's ``database`` for nova_api; a cell's is its uuid
TABLES = {True: "request_specs", False: "instance_extra"}  # by "is it nova_api"
# Where the tool keeps its files unless told otherwise (the old tool's place): backups,
# the CLI's log, the DAGs' plans. The one place this path is written.
HOME_DIR = Path("~/.nova-flavor-fixes")
DEFAULT_BACKUP_DIR = HOME_DIR / "backups"
FILE_PREFIX = "flavor_copies_"
OLD_FILE_PREFIXES = ("request_specs_",)  # before cells: listed and restored all the same
_RECORDS_OPEN = b', "records": [\n'
_CHECKSUM_KEY = b', "checksum": "'
_TRAILER_MAX = 64 * 1024  # the last line: counts per database (a few hundred cells fit) and checksum
# The old nova-fix-flavors.py wrote request_specs_<time>.json into the same directory: json.dump(indent=2)
# of {"timestamp", "count", "specs": [every RequestSpec]}. Named for what it is, never restored.
_OLD_TOOL_START = b'{\n  "timestamp": '
OLD_TOOL_BACKUP = ("written by the old nova-fix-flavors.py (no checksum, no record of its database): this tool cannot "
                   "check it and does not restore it; restore its specs by hand if you must")
_TRAILER_OPEN = b"], "  # how the last line starts, after the records
_READ_SIZE = 1 << 20


@dataclass(frozen=True, slots=True)
class BackupRecord:
    """One row of a flavor copy (request_specs or instance_extra) as it was before the sync."""

    id: int
    instance_uuid: str
    spec: str  # the row's JSON column: request_specs.spec or instance_extra.flavor
    updated_at: str | None  # "YYYY-mm-dd HH:MM:SS" (UTC, as stored) or None
    sha256: str
    new_sha256: str | None  # what the sync writes over it; None if the plan leaves it
    database: str = API_DATABASE  # "nova_api" or the uuid of the row's cell

    @property
    def table(self) -> str:
        return TABLES[self.database == API_DATABASE]

    @classmethod
    def of_row(
        cls,
        row_id: int,
        instance_uuid: str,
        spec: str,
        updated_at: str | None,
        new_sha256: str | None,
        database: str = API_DATABASE,
    ) -> BackupRecord:
        return cls(row_id, instance_uuid, spec, updated_at, sha256_text(spec), new_sha256, database)

    def to_json(self) -> bytes:
        """The record as one JSON object, laid out as json.dumps lays it out.

        The values are encoded by orjson, a third of json's time for a spec (most of a
        backup's CPU at a million rows); non-ASCII text stays UTF-8 instead of \\u escapes.
        """
        dumps = orjson.dumps
        return (
            b'{"database": %s, "table": %s, "id": %d, "instance_uuid": %s, "spec": %s, "updated_at": %s, '
            b'"sha256": %s, "new_sha256": %s}'
        ) % (
            dumps(self.database),
            dumps(self.table),
            self.id,
            dumps(self.instance_uuid),
            dumps(self.spec),
            dumps(self.updated_at),
            dumps(self.sha256),
            dumps(self.new_sha256),
        )


@dataclass(frozen=True)
class BackupInfo:
    """A backup's header and trailer: what ``--list-backups`` shows."""

    path: StoragePath  # a Path, or a UPath on object storage (see storage)
    created_at: str
    databases: dict[str, dict[str, Any]]  # "nova_api" and each cell's uuid -> server identity
    plan_digest: str
    scope: dict[str, Any]
    record_count: int
    records_by_database: dict[str, int] = field(default_factory=dict)

    @property
    def database(self) -> dict[str, Any]:
        """nova_api's server identity."""
        return self.databases.get(API_DATABASE, {})

    def where(self, database: str) -> str:
        """How messages name a record's database: ``nova_api`` or ``cell1 (<uuid>)``."""
        name = self.databases.get(database, {}).get("cell")
        return f"{name} ({database})" if name and database != API_DATABASE else database


@dataclass(frozen=True)
class Backup:
    """A backup file that passed every check, with its records."""

    info: BackupInfo
    records: list[BackupRecord]


def private_dir(directory: StoragePath) -> StoragePath:
    """Create ``directory`` (mode 0700) or check that an existing one is private.

    On object storage there is nothing to create or check (see storage): it is returned as it is.
    """
    if local_path(directory) is None:
        return directory
    directory = local_path(directory)
    missing = [p for p in (directory, *directory.parents) if not p.exists()]
    try:
        for path in reversed(missing):
            path.mkdir(mode=0o700)
    except OSError as exc:
        raise BackupError(f"cannot create backup directory {directory}: {exc.strerror}") from None
    mode = directory.stat().st_mode
    if not stat.S_ISDIR(mode):
        raise BackupError(f"backup directory {directory} is not a directory")
    if mode & 0o077:
        raise BackupError(
            f"backup directory {directory} can be read by others (mode {stat.S_IMODE(mode):04o}); "
            f"backups hold every instance's request spec: use a private one (chmod 700 {directory})"
        )
    return directory


def write_backup(
    directory: StoragePath,
    records: Iterable[BackupRecord],
    *,
    databases: Mapping[str, Mapping[str, Any]],
    plan_digest: str,
    scope: Mapping[str, Any],
    now: datetime | None = None,
) -> BackupInfo:
    """Write records to a new backup file atomically: temp file, fsync, rename, fsync dir.

    On object storage (``directory`` a UPath): a local temp file, then one conditional
    upload that never replaces an object (see storage).
    ``databases``: the server identity of nova_api (``"nova_api"``) and of each cell whose
    rows may be among the records (by cell uuid, with the cell's name as ``"cell"``).
    """
    directory = private_dir(directory)
    now = now or datetime.now(UTC)
    stem = f"{FILE_PREFIX}{now.strftime('%Y%m%d_%H%M%S')}"
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "databases": {key: dict(identity) for key, identity in databases.items()},
        "plan_digest": plan_digest,
        "scope": dict(scope),
    }
    if local_path(directory) is None:
        path, counts = _upload_backup(directory, stem, header, records)
    else:
        path, counts = _write_local_backup(directory, stem, header, records)
    return BackupInfo(path, header["created_at"], header["databases"], plan_digest, header["scope"],
                      sum(counts.values()), counts)


def _write_local_backup(
    directory: Path, stem: str, header: dict[str, Any], records: Iterable[BackupRecord]
) -> tuple[Path, dict[str, int]]:
    tmp = directory / f".{stem}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            counts = _write_document(out, header, records, databases=header["databases"])
            out.flush()
            os.fsync(out.fileno())
        path = _link_unused_name(tmp, directory, stem)
        tmp.unlink()
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BackupError(f"cannot write a backup in {directory}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path, counts


def _upload_backup(
    directory: StoragePath, stem: str, header: dict[str, Any], records: Iterable[BackupRecord]
) -> tuple[StoragePath, dict[str, int]]:
    try:
        path, counts = upload(lambda out: _write_document(out, header, records, databases=header["databases"]),
                              (directory / name for name in _names(stem)))
    except BackupError:
        raise
    except Exception as exc:  # the file system's own errors (s3fs, botocore: credentials, endpoint, bucket)
        raise BackupError(f"cannot write a backup in {directory}: {exc}") from None
    log.warning("Backup %s: %s", path, OBJECT_STORAGE_PRIVACY)
    return path, counts


class BackupFile:
    """A backup file that passed every check (``open_backup``), read again a database at a time.

    The file stays open, so the records read are those of the file that was checked (a
    file renamed over it is not read); a file changed in place since the check is refused
    (its size or time), and each record is checked against its own sha256 again as it is read.
    """

    def __init__(self, path: Path, info: BackupInfo, *, handle: BinaryIO | None = None, scan: _Scan | None = None,
                 records: list[BackupRecord] | None = None) -> None:
        """Either the open file and what its pass found, or (a file not laid out as this tool
        writes it, read whole: see open_backup) its records."""
        self.path, self.info, self._handle = as_path(path), info, handle
        self._in_memory = records
        if scan is None:
            scan = _Scan()
            for index, record in enumerate(records or ()):
                scan.count(record, index, offset=0)
        self._scan = scan

    @property
    def counts(self) -> dict[str, int]:
        """How many records each database has, in the order of each one's first record."""
        return dict(self._scan.counts)

    def records(self, database: str | None = None) -> Iterator[BackupRecord]:
        """The records in file order: all of them, or only those of ``database`` ("nova_api" or a cell's uuid)."""
        scan = self._scan
        if self._in_memory is not None:
            yield from (r for r in self._in_memory if database is None or r.database == database)
            return
        assert self._handle is not None
        if database is None:
            offset, index, wanted = scan.records_start, 0, sum(scan.counts.values())
        elif database in scan.first:
            (offset, index), wanted = scan.first[database], scan.counts[database]
        else:
            return
        self._check_unchanged()
        found = 0
        for _, line in _lines(self._handle.fileno(), offset):
            if found == wanted:
                return
            record = self._parsed(line, index)
            index += 1
            if database is None or record.database == database:
                found += 1
                yield record
        if found < wanted:
            raise self._changed()

    def records_by_id(self, database: str) -> Iterator[BackupRecord]:
        """Each id's record of ``database`` once, in id order (a hand-made file may repeat an id: the last counts).

        Streamed when the file has them so, as this tool writes them; else sorted in memory.
        """
        if self._scan.ascending.get(database, True):
            return self.records(database)
        return iter(sorted({r.id: r for r in self.records(database)}.values(), key=lambda r: r.id))

    def _parsed(self, line: bytes, index: int) -> BackupRecord:
        try:
            return _record(self.path, index, _json(_record_text(line)), self._scan.header["format_version"])
        except (ValueError, BackupError):
            raise self._changed() from None

    def _check_unchanged(self) -> None:
        assert self._handle is not None
        now = os.fstat(self._handle.fileno())
        if (now.st_size, now.st_mtime_ns) != self._scan.stat:
            raise self._changed()

    def _changed(self) -> BackupError:
        return BackupError(f"backup {self.path} changed after it was checked; read no further")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()

    def __enter__(self) -> BackupFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_backup(path: Path) -> BackupFile:
    """Check all of a backup in one pass, reading a line at a time; raise BackupError saying what is wrong.

    The checks and what each says are those of reading the whole document at once, in the
    same order: valid JSON, ours, a version this tool reads, the checksum, every record,
    the record count, the databases. A file not laid out as this tool writes it (damaged,
    or made by hand) is read whole, as it was before, to say what is wrong with it.
    """
    location = as_path(path)
    try:
        if local_path(location) is None:
            # Object storage: read through a private local copy (unlinked at once, 0600), which
            # the passes below read by file descriptor as they read a local backup.
            handle: BinaryIO = tempfile.TemporaryFile()  # noqa: SIM115 (closed by the BackupFile, or below)
            with location.open("rb") as remote:
                shutil.copyfileobj(remote, handle, _READ_SIZE)
            handle.seek(0)
        else:
            handle = location.open("rb")  # noqa: SIM115 (closed by the BackupFile, or below)
    except FileNotFoundError:
        raise BackupError(f"backup {path} does not exist") from None
    except IsADirectoryError:
        raise BackupError(f"backup {path} is a directory, not a file") from None
    except OSError as exc:
        raise BackupError(f"cannot read backup {path}: {exc.strerror}") from None
    try:
        scan = _scan(path, handle)
        if scan is not None:
            return BackupFile(path, _checked(path, scan), handle=handle, scan=scan)
        handle.seek(0)
        data = handle.read()
    except OSError as exc:
        handle.close()
        raise BackupError(f"cannot read backup {path}: {exc.strerror}") from None
    except BaseException:
        handle.close()
        raise
    handle.close()
    backup = _load_whole(path, data)
    return BackupFile(path, backup.info, records=backup.records)


def load_backup(path: Path) -> Backup:
    """Read a backup and check all of it; raise BackupError saying what is wrong.

    Every record is held in memory (tests, small backups); a restore reads a backup as a
    stream (``open_backup``).
    """
    with open_backup(path) as backup:
        return Backup(backup.info, list(backup.records()))


class _Scan:
    """What one pass over a backup laid out as this tool writes it found."""

    def __init__(self) -> None:
        self.header: dict[str, Any] = {}
        self.trailer: dict[str, Any] = {}
        self.records_start = 0  # where the first record's line starts
        self.records = 0  # record lines, good or bad
        self.checksum_ok = False
        self.problem: BackupError | None = None  # the first bad record's
        self.counts: dict[str, int] = {}  # records by database, in order of appearance
        self.first: dict[str, tuple[int, int]] = {}  # database -> (offset, index) of its first record
        self.ascending: dict[str, bool] = {}  # database -> its ids only grow
        self.stat = (0, 0)  # the file's size and time when checked
        self._last_id: dict[str, int] = {}

    def count(self, record: BackupRecord, index: int, offset: int) -> None:
        database = record.database
        if database not in self.counts:
            self.counts[database], self.first[database], self.ascending[database] = 0, (offset, index), True
        elif record.id <= self._last_id[database]:
            self.ascending[database] = False
        self.counts[database] += 1
        self._last_id[database] = record.id


def _scan(path: Path, handle: BinaryIO) -> _Scan | None:
    """One pass: the header, every record, the trailer and the checksum; None if the file is not
    laid out as this tool writes it (then only reading it whole can say what is wrong).

    The layout: the header object's members and ``, "records": [`` on the first line, then one
    record a line, each but the last followed by a comma (an empty line: no records), then the
    trailer, from ``], `` to the checksum and the final newline. Each line read is JSON on its
    own: together they are valid JSON exactly as the whole document would be.
    """
    scan = _Scan()
    stat = os.fstat(handle.fileno())
    scan.stat = (stat.st_size, stat.st_mtime_ns)
    digest = hashlib.sha256()
    lines = _lines(handle.fileno(), 0)
    _, first = next(lines, (0, b""))
    if not first.endswith(_RECORDS_OPEN):
        return None
    try:
        header = json.loads(first[: -len(_RECORDS_OPEN)] + b"}")
    except ValueError:
        return None
    if not isinstance(header, dict) or not header or "records" in header:
        return None  # not ours; "{, " (no members: invalid whole); "records" twice
    digest.update(first)
    scan.header, scan.records_start = header, len(first)
    version = header.get("format_version")
    readable = header.get("format") == FORMAT and version in READABLE_VERSIONS
    index, more = 0, True  # more: the line before says another record follows
    trailer = None
    for at, line in lines:
        if line.startswith(_TRAILER_OPEN):
            if more and index:  # a comma before "]"
                return None
            trailer = line
            break
        if not more or not line.endswith(b"\n"):
            return None
        digest.update(line)
        if index == 0 and line == b"\n":  # no records
            more = False
            continue
        more = line.endswith(b",\n")
        try:
            raw = _json(_record_text(line))
        except ValueError:
            return None
        if readable and scan.problem is None:
            try:
                scan.count(_record(path, index, raw, version), index, at)
            except BackupError as exc:
                scan.problem = exc
        index += 1
    if trailer is None or next(lines, None) is not None:
        return None  # no trailer, or more after it
    try:
        members = _json(b"{" + trailer[len(_TRAILER_OPEN) :])
    except ValueError:
        return None
    if not isinstance(members, dict) or not members or "records" in members or set(members) & set(header):
        return None  # "], }" (invalid whole); "records" twice; a key twice (the whole keeps the last)
    scan.trailer = members
    cut = trailer.rfind(_CHECKSUM_KEY)
    if cut >= 0:
        digest.update(trailer[:cut])
        scan.checksum_ok = trailer[cut:] == _CHECKSUM_KEY + f'sha256:{digest.hexdigest()}"}}\n'.encode()
    scan.records = index
    return scan


def _checked(path: Path, scan: _Scan) -> BackupInfo:
    """The checks of ``_load_whole``, in its order, on what the pass found."""
    document = {**scan.header, **scan.trailer}
    if document.get("format") != FORMAT:
        raise BackupError(f"{path} is not a nova-flavor-sync backup")
    if document.get("format_version") not in READABLE_VERSIONS:
        raise BackupError(
            f"backup {path} has format version {document.get('format_version')!r}; "
            f"this tool reads versions {' and '.join(map(str, READABLE_VERSIONS))}"
        )
    if not scan.checksum_ok:
        raise BackupError(f"backup {path} fails its checksum: it was changed or damaged after it was written")
    if scan.problem is not None:
        raise scan.problem
    count = scan.records
    if document.get("record_count") != count:
        raise BackupError(f"backup {path} says {document.get('record_count')} records but holds {count}")
    info = _info(path, document, count)
    unknown = sorted(set(scan.counts) - set(info.databases))
    if unknown:
        raise BackupError(f"backup {path} has records of databases its header does not name: {', '.join(unknown)}")
    return info


def _load_whole(path: Path, data: bytes) -> Backup:
    """Check a backup read whole; raise BackupError saying what is wrong (see open_backup)."""
    try:
        document = json.loads(data)
    except ValueError:
        raise BackupError(f"backup {path} is damaged or truncated: not valid JSON") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        if isinstance(document, dict) and {"timestamp", "count", "specs"} <= set(document):
            raise BackupError(f"backup {path} was {OLD_TOOL_BACKUP}")
        raise BackupError(f"{path} is not a nova-flavor-sync backup")
    if document.get("format_version") not in READABLE_VERSIONS:
        raise BackupError(
            f"backup {path} has format version {document.get('format_version')!r}; "
            f"this tool reads versions {' and '.join(map(str, READABLE_VERSIONS))}"
        )
    cut = data.rfind(_CHECKSUM_KEY)
    trailer = _CHECKSUM_KEY + f'sha256:{hashlib.sha256(data[:cut]).hexdigest()}"}}\n'.encode()
    if cut < 0 or data[cut:] != trailer:  # nothing may follow the checksum either
        raise BackupError(f"backup {path} fails its checksum: it was changed or damaged after it was written")
    version = document["format_version"]
    records = [_record(path, i, raw, version) for i, raw in enumerate(_list(path, document, "records"))]
    if document.get("record_count") != len(records):
        raise BackupError(f"backup {path} says {document.get('record_count')} records but holds {len(records)}")
    info = _info(path, document, len(records))
    unknown = sorted({r.database for r in records} - set(info.databases))
    if unknown:
        raise BackupError(f"backup {path} has records of databases its header does not name: {', '.join(unknown)}")
    return Backup(info, records)


def _lines(fd: int, offset: int) -> Iterator[tuple[int, bytes]]:
    """The file's lines from ``offset`` on, each with where it starts (the last may lack its newline).

    Read with os.pread: two readers of one file do not move each other's position.
    """
    pending = b""
    while chunk := os.pread(fd, _READ_SIZE, offset + len(pending)):
        pending += chunk
        start = 0
        while (end := pending.find(b"\n", start)) >= 0:
            yield offset + start, pending[start : end + 1]
            start = end + 1
        offset, pending = offset + start, pending[start:]
    if pending:
        yield offset, pending


def _json(text: bytes) -> Any:
    """A line's JSON, decoded as the whole document's is (json.loads: UTF-8, surrogates let through).

    Not json.loads(bytes): that guesses each line's encoding from its first bytes, the whole
    document's from the file's (the header's line is read that way: it starts the file).
    """
    return json.loads(text.decode("utf-8", "surrogatepass"))


def _record_text(line: bytes) -> bytes:
    """A record's JSON in its line: without the newline and the comma that separates it from the next."""
    return line[:-2] if line.endswith(b",\n") else line[:-1]


def check_same_database(info: BackupInfo, current: Mapping[str, Any], database: str = API_DATABASE) -> None:
    """Refuse a backup taken from another database (host names may differ: a VIP, a node).

    ``database``: which of the backup's databases ``current`` should be (nova_api or a cell's uuid).
    """
    taken = info.databases.get(database, {})
    where = "" if database == API_DATABASE else f" (cell {info.where(database)})"
    if taken.get("schema") != current.get("schema"):
        raise BackupError(
            f"backup {info.path.name}{where} is of schema {taken.get('schema')!r}, this is {current.get('schema')!r}"
        )
    keys = identity_keys(taken, current)
    if keys is None:
        raise BackupError(f"backup {info.path.name}{where} does not say which server it was taken on")
    if any(taken[k] != current[k] for k in keys):
        raise BackupError(
            f"backup {info.path.name}{where} was taken on another server "
            f"({', '.join(f'{k}={taken[k]}' for k in keys)}); this is {', '.join(f'{k}={current[k]}' for k in keys)}"
        )


def list_backups(directory: StoragePath) -> list[BackupInfo | tuple[StoragePath, str]]:
    """Every backup in the directory, newest last; a damaged one as ``(path, problem)``."""
    directory = as_path(directory)
    try:
        if local_path(directory) is None:  # s3fs keeps listings forever: another worker's new backup would not show
            directory.fs.invalidate_cache(directory.path)
        if not directory.is_dir():
            return []
        paths = [path for prefix in (FILE_PREFIX, *OLD_FILE_PREFIXES) for path in directory.glob(f"{prefix}*.json")]
    except Exception as exc:  # the file system's own errors (s3fs, botocore: credentials, endpoint, bucket)
        raise BackupError(f"cannot list the backups in {directory}: {exc}") from None
    found: list[BackupInfo | tuple[StoragePath, str]] = []
    for path in sorted(paths, key=lambda p: (re.findall(r"\d{8}_\d{6}", p.name)[:1], p.name)):  # by time
        try:
            found.append(read_backup_info(path))
        except BackupError as exc:
            found.append((path, str(exc)))
    killed = [path for prefix in (FILE_PREFIX, *OLD_FILE_PREFIXES) for path in directory.glob(f".{prefix}*.tmp")]
    for path in sorted(killed):  # a run killed while writing
        found.append((path, "incomplete: its run stopped while writing it; not a backup, safe to delete"))
    return found


def read_backup_info(path: StoragePath) -> BackupInfo:
    """Header and record count from the first and last lines, without reading the records."""
    try:
        with as_path(path).open("rb") as handle:
            first = handle.readline()
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - _TRAILER_MAX))
            last = handle.read().splitlines()[-1]
        header = json.loads(first.removesuffix(b"\n").removesuffix(_RECORDS_OPEN.rstrip(b"\n")) + b"}")
        trailer = json.loads(b"{" + last.removeprefix(b"], "))
    except (OSError, ValueError, IndexError):
        raise BackupError(f"{path.name}: {_not_ours(path, 'damaged or not a backup')}") from None
    if header.get("format") != FORMAT:
        raise BackupError(f"{path.name}: {_not_ours(path, 'not a nova-flavor-sync backup')}")
    return _info(path, {**header, **trailer}, trailer.get("record_count", 0))


def _not_ours(path: StoragePath, problem: str) -> str:
    """``problem``, or what the file is when the old nova-fix-flavors.py wrote it."""
    try:
        with as_path(path).open("rb") as handle:
            return OLD_TOOL_BACKUP if handle.read(len(_OLD_TOOL_START)) == _OLD_TOOL_START else problem
    except OSError:
        return problem


def _write_document(
    out: BinaryIO, header: dict[str, Any], records: Iterable[BackupRecord], *, databases: Mapping[str, Any]
) -> dict[str, int]:
    digest = hashlib.sha256()

    def emit(chunk: bytes) -> None:
        digest.update(chunk)
        out.write(chunk)

    emit(json.dumps(header).encode()[:-1] + _RECORDS_OPEN)
    counts: dict[str, int] = {}
    for record in records:
        if record.database not in databases:  # a caller's bug: the restore could not check it
            raise BackupError(f"a backup record of database {record.database!r}, which the backup does not name")
        emit((b",\n" if counts else b"") + record.to_json())
        counts[record.database] = counts.get(record.database, 0) + 1
    emit(f'\n], "record_count": {sum(counts.values())}, "records_by_database": {json.dumps(counts)}'.encode())
    out.write(_CHECKSUM_KEY + f'sha256:{digest.hexdigest()}"}}\n'.encode())
    return counts


def _link_unused_name(tmp: Path, directory: Path, stem: str) -> Path:
    """Give the finished file its name; link() fails rather than replace another backup."""
    for name in _names(stem):
        try:
            os.link(tmp, directory / name)
            return directory / name
        except FileExistsError:  # another run in the same second
            continue
    raise AssertionError("unreachable: _names is endless")


def _names(stem: str) -> Iterator[str]:
    """A backup's file name, then the names to try when another run took it in the same second."""
    yield f"{stem}.json"
    yield from (f"{stem}_{n}.json" for n in itertools.count(1))


def _list(path: Path, document: dict[str, Any], key: str) -> list[Any]:
    value = document.get(key)
    if not isinstance(value, list):
        raise BackupError(f"backup {path} has no {key} list")
    return value


def _record(path: Path, index: int, raw: Any, version: int) -> BackupRecord:
    fields: dict[str, Any] = {"id": int, "instance_uuid": str, "spec": str, "sha256": str,
                              "updated_at": (str, type(None)), "new_sha256": (str, type(None))}
    if version >= 2:
        fields.update(database=str, table=str)
    if (
        not isinstance(raw, dict)
        or set(raw) != set(fields)
        or any(not isinstance(raw[k], t) for k, t in fields.items())
        or isinstance(raw["id"], bool)
    ):
        raise BackupError(f"backup {path}: record {index} is malformed")
    if sha256_text(raw["spec"]) != raw["sha256"]:
        raise BackupError(f"backup {path}: record {index} (id {raw['id']}) does not match its sha256")
    record = BackupRecord(raw["id"], raw["instance_uuid"], raw["spec"], raw.get("updated_at"), raw["sha256"],
                          raw.get("new_sha256"), raw.get("database", API_DATABASE))
    if raw.get("table", record.table) != record.table:
        raise BackupError(f"backup {path}: record {index} (id {raw['id']}) names table {raw['table']!r}, "
                          f"not {record.table!r} of its database")
    return record


def _info(path: Path, document: dict[str, Any], count: int) -> BackupInfo:
    if "databases" in document:
        databases = {str(k): dict(v) for k, v in (document.get("databases") or {}).items() if isinstance(v, dict)}
    else:  # version 1: nova_api only
        databases = {API_DATABASE: dict(document.get("database") or {})}
    by_database = document.get("records_by_database")
    return BackupInfo(
        path=as_path(path),
        created_at=str(document.get("created_at", "")),
        databases=databases,
        plan_digest=str(document.get("plan_digest", "")),
        scope=dict(document.get("scope") or {}),
        record_count=count,
        records_by_database=dict(by_database) if isinstance(by_database, dict) else {API_DATABASE: count},
    )
