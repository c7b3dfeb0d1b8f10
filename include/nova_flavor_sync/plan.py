"""The data a run works on: the rows read (SpecRow) and what to do with them (Plan).

Plain frozen dataclasses, like Alembic's ops: ``diff.make_plan`` fills a Plan, ``apply``
carries it out, ``report`` renders it. A big plan's per-row lists, its changes (ChangeList)
and the rows it does not touch (NoteList), go to temporary files (``spool.SpoolFile``) so
memory stays flat; the rest is data and logic.

A Plan does not hold spec texts: a changed row is its id, the sha256 of the bytes it was
planned from and of the bytes it will get, and a shared ``SpecDiff``. Apply re-reads the
row, checks it still has the planned bytes and rebuilds the new text, so memory does not
grow with the size of the specs, and data that changed since planning is never written.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import struct
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Any, ClassVar, Generic, TypeVar

from nova_flavor_sync.policy import RiskClass
from nova_flavor_sync.scope import Scope
from nova_flavor_sync.spool import Chunk, SpoolFile

PLAN_DIGEST_VERSION = "nova-flavor-sync plan v2"
T = TypeVar("T")
R = TypeVar("R")  # the rows of a plan's spooled list: RowChange or RowNote


@dataclass(frozen=True, slots=True)
class SpecRow:
    """A row holding a flavor copy (``request_specs`` or ``instance_extra``), as read.

    ``spec`` is the JSON text of the copy's column. ``left_alone`` says why the row must not
    be written whatever its copy says (its instance is queued for delete, deleted, or in the
    middle of a resize or migration); empty for a row the planner may judge.
    """

    id: int
    instance_uuid: str
    spec: str
    updated_at: str | None = None  # as the server writes it (db.UPDATED_AT_TEXT), when read
    left_alone: str = ""


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

    def planned_from(self) -> tuple[int, str, dict[str, str]]:
        """The copy this diff was made from, as ``spec_json.rewrite_extra_specs`` checks it: its
        flavor id, flavorid and extra specs (the target with the applied changes undone)."""
        specs = dict(self.target_extra_specs)
        for change in self.applied:
            if change.old is None:
                specs.pop(change.key, None)
            else:
                specs[change.key] = change.old
        return self.flavor_id, self.flavorid, specs


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
    """A row this run does not touch, and why (held back, orphan, error, left alone)."""

    id: int
    instance_uuid: str
    reason: str
    flavor: str = ""  # what the row's copy names, for reports
    diff: SpecDiff | None = None  # for held-back rows: what is held back


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` (a ChangeList, say) in lists of ``size``, in order (itertools.batched in 3.12)."""
    rows = iter(items)
    while batch := list(islice(rows, size)):
        yield batch


