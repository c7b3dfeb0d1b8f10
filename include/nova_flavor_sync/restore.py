"""Turn backup records into writes that put the backed-up bytes back (pure).

A restore is a sync with old and new swapped, applied by the same ``apply`` code: each row
is written only if it still holds what the sync wrote (``new_sha256``), or, with ``force``,
whatever it holds when the restore reads it. Either way the write is compare-and-swap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from nova_flavor_sync.apply import RowTarget
from nova_flavor_sync.backup import BackupRecord
from nova_flavor_sync.plan import RowNote
from nova_flavor_sync.spec_json import sha256_text

CurrentRows = Mapping[int, tuple[str, str, datetime | None]]  # id -> (instance_uuid, spec, updated_at)


@dataclass
class RestorePlan:
    """The rows a restore writes, and those it leaves, with the reason."""

    targets: list[RowTarget] = field(default_factory=list)
    skipped: list[RowNote] = field(default_factory=list)


def plan_restore(records: Sequence[BackupRecord], current: CurrentRows, *, force: bool = False) -> RestorePlan:
    """Decide, row by row, whether putting the backed-up spec back is safe."""
    plan = RestorePlan()
    for record in records:
        row = current.get(record.id)
        if row is None:
            plan.skipped.append(RowNote(record.id, record.instance_uuid, "row no longer exists"))
            continue
        uuid, spec, _ = row
        if uuid != record.instance_uuid:
            plan.skipped.append(
                RowNote(record.id, record.instance_uuid, f"row id now belongs to instance {uuid}")
            )
            continue
        sha = sha256_text(spec)
        if sha == record.sha256:
            plan.skipped.append(RowNote(record.id, uuid, "already holds the backed-up spec"))
        elif sha == record.new_sha256 or force:
            plan.targets.append(RowTarget(record.id, sha, record.sha256, _constant(record.spec)))
        else:
            plan.skipped.append(
                RowNote(record.id, uuid, "changed since the sync wrote it (--force restores it anyway)")
            )
    return plan


def _constant(spec: str):  # type: ignore[no-untyped-def]
    return lambda _current: spec
