"""What a plan changes, by value: per flavor and key, ``old -> new`` and on how many copies.

The way ``terraform plan`` shows values rather than counts: 450,000 changed rows of a cloud
carry a handful of distinct changes (a flavor's ``storage_type`` went from ``nvme`` to
``ceph``), so the plan is grouped by (flavor, key, old, new, risk class, held back) and each
group counts its rows per copy (nova_api's RequestSpecs, each cell's instance copies), with a
few example instances. Pure, except ``write_changes``, which streams one line per changed key
per row to a JSON Lines file (``--export-changes``, and next to each plan file in Airflow).

Memory stays flat at any size: counts come from each plan's shared SpecDiffs
(``ChangeList.per_diff``); only the examples need the rows, read back from the spooled list
until every diff has its examples; the export streams.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO

from nova_flavor_sync.errors import BackupError, ConfigError
from nova_flavor_sync.plan import CopyPlan, KeyChange, RowNote, SpecDiff
from nova_flavor_sync.storage import StoragePath, as_path, local_path, upload

EXAMPLES = 3  # example instances kept per group
LINES_SHOWN = 20  # groups a view shows before "... and N more lines"
VALUE_SHOWN = 60  # characters of a value shown; the export and the plan view's instances have all

# What a line of the export says about its row (``status``).
CHANGE, HELD_BACK, ORPHAN, LEFT_ALONE, ERROR = "change", "held_back", "orphan", "left_alone", "error"
UNTOUCHED = {"orphans": ORPHAN, "left_alone": LEFT_ALONE, "errors": ERROR}  # Plan list -> status


@dataclass(frozen=True, slots=True)
class ValueChange:
    """One distinct change of one key of one flavor's copies: a line of the grouped plan."""

    flavor: str
    key: str
    old: str | None  # None: the copy lacks the key (added)
    new: str | None  # None: the flavor lost the key (removed)
    risk: str
    held_back: bool = False  # a placement key left as it is (see --all-keys)

    @property
    def kind(self) -> str:
        return "added" if self.old is None else "removed" if self.new is None else "changed"

    def shown(self, limit: int = VALUE_SHOWN) -> str:
        """``"nvme" -> "ceph"``, ``added "x"``, ``removed (was "x")``; each value capped and quoted."""
        if self.old is None:
            return f"added {shown_value(self.new, limit)}"
        if self.new is None:
            return f"removed (was {shown_value(self.old, limit)})"
        return f"{shown_value(self.old, limit)} -> {shown_value(self.new, limit)}"


def shown_value(value: str | None, limit: int = VALUE_SHOWN) -> str:
    """A value as people read it: JSON-quoted (control characters escaped), cut to ``limit`` with an ellipsis."""
    if value is None:
        return "(absent)"
    cut = value if len(value) <= limit else value[: limit - 1] + "\u2026"
    return json.dumps(cut, ensure_ascii=False)


