"""A plan saved to a file, so the tasks of one Airflow run share exactly one plan.

The plan task writes it; the approval shows its digest; each apply task reads the rows of
its id range from it. Loading recomputes the digest from the file's own rows and scope, so
a file that is not exactly the approved plan is refused. It holds no spec text: only ids,
instance uuids and the sha256 of the bytes before and after, like the Plan itself.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from nova_flavor_sync.backup import private_dir
from nova_flavor_sync.errors import BackupError
from nova_flavor_sync.plan import Plan, PlanDigest
from nova_flavor_sync.scope import Scope

FORMAT = "nova-flavor-sync-plan"
FORMAT_VERSION = 1


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


def save_plan(plan: Plan, directory: Path) -> Path:
    """Write ``plan_<digest>.json`` (0600, atomically) and return its path."""
    directory = private_dir(directory)
    path = directory / f"plan_{plan.digest}.json"
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "digest": plan.digest,
        "scope": plan.scope.as_dict(),
        "changes": [[c.id, c.instance_uuid, c.old_sha256, c.new_sha256] for c in plan.changes],
    }
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(document, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)  # same digest, same content: replacing is harmless
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BackupError(f"cannot write plan file {path}: {exc.strerror or exc}") from None
    return path


def load_plan(path: Path, *, expected_digest: str | None = None) -> SavedPlan:
    """Read a plan file; refuse it unless its rows and scope give its (and the expected) digest."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BackupError(f"plan file {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise BackupError(f"plan file {path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise BackupError(f"{path} is not a nova-flavor-sync plan file")
    if document.get("format_version") != FORMAT_VERSION:
        raise BackupError(f"plan file {path} has format version {document.get('format_version')!r}")
    try:
        scope = _scope(document["scope"])
        rows = [PlannedRow(int(i), str(u), str(o), str(n)) for i, u, o, n in document["changes"]]
    except (KeyError, TypeError, ValueError):
        raise BackupError(f"plan file {path} is malformed") from None
    digest = PlanDigest(scope)
    for row in rows:
        digest.add(row.id, row.old_sha256, row.new_sha256)
    if digest.hexdigest() != document.get("digest"):
        raise BackupError(f"plan file {path} does not match its digest: it was changed after it was written")
    if expected_digest is not None and document["digest"] != expected_digest:
        raise BackupError(
            f"plan file {path} is plan {document['digest']}, not the approved plan {expected_digest}"
        )
    return SavedPlan(document["digest"], scope, rows)


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