class _SpooledRows(Generic[R]):
    """A plan's list of rows: in memory while few, then spooled (``spool.SpoolFile``).

    A million-row cloud can have hundreds of thousands of rows to change or to leave alone;
    holding an object for each would make memory grow with the table. Past
    ``keep_in_memory`` rows, each is stored as a small record in a SpoolFile, and the
    SpecDiffs the rows share once, here, by index. Iterating reads the file back in chunks.
    A subclass says how a row becomes a record (``_HEAD``, ``_record``) and back (``_rows_of``).

    Merging plans (``_adopt``) takes another list's spool file whole, with the SpecDiffs its
    records index: a merged list's rows are its adopted parts', in order, then its own.
    """

    _HEAD: ClassVar[struct.Struct]  # a record's head; its last field is the length of its tail
    _SPOOL_NAME: ClassVar[str]  # names the spool file
    _UUID_LENGTH: ClassVar[int]  # which field of a record (Chunk: its start first) is the length of
    # its instance uuid, which every tail starts with

    def __init__(self, keep_in_memory: int = 2000, *, spool_dir: str | None = None) -> None:
        self._keep = keep_in_memory
        # With spool_dir, the file has a name there, so that a plan worker's list can be
        # pickled as that name and adopted by the parent process (see plan_worker).
        self._spool_dir = spool_dir
        self._rows: list[R] = []
        self._file: SpoolFile | None = None
        self._count = 0
        self._diffs: list[SpecDiff] = []
        self._diff_index: dict[int, int] = {}
        self._per_diff: list[int] = []
        # Rows that come before this list's own (_rows or _file), in order: spool files taken
        # from other lists, each with the SpecDiffs its records index (see _adopt).
        self._adopted: list[tuple[SpoolFile, list[SpecDiff]]] = []

    def append(self, row: R) -> None:
        self._count += 1
        self._counted(row)
        if self._file is None:
            self._rows.append(row)
            if len(self._rows) > self._keep:
                self._open_spool()
            return
        self._file.append(self._record(row))

    def instance_uuids(self) -> Iterator[bytes]:
        """Each row's instance uuid (ASCII), in order; cheaper than the rows themselves."""
        size, length = self._HEAD.size, self._UUID_LENGTH
        for spool, _ in self._spooled_parts():
            for buffer, records in spool.chunks():
                for record in records:
                    yield buffer[record[0] + size : record[0] + size + record[length]]
        if self._file is None:
            yield from (row.instance_uuid.encode() for row in list(self._rows))  # type: ignore[attr-defined]

    def _spooled_parts(self) -> list[tuple[SpoolFile, list[SpecDiff]]]:
        """Every spool file of this list, in order, with the SpecDiffs its records index (its
        own rows in memory, if they are, come after all of them)."""
        own = [(self._file, self._diffs)] if self._file is not None else []
        return self._adopted + own

    def _adopt(self, other: _SpooledRows[R]) -> None:
        """Take every row of ``other`` after this list's, in order, and leave ``other`` empty.

        Spooled rows stay in their file, read later with the SpecDiffs they index: copying
        each record, its diff index translated, cost the parent of the plan workers about
        1.3 µs a change, most of its work where nearly every row changes. Rows in memory (a
        small list: fewer than its ``keep_in_memory``) are appended one by one.
        """
        if other._file is None and not other._adopted:
            for row in other._rows:
                self.append(row)
        else:
            self._count_diffs_of(other)
            self._adopting(other)
            for rows in (self, other):  # every row in a file, in order: this list's, then other's
                if rows._file is None and rows._rows:
                    rows._open_spool()
            self._adopted = self._spooled_parts() + other._spooled_parts()
            self._file = None
            self._count += other._count
        other._adopted, other._file, other._rows, other._count = [], None, [], 0

    def _adopting(self, other: _SpooledRows[R]) -> None:
        """Count ``other``'s rows as ``_counted`` counts each appended row (what per_diff does not)."""

    def per_diff(self) -> list[tuple[SpecDiff, int]]:
        """Each distinct SpecDiff and how many rows share it."""
        return list(zip(self._diffs, self._per_diff, strict=True))

    def _counted(self, row: R) -> None:
        """Count a row as it is appended (by its SpecDiff, ...)."""

    def _index_of(self, diff: SpecDiff, rows: int = 1) -> int:
        """The index of ``diff`` in this list, which now has ``rows`` more rows that share it."""
        index = self._diff_index.get(id(diff))
        if index is None:
            index = self._diff_index[id(diff)] = len(self._diffs)
            self._diffs.append(diff)
            self._per_diff.append(0)
        self._per_diff[index] += rows
        return index

    def _count_diffs_of(self, other: _SpooledRows[R]) -> None:
        """Count ``other``'s SpecDiffs, and how many of its rows share each, in this list's ``per_diff``."""
        for diff, count in zip(other._diffs, other._per_diff, strict=True):
            self._index_of(diff, count)

    def _open_spool(self) -> None:
        """From now on the rows are in a file: those in memory first."""
        self._file = SpoolFile(self._HEAD, directory=self._spool_dir, name=self._SPOOL_NAME)
        self._file.extend(self._record(row) for row in self._rows)
        self._rows = []

    def _record(self, row: R) -> bytes:
        raise NotImplementedError

    def _rows_of(self, chunk: Chunk, diffs: list[SpecDiff]) -> Iterator[R]:
        """The rows of a chunk of spooled records, whose diff indexes are into ``diffs``."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[R]:
        for spool, diffs in self._spooled_parts():
            for chunk in spool.chunks():
                yield from self._rows_of(chunk, diffs)
        if self._file is None:
            yield from list(self._rows)

    def __getitem__(self, index: int | slice) -> Any:
        """For reports, tests and small plans: a slice from the start reads only as far as it goes."""
        if (isinstance(index, slice) and (index.start or 0) >= 0 and index.stop is not None and index.stop >= 0
                and (index.step or 1) > 0):
            return list(islice(self, index.start, index.stop, index.step))
        return list(self)[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _SpooledRows | list | tuple):
            return list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._count} rows)"

    def close(self) -> None:
        for spool, _ in self._spooled_parts():
            spool.close()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        # ids of the diffs changed with the objects: index them again
        self._diff_index = {id(diff): i for i, diff in enumerate(self._diffs)}


_UUID_CHARACTERS = 36  # of an instance uuid as Nova writes it (8-4-4-4-12 hex digits)


class ChangeList(_SpooledRows[RowChange]):
    """A plan's changed rows in id order; spooled, each a 77-byte record plus its instance uuid."""

    # id, old sha256, new sha256, diff index, uuid length: its first bytes are the change as
    # PlanDigest hashes it (CHANGE_KEY), so that merging hashes a slice of each record
    _HEAD = struct.Struct("<q32s32sIB")
    _SPOOL_NAME = "changes"
    _UUID_LENGTH = 5

    def _counted(self, change: RowChange) -> None:
        self._index_of(change.diff)

    def _record(self, change: RowChange) -> bytes:
        uuid = change.instance_uuid.encode("utf-8")
        index = self._diff_index[id(change.diff)]
        head = self._HEAD.pack(
            change.id, bytes.fromhex(change.old_sha256), bytes.fromhex(change.new_sha256), index, len(uuid)
        )
        return head + uuid

    def _rows_of(self, chunk: Chunk, diffs: list[SpecDiff]) -> Iterator[RowChange]:
        buffer, records = chunk
        size = self._HEAD.size
        for at, row_id, old, new, index, uuid_len in records:
            uuid = buffer[at + size : at + size + uuid_len].decode("utf-8")
            yield RowChange(row_id, uuid, old.hex(), new.hex(), diffs[index])

    def extend_from(self, other: ChangeList, digest: PlanDigest | None = None) -> None:
        """Append every change of ``other``, in order (adding each to ``digest``), and leave
        ``other`` empty: what merging plans does. Its spool file becomes this list's (``_adopt``);
        the digest hashes a slice of each record, without making a RowChange of it."""
        if digest is not None:
            for spool, _ in other._spooled_parts():
                for keys in self._keys_of(spool):
                    digest.add_keys(keys)
            for change in other._rows:  # rows still in memory (a list that has spooled has none)
                digest.add(change.id, change.old_sha256, change.new_sha256)
        self._adopt(other)

    def _keys_of(self, spool: SpoolFile) -> Iterator[bytes]:
        """Each change of a spool file as PlanDigest hashes it (CHANGE_KEY), in order,
        concatenated a block at a time.

        Where every instance uuid has 36 characters, as every uuid Nova makes, the records
        have one length: they are sliced where they start, without reading each record's head
        (a fifth of the time). The uuid lengths, every record's last head byte, say whether a
        block is such records; from the first block that is not, each head is read.
        """
        size, key = self._HEAD.size + _UUID_CHARACTERS, CHANGE_KEY.size
        lengths, nova_lengths = slice(self._HEAD.size - 1, None, size), bytes([_UUID_CHARACTERS])
        done = 0  # bytes sliced: whole records, so the next one starts there
        for block in spool.blocks(size * 8192):
            if len(block) % size or block[lengths] != nova_lengths * (len(block) // size):
                break
            yield b"".join([block[at : at + key] for at in range(0, len(block), size)])
            done += len(block)
        else:
            return
        for buffer, records in spool.chunks(done):
            yield b"".join([buffer[record[0] : record[0] + key] for record in records])


class NoteList(_SpooledRows[RowNote]):
    """A plan's rows that it does not touch, each with why, in id order; spooled like changes.

    A record is the row id, its SpecDiff's index (held-back rows have one), and the instance
    uuid, the flavor label and the reason as text. With ``count_reasons`` the count of each
    reason is kept as notes are appended, so that summaries never read the notes back to
    count them (the rows left alone: a few reasons, counted in every summary); not where
    reasons are as many as the notes (an unreadable row's names where its JSON breaks).
    """

    _HEAD = struct.Struct("<qIHHI")  # id, diff index, uuid length, flavor length, length of all three texts
    _SPOOL_NAME = "notes"
    _UUID_LENGTH = 3
    _NO_DIFF = 0xFFFFFFFF

    def __init__(
        self, keep_in_memory: int = 2000, *, spool_dir: str | None = None, count_reasons: bool = False
    ) -> None:
        super().__init__(keep_in_memory, spool_dir=spool_dir)
        self._by_reason: Counter[str] | None = Counter() if count_reasons else None

    def count_by_reason(self) -> Counter[str]:
        """How many notes give each reason."""
        if self._by_reason is None:
            return Counter(note.reason for note in self)
        return Counter(self._by_reason)

    def _counted(self, note: RowNote) -> None:
        if self._by_reason is not None:
            self._by_reason[note.reason] += 1
        if note.diff is not None:
            self._index_of(note.diff)

    def _record(self, note: RowNote) -> bytes:
        uuid, flavor = note.instance_uuid.encode("utf-8"), note.flavor.encode("utf-8")
        texts = uuid + flavor + note.reason.encode("utf-8")
        index = self._NO_DIFF if note.diff is None else self._diff_index[id(note.diff)]
        return self._HEAD.pack(note.id, index, len(uuid), len(flavor), len(texts)) + texts

    def _rows_of(self, chunk: Chunk, diffs: list[SpecDiff]) -> Iterator[RowNote]:
        buffer, records = chunk
        size = self._HEAD.size
        for at, row_id, index, uuid_len, flavor_len, texts_len in records:
            texts = buffer[at + size : at + size + texts_len]  # lengths count UTF-8 bytes
            uuid = texts[:uuid_len].decode("utf-8")
            flavor = texts[uuid_len : uuid_len + flavor_len].decode("utf-8")
            reason = texts[uuid_len + flavor_len :].decode("utf-8")
            yield RowNote(row_id, uuid, reason, flavor, None if index == self._NO_DIFF else diffs[index])

    def extend(self, other: Iterable[RowNote]) -> None:
        """Append every note of ``other``, in order: what merging plans does (a NoteList is
        left empty, its spool file now this list's: ``_adopt``)."""
        if isinstance(other, NoteList):
            self._adopt(other)
        else:
            for note in other:
                self.append(note)

    def _adopting(self, other: _SpooledRows[RowNote]) -> None:
        if self._by_reason is not None:
            assert isinstance(other, NoteList)
            self._by_reason.update(other.count_by_reason())


@dataclass
class Plan:
    """What a run would change, and everything it saw but will not touch."""

    scope: Scope
    changes: ChangeList = field(default_factory=ChangeList)
    held_back: NoteList = field(default_factory=NoteList)  # drift only in risky keys
    orphans: NoteList = field(default_factory=NoteList)  # flavor deleted or re-created
    errors: NoteList = field(default_factory=NoteList)  # unreadable rows
    # its instance is busy, deleted, queued for delete
    left_alone: NoteList = field(default_factory=lambda: NoteList(count_reasons=True))
    rows_read: int = 0
    in_sync: int = 0
    out_of_scope: int = 0  # rows outside --flavor / --instance
    digest: str = ""

    @property
    def notes(self) -> tuple[NoteList, ...]:
        """The lists of rows the plan does not touch: left alone, orphans, errors, held back."""
        return self.left_alone, self.orphans, self.errors, self.held_back

    def spec_diffs(self) -> Iterator[SpecDiff]:
        """Every SpecDiff the plan's rows refer to (once per list that has it)."""
        for rows in (self.changes, *self.notes):
            yield from rows._diffs

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
        for diff, rows in self.changes.per_diff():
            by_flavor[diff.flavor_name] += rows
            for key_change in diff.applied:
                by_key[key_change.key] += rows
                by_risk[key_change.risk.value] += rows
            for key_change in diff.held_back:
                held_by_key[key_change.key] += rows
        for diff, rows in self.held_back.per_diff():  # every held-back note has its SpecDiff
            for key_change in diff.held_back:
                held_by_key[key_change.key] += rows
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
            "left_alone": len(self.left_alone),
            "left_alone_by_reason": dict(sorted(self.left_alone.count_by_reason().items())),
            "skipped": self.skipped,
            "by_flavor": dict(sorted(by_flavor.items())),
            "by_key": dict(sorted(by_key.items())),
            "by_risk": dict(sorted(by_risk.items())),
            "held_back_by_key": dict(sorted(held_by_key.items())),
        }