@dataclass
class ValueGroup:
    """A ValueChange, how many rows it has in each copy (by where), and a few of their instances."""

    change: ValueChange
    counts: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (XCom): the change's fields, ``counts`` by where, ``examples``."""
        return {**asdict(self.change), "counts": dict(self.counts), "examples": list(self.examples)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ValueGroup:
        change = ValueChange(raw["flavor"], raw["key"], raw["old"], raw["new"], raw["risk"], bool(raw["held_back"]))
        return cls(change, Counter(raw["counts"]), list(raw.get("examples") or ()))


class ValueChanges:
    """The groups of a plan (or of several copies' plans), built by ``add``; ``groups()`` in display order."""

    def __init__(self, examples: int = EXAMPLES) -> None:
        self._groups: dict[ValueChange, ValueGroup] = {}
        self._examples = examples

    def add(self, change: ValueChange, where: str, count: int = 1, instances: Iterable[str] = ()) -> None:
        group = self._groups.get(change)
        if group is None:
            group = self._groups[change] = ValueGroup(change)
        group.counts[where] += count
        room = self._examples - len(group.examples)
        if room > 0:
            group.examples += [uuid for uuid in instances if uuid not in group.examples][:room]

    def add_group(self, group: ValueGroup) -> None:
        """Merge a group made elsewhere (another copy's XCom, say)."""
        for where, count in group.counts.items():
            self.add(group.change, where, count, group.examples)

    def groups(self) -> list[ValueGroup]:
        """Written changes first, the most rows first (what a capped view keeps), then held-back ones."""
        return sorted(self._groups.values(), key=_display_order)

    def __len__(self) -> int:
        return len(self._groups)


def _display_order(group: ValueGroup) -> tuple:
    change = group.change
    return (change.held_back, -group.total, change.flavor, change.key, change.old or "", change.new or "")


def _key_changes(diff: SpecDiff) -> Iterator[tuple[KeyChange, bool]]:
    """Each key change of a diff, and whether it is held back."""
    for change in diff.applied:
        yield change, False
    for change in diff.held_back:
        yield change, True


def _value_change(diff: SpecDiff, change: KeyChange, held_back: bool) -> ValueChange:
    return ValueChange(diff.flavor_name, change.key, change.old, change.new, change.risk.value, held_back)


def group_copies(copies: Iterable[CopyPlan], *, examples: int = EXAMPLES) -> ValueChanges:
    """The value changes of each copy's plan: rows changed (applied and held-back keys) and rows held back.

    Counts come from the shared SpecDiffs; the rows are read only for the examples, and only
    until every diff has ``examples`` of them.
    """
    grouped = ValueChanges(examples)
    for copy in copies:
        where, changes = copy.where, copy.plan.changes
        wanted: dict[int, list[str]] = {}
        for diff, rows in changes.per_diff():
            wanted[id(diff)] = []
            for key_change, held in _key_changes(diff):
                grouped.add(_value_change(diff, key_change, held), where, rows)
        missing = sum(min(examples, rows) for _, rows in changes.per_diff())
        if missing:
            for row in changes:
                found = wanted[id(row.diff)]
                if len(found) < examples:
                    found.append(row.instance_uuid)
                    missing -= 1
                    if not missing:
                        break
        for diff, _ in changes.per_diff():
            for key_change, held in _key_changes(diff):
                grouped.add(_value_change(diff, key_change, held), where, 0, wanted[id(diff)])
        for note in copy.plan.held_back:
            assert note.diff is not None
            for key_change in note.diff.held_back:
                grouped.add(_value_change(note.diff, key_change, True), where, 1, (note.instance_uuid,))
    return grouped


def group_records(records: Iterable[Mapping[str, Any]], *, examples: int = EXAMPLES) -> ValueChanges:
    """The same groups from export lines (``change_records``, as written by ``write_changes``)."""
    grouped = ValueChanges(examples)
    for record in records:
        if record["status"] in (CHANGE, HELD_BACK):
            grouped.add(record_change(record), record["copy"], 1, (record["instance"],))
    return grouped


def record_change(record: Mapping[str, Any]) -> ValueChange:
    """The ValueChange of an export line that changes a key."""
    return ValueChange(record["flavor"], record["key"], record["old"], record["new"], record["risk"],
                       record["status"] == HELD_BACK)


def change_records(copy: CopyPlan) -> Iterator[dict[str, Any]]:
    """One record per changed key per row of a copy's plan, then its untouched rows, in plan order.

    ``status``: ``change`` (written), ``held_back`` (a placement key left as it is), ``orphan``,
    ``left_alone``, ``error`` (these three with ``reason``, no key).
    """
    where = copy.where
    for row in copy.plan.changes:
        for key_change, held in _key_changes(row.diff):
            yield _record(where, row.id, row.instance_uuid, row.diff.flavor_name, key_change, held)
    for note in copy.plan.held_back:
        assert note.diff is not None
        for key_change in note.diff.held_back:
            yield _record(where, note.id, note.instance_uuid, note.diff.flavor_name, key_change, True)
    for kind, status in UNTOUCHED.items():
        for note in getattr(copy.plan, kind):
            yield _untouched(where, note, status)


def _record(where: str, row_id: int, uuid: str, flavor: str, change: KeyChange, held: bool) -> dict[str, Any]:
    return {"instance": uuid, "copy": where, "row": row_id, "flavor": flavor, "key": change.key, "old": change.old,
            "new": change.new, "risk": change.risk.value, "status": HELD_BACK if held else CHANGE, "reason": None}


def _untouched(where: str, note: RowNote, status: str) -> dict[str, Any]:
    return {"instance": note.instance_uuid, "copy": where, "row": note.id, "flavor": note.flavor, "key": None,
            "old": None, "new": None, "risk": None, "status": status, "reason": note.reason}


def write_changes(copies: Sequence[CopyPlan], path: StoragePath) -> StoragePath:
    """Write every copy's ``change_records`` to ``path`` as JSON Lines (0600, atomically), streaming.

    The file's directory must exist; a file already there is replaced. On object storage: one
    upload (see storage).
    """
    path = as_path(path)
    if local_path(path) is None:
        try:
            upload(lambda out: _write_records(out, copies), [path], replace=True)
        except Exception as exc:  # the file system's own errors (s3fs, botocore: credentials, endpoint, bucket)
            raise ConfigError(f"cannot write the changes file {path}: {exc}") from None
        return path
    path = local_path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            _write_records(out, copies)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write the changes file {path}: {exc.strerror or exc}") from None
    return path


def _write_records(out: BinaryIO, copies: Sequence[CopyPlan]) -> None:
    for copy in copies:
        for record in change_records(copy):
            out.write((json.dumps(record, ensure_ascii=False) + "\n").encode())


def read_changes(path: StoragePath) -> Iterator[dict[str, Any]]:
    """The records of a changes file, one at a time."""
    try:
        with as_path(path).open("rb") as lines:
            for line in lines:
                yield json.loads(line)
    except FileNotFoundError:
        raise BackupError(f"changes file {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise BackupError(f"changes file {path} cannot be read: {exc}") from None


def short_where(where: str) -> str:
    """``cell1 (835ce9b0-...)`` -> ``cell1``; ``nova_api`` as it is."""
    return where.split(" (", 1)[0]


def group_lines(groups: Sequence[ValueGroup], *, limit: int | None = LINES_SHOWN, more: str = "") -> list[str]:
    """Text lines: ``c5.large: storage_type "nvme" -> "ceph" [scheduling]: 69 (nova_api 61, cell1 8)``.

    At most ``limit`` lines (None: all), then ``... and N more lines: see <more>``.
    """
    shown = groups if limit is None else groups[:limit]
    lines = []
    for group in shown:
        change = group.change
        held = ", held back" if change.held_back else ""
        per_copy = ", ".join(f"{short_where(where)} {count}" for where, count in group.counts.items() if count)
        lines.append(f"{change.flavor}: {change.key} {change.shown()} [{change.risk}{held}]: "
                     f"{group.total} ({per_copy})")
    if len(groups) > len(shown):
        lines.append(f"... and {len(groups) - len(shown)} more lines" + (f": see {more}" if more else ""))
    return lines


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~&\"'=:])")


def markdown_text(text: str) -> str:
    """``text`` as literal Markdown: every ASCII punctuation that Markdown (or HTML in it) could read is
    backslash-escaped (CommonMark allows that for any ASCII punctuation), line breaks become spaces."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(text.splitlines()))
