"""The data a run works on: what was read (Flavor, SpecRow) and what to do (Plan).

Plain frozen dataclasses, like Alembic's ops: ``diff.make_plan`` fills a Plan, ``apply``
carries it out, ``report`` renders it. Nothing here does I/O.

A Plan does not hold spec texts: a changed row is its id, the sha256 of the bytes it was
planned from and of the bytes it will get, and a shared ``SpecDiff``. Apply re-reads the
row, checks it still has the planned bytes and rebuilds the new text, so memory does not
grow with the size of the specs, and data that changed since planning is never written.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from nova_flavor_sync.policy import RiskClass
from nova_flavor_sync.scope import Scope

PLAN_DIGEST_VERSION = "nova-flavor-sync plan v1"


@dataclass(frozen=True, slots=True)
class Flavor:
    """A row of ``flavors`` with its ``flavor_extra_specs`` (a value may be NULL)."""

    id: int
    flavorid: str
    name: str
    extra_specs: dict[str, str | None]


@dataclass(frozen=True, slots=True)
class SpecRow:
    """A row of ``request_specs``, with its instance mapping's queued_for_delete."""

    id: int
    instance_uuid: str
    spec: str
    updated_at: datetime | None = None
    queued_for_delete: bool = False


@dataclass(frozen=True, slots=True)
class KeyChange:
    """One extra spec that differs between a RequestSpec's copy and its flavor."""

    key: str
    old: str | None  # None: the flavor gained the key
    new: str | None  # None: the flavor lost the key
    risk: RiskClass

    @property
    def kind(self) -> str:
        return "added" if self.old is None else "removed" if self.new is None else "changed"


@dataclass(frozen=True, slots=True)
class SpecDiff:
    """How one flavor copy differs from its flavor; shared by every row with that copy."""

    flavor_id: int
    flavorid: str
    flavor_name: str
    applied: tuple[KeyChange, ...]  # synced by this run
    held_back: tuple[KeyChange, ...]  # risky, left as they are (see --all-keys)
    target_extra_specs: tuple[tuple[str, str], ...]  # the copy after the applied changes


@dataclass(frozen=True, slots=True)
class RowChange:
    """A row this run rewrites: from exactly ``old_sha256`` to exactly ``new_sha256``."""

    id: int
    instance_uuid: str
    old_sha256: str
    new_sha256: str
    diff: SpecDiff


@dataclass(frozen=True, slots=True)
class RowNote:
    """A row this run does not touch, and why (held back, orphan, error, queued for delete)."""

    id: int
    instance_uuid: str
    reason: str
    flavor: str = ""  # what the row's copy names, for reports
    diff: SpecDiff | None = None  # for held-back rows: what is held back


@dataclass
class Plan:
    """What a run would change, and everything it saw but will not touch."""

    scope: Scope
    changes: list[RowChange] = field(default_factory=list)
    held_back: list[RowNote] = field(default_factory=list)  # drift only in risky keys
    orphans: list[RowNote] = field(default_factory=list)  # flavor deleted or re-created
    errors: list[RowNote] = field(default_factory=list)  # unreadable rows
    queued_for_delete: list[RowNote] = field(default_factory=list)
    rows_read: int = 0
    in_sync: int = 0
    out_of_scope: int = 0  # rows outside --flavor / --instance
    digest: str = ""

    @property
    def skipped(self) -> int:
        """Rows read that this run leaves alone without an error."""
        return self.rows_read - len(self.changes) - len(self.errors)

    def summary(self) -> dict[str, Any]:
        """Counts for reports and XCom: by flavor, by key, by risk class."""
        by_flavor: Counter[str] = Counter()
        by_key: Counter[str] = Counter()
        by_risk: Counter[str] = Counter()
        held_by_key: Counter[str] = Counter()
        for change in self.changes:
            by_flavor[change.diff.flavor_name] += 1
            for key_change in change.diff.applied:
                by_key[key_change.key] += 1
                by_risk[key_change.risk.value] += 1
        for note in self.held_back + [c for c in self.changes if c.diff.held_back]:
            for key_change in note.diff.held_back:  # type: ignore[union-attr]
                held_by_key[key_change.key] += 1
        return {
            "digest": self.digest,
            "scope": self.scope.as_dict(),
            "rows_read": self.rows_read,
            "to_update": len(self.changes),
            "in_sync": self.in_sync,
            "out_of_scope": self.out_of_scope,
            "held_back_only": len(self.held_back),
            "orphans": len(self.orphans),
            "errors": len(self.errors),
            "queued_for_delete": len(self.queued_for_delete),
            "skipped": self.skipped,
            "by_flavor": dict(sorted(by_flavor.items())),
            "by_key": dict(sorted(by_key.items())),
            "by_risk": dict(sorted(by_risk.items())),
            "held_back_by_key": dict(sorted(held_by_key.items())),
        }


class PlanDigest:
    """sha256 over the scope and policy, then each change's id, old hash and new hash.

    Two plans have the same digest only if they would write the same bytes over the same
    bytes: an approval bound to a digest is bound to exactly those writes.
    """

    def __init__(self, scope: Scope) -> None:
        self._hash = hashlib.sha256(PLAN_DIGEST_VERSION.encode())
        self._hash.update(json.dumps(scope.as_dict(), sort_keys=True).encode() + b"\n")

    def add(self, row_id: int, old_sha256: str, new_sha256: str) -> None:
        self._hash.update(f"{row_id} {old_sha256} {new_sha256}\n".encode())

    def hexdigest(self) -> str:
        return self._hash.hexdigest()