# A change as PlanDigest hashes it: the row id, the sha256 of the bytes it was planned from,
# the sha256 of the bytes it will get (binary: a ChangeList record starts with it).
CHANGE_KEY = struct.Struct("<q32s32s")


class PlanDigest:
    """sha256 over the scope and policy, then each change's id, old hash and new hash (CHANGE_KEY).

    Two plans have the same digest only if they would write the same bytes over the same
    bytes: an approval bound to a digest is bound to exactly those writes.
    """

    def __init__(self, scope: Scope) -> None:
        self._hash = hashlib.sha256(PLAN_DIGEST_VERSION.encode())
        self._hash.update(json.dumps(scope.as_dict(), sort_keys=True).encode() + b"\n")

    def add(self, row_id: int, old_sha256: str, new_sha256: str) -> None:
        self._hash.update(CHANGE_KEY.pack(row_id, bytes.fromhex(old_sha256), bytes.fromhex(new_sha256)))

    def add_keys(self, keys: bytes) -> None:
        """Many changes at once: each packed as CHANGE_KEY, concatenated."""
        self._hash.update(keys)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


# What a CloudPlan's digest covers; bump when that changes.
BOTH_COPIES_DIGEST_VERSION = "nova-flavor-sync both copies v1"


def cloud_digest(parts: Iterable[tuple[str, str]]) -> str:
    """The digest a run's approval binds: over each copy's key and plan digest, in plan order.

    Each copy's own digest covers the scope and every change of that copy (PlanDigest), so
    this one binds every write of the run, in every database.
    """
    digest = hashlib.sha256(BOTH_COPIES_DIGEST_VERSION.encode())
    for key, part in parts:
        digest.update(f"{key} {part}\n".encode())
    return digest.hexdigest()


