"""A plan saved to a file, so the tasks of one Airflow run share exactly one plan.

The plan task writes it; the approval shows its digest; each apply task reads the rows of
its id range from it. Loading recomputes the digest from the file's own rows and scope, so
a file that is not exactly the approved plan is refused. It holds no spec text: only ids,
instance uuids and the sha256 of the bytes before and after, like the Plan itself.

JSON Lines, so that neither side holds the whole plan: a header object, then one
``[id, instance_uuid, old_sha256, new_sha256]`` array per changed row, in id order. At a
million rows a plan can have 450,000 changes (about 70 MB); every apply task checks the
digest over all of them but keeps only the rows of its own id range.
"""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import orjson

from nova_flavor_sync.backup import private_dir
from nova_flavor_sync.errors import BackupError
from nova_flavor_sync.plan import Plan, PlanDigest
from nova_flavor_sync.scope import Scope
from nova_flavor_sync.storage import StoragePath, as_path, local_path, upload

FORMAT = "nova-flavor-sync-plan"
FORMAT_VERSION = 2


@dataclass(frozen=True)
class PlannedRow:
    id: int
    instance_uuid: str
    old_sha256: str
    new_sha256: str


@dataclass(frozen=True)
class SavedPlan:
    digest: str
    scope: Scope
    changes: list[PlannedRow]  # named like Plan.changes: back_up and apply take either


def save_plan(plan: Plan, directory: StoragePath) -> StoragePath:
    """Write ``plan_<digest>.json`` (0600, atomically; on object storage one upload) and return its path."""
    directory = private_dir(directory)
    path = directory / f"plan_{plan.digest}.json"
    if local_path(directory) is None:
        try:  # same digest, same content: replacing is harmless
            upload(lambda out: _write_plan(out, plan), [path], replace=True)
        except Exception as exc:  # the file system's own errors (s3fs, botocore: credentials, endpoint, bucket)
            raise BackupError(f"cannot write plan file {path}: {exc}") from None
        return path
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            _write_plan(out, plan)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)  # same digest, same content: replacing is harmless
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BackupError(f"cannot write plan file {path}: {exc.strerror or exc}") from None
    return path


def _write_plan(out: BinaryIO, plan: Plan) -> None:
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "digest": plan.digest,
        "scope": plan.scope.as_dict(),
        "changes": len(plan.changes),
    }
    out.write(json.dumps(header).encode() + b"\n")
    for c in plan.changes:
        out.write(json.dumps([c.id, c.instance_uuid, c.old_sha256, c.new_sha256]).encode() + b"\n")


def load_plan(
    path: StoragePath,
    *,
    expected_digest: str | None = None,
    first_id: int | None = None,
    last_id: int | None = None,
) -> SavedPlan:
    """Read a plan file; refuse it unless its rows and scope give its (and the expected) digest.

    With ``first_id``/``last_id``, only the rows in that id range are kept (all are checked).
    """
    low = first_id if first_id is not None else -1
    high = last_id if last_id is not None else float("inf")
    rows: list[PlannedRow] = []

    def keep(row_id: int, uuid: str, old: str, new: str) -> None:
        if low <= row_id <= high:
            rows.append(PlannedRow(row_id, uuid, old, new))

    digest, scope = _read(path, keep, expected_digest)
    return SavedPlan(digest, scope, rows)


def load_plan_ids(path: StoragePath) -> array[int]:
    """The ids of a plan file's rows, in order (checked like load_plan; 8 bytes a row)."""
    ids: array[int] = array("q")
    _read(path, lambda row_id, *_: ids.append(row_id), None)
    return ids


def _read(
    path: StoragePath, on_row: Callable[[int, str, str, str], None], expected_digest: str | None
) -> tuple[str, Scope]:
    try:
        with as_path(path).open("rb") as lines:
            header = _header(path, lines.readline())
            scope = _scope(header["scope"])
            digest = PlanDigest(scope)
            count = 0
            for line in lines:
                row_id, uuid, old, new = orjson.loads(line)
                if not all(isinstance(v, t) for v, t in ((row_id, int), (uuid, str), (old, str), (new, str))):
                    raise TypeError
                digest.add(row_id, old, new)
                count += 1
                on_row(row_id, uuid, old, new)
    except FileNotFoundError:
        raise BackupError(f"plan file {path} does not exist") from None
    except OSError as exc:
        raise BackupError(f"plan file {path} cannot be read: {exc.strerror or exc}") from None
    except (KeyError, TypeError, ValueError):
        raise BackupError(f"plan file {path} is malformed") from None
    if digest.hexdigest() != header.get("digest") or count != header.get("changes"):
        raise BackupError(f"plan file {path} does not match its digest: it was changed after it was written")
    if expected_digest is not None and header["digest"] != expected_digest:
        raise BackupError(f"plan file {path} is plan {header['digest']}, not the approved plan {expected_digest}")
    return header["digest"], scope


def _header(path: StoragePath, line: bytes) -> dict:
    try:
        header = orjson.loads(line)
    except orjson.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise BackupError(f"{path} is not a nova-flavor-sync plan file")
    if header.get("format_version") != FORMAT_VERSION:
        raise BackupError(
            f"plan file {path} has format version {header.get('format_version')!r}; this tool reads "
            f"version {FORMAT_VERSION}: make the plan again"
        )
    return header


def _scope(raw: dict) -> Scope:
    def frozen(value, kind):
        return None if value is None else frozenset(kind(v) for v in value)

    return Scope(
        flavor_ids=frozen(raw["flavor_ids"], int),
        flavorids=frozen(raw.get("flavorids"), str),
        instance_uuids=frozen(raw["instance_uuids"], str),
        key_prefixes=tuple(raw["key_prefixes"]),
        all_keys=bool(raw["all_keys"]),
    )