@dataclass
class CopyPlan:
    """The plan for the flavor copies of one database: nova_api's RequestSpecs or one cell's instances."""

    where: str  # "nova_api", or the cell as messages name it: "cell1 (835ce9b0-...)"
    cell_uuid: str | None  # None: the RequestSpecs in nova_api
    plan: Plan

    @property
    def what(self) -> str:
        return "RequestSpecs" if self.cell_uuid is None else "Instance copies"

    @property
    def rows_named(self) -> str:
        """How reports name its rows: ``request specs``, ``instance copies in cell1 (<uuid>)``."""
        return "request specs" if self.cell_uuid is None else f"instance copies in {self.where}"

    @property
    def key(self) -> str:
        """Which database: ``nova_api``, or the cell's uuid (as backups name it)."""
        return self.cell_uuid or "nova_api"


# How many instance uuids CloudPlan.disagreement holds at once (about 10 MB).
UUIDS_AT_ONCE = 100_000
_STALE_IN_NOVA_API, _STALE_IN_A_CELL, _NOTED = 0, 1, 2  # what a uuid record of disagreement says
_UUID_RECORD = struct.Struct("<BB")  # a share's record (spool.SpoolFile): the kind, the uuid's length


@dataclass(frozen=True)
class Disagreement:
    """How many instances have copies that disagree, and the first ``instances`` of them by uuid."""

    count: int
    instances: list[str]


@dataclass
class CloudPlan:
    """Both copies of every instance: the RequestSpecs' plan and each cell's, under one digest.

    ``never_written``: cells whose instances are counted, never written (cell0: instances that
    never scheduled), with their instance counts.
    """

    scope: Scope
    copies: list[CopyPlan]
    never_written: dict[str, int] = field(default_factory=dict)
    digest: str = ""

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = cloud_digest((copy.key, copy.plan.digest) for copy in self.copies)

    @property
    def to_update(self) -> int:
        return sum(len(copy.plan.changes) for copy in self.copies)

    def disagreement(self, sample: int | None = 5) -> Disagreement:
        """Instances stale in one copy and not in the other (e.g. after a run stopped between the two writes).

        Only instances planned in both (not left alone, orphaned or unreadable in either)
        count. ``sample``: how many of them to name, the first in uuid order (None: all).
        Memory stays flat: the lists are read once, and a plan of more than UUIDS_AT_ONCE
        such rows is compared a share of the instances at a time (by their uuids' CRC-32),
        each share's uuids spooled to a file of its own (``spool.SpoolFile``) as they are read.
        """
        rows = sum(len(rows) for copy in self.copies for rows in (copy.plan.changes, *copy.plan.notes))
        shares = max(1, -(-rows // UUIDS_AT_ONCE))
        count, named = 0, []
        for share in self._uuids_by_share(shares):
            stale: dict[bool, set[bytes]] = {True: set(), False: set()}
            noted: set[bytes] = set()
            for kind, uuid in share:
                (noted if kind == _NOTED else stale[kind == _STALE_IN_NOVA_API]).add(uuid)
            one_sided = (stale[True] ^ stale[False]) - noted
            count += len(one_sided)
            named = [*named, *one_sided] if sample is None else heapq.nsmallest(sample, chain(named, one_sided))
        return Disagreement(count, sorted(uuid.decode() for uuid in named))

    def _uuids_by_share(self, shares: int) -> Iterator[Iterable[tuple[int, bytes]]]:
        """Each share's (kind, uuid) of every row of every copy's plan: stale in nova_api, stale in
        a cell, or noted (left alone, orphaned, unreadable, held back); one share: read as it goes."""
        every = chain.from_iterable(
            chain(((_STALE_IN_NOVA_API if copy.cell_uuid is None else _STALE_IN_A_CELL, uuid)
                   for uuid in copy.plan.changes.instance_uuids()),
                  ((_NOTED, uuid) for notes in copy.plan.notes for uuid in notes.instance_uuids()))
            for copy in self.copies
        )
        if shares == 1:
            yield every
            return
        files = [SpoolFile(_UUID_RECORD, name="uuids") for _ in range(shares)]
        try:
            for kind, uuid in every:
                files[zlib.crc32(uuid) % shares].append(_UUID_RECORD.pack(kind, len(uuid)) + uuid)
            for file in files:
                yield ((kind, buffer[at + _UUID_RECORD.size : at + _UUID_RECORD.size + length])
                       for buffer, records in file.chunks() for at, kind, length in records)
        finally:
            for file in files:
                file.close()

    def summary(self) -> dict[str, Any]:
        """Counts for reports and XCom: the totals, and each copy's summary by where it is."""
        return {
            "digest": self.digest,
            "scope": self.scope.as_dict(),
            "to_update": self.to_update,
            "disagreeing": self.disagreement(sample=0).count,
            "never_written": dict(self.never_written),
            "copies": {copy.where: {"what": copy.what, **copy.plan.summary()} for copy in self.copies},
        }
