"""Compare RequestSpec flavor copies with their flavors and build a Plan (pure, no I/O).

``make_plan`` is the functional core of every mode: dry run, sync, verify and the drift
check all call it. The common case, a row whose flavor copy the planner has seen before,
costs two substring searches and a string compare (see RowPlanner).
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from nova_flavor_sync.flavor import Flavor
from nova_flavor_sync.plan import (
    ChangeList,
    KeyChange,
    NoteList,
    Plan,
    PlanDigest,
    RowChange,
    RowNote,
    SpecDiff,
    SpecRow,
)
from nova_flavor_sync.policy import classify_key, is_risky
from nova_flavor_sync.scope import Scope
from nova_flavor_sync.spec_json import (
    REQUEST_SPEC,
    CopyLayout,
    EmbeddedFlavor,
    FlavorText,
    SpecShapeError,
    dumps_extra_specs,
    find_flavor_start,
    flavor_head_at,
    flavor_text_at,
    locate_flavor,
    read_embedded_flavor,
)
from nova_flavor_sync.spool import SpoolFile

IN_SYNC = "in_sync"  # plan_row's result for a row that needs nothing
OUT_OF_SCOPE = "out_of_scope"  # ... and for a row outside --flavor / --instance
RowOutcome = RowChange | tuple[str, RowNote] | str


class LeftAloneLater(Protocol):
    """The instances to leave alone, which may come while the rows are planned (a plan worker's:
    the parent finds them while its workers start planning)."""

    def known(self) -> Mapping[str, str] | None:
        """The instances and reasons if they have come, else None (without waiting)."""

    def wait(self) -> Mapping[str, str]:
        """The instances and reasons, waiting for them."""

    def reason(self, row: SpecRow, known: Mapping[str, str]) -> str:
        """Why ``row`` must be left alone (its own reason as read, or one of ``known``), or ""."""


# How many rows a plan judges before the instances to leave alone have come; past this many,
# it waits for them. The rows wait in a temporary file (PendingRows), not in memory.
PENDING_ROWS = 500_000


class PendingRows:
    """Rows judged before the instances to leave alone came, with their outcomes, in order: in a
    temporary file (a million-instance cloud takes seconds to scan for them, tens of thousands
    of rows; a few hundred bytes each), pickled a batch at a time.

    An outcome is kept as plain values (pickled fast, in C), its SpecDiff as a number: the
    diffs are the planner's shared objects, kept here once each, and drained as themselves.
    """

    BATCH = 1000
    _HEAD = struct.Struct("<I")  # a record: its length, then a pickled batch

    def __init__(self) -> None:
        self._file = SpoolFile(self._HEAD, name="pending")
        self._batch: list[tuple] = []
        self._count = 0
        self._diffs: list[SpecDiff | None] = [None]  # by number; 0: no diff
        self._diff_numbers: dict[int, int] = {}

    def __len__(self) -> int:
        return self._count

    def add(self, row: SpecRow, outcome: RowOutcome) -> None:
        head = (row.id, row.instance_uuid, row.left_alone)
        if isinstance(outcome, str):
            self._batch.append((*head, outcome))
        elif isinstance(outcome, RowChange):
            self._batch.append((*head, _CHANGE, outcome.old_sha256, outcome.new_sha256, self._number(outcome.diff)))
        else:
            kind, note = outcome
            self._batch.append((*head, kind, note.reason, note.flavor, self._number(note.diff)))
        self._count += 1
        if len(self._batch) >= self.BATCH:
            self._spool()

    def _number(self, diff: SpecDiff | None) -> int:
        if diff is None:
            return 0
        number = self._diff_numbers.get(id(diff))
        if number is None:
            number = self._diff_numbers[id(diff)] = len(self._diffs)
            self._diffs.append(diff)
        return number

    def _spool(self) -> None:
        if self._batch:
            data = pickle.dumps(self._batch, protocol=pickle.HIGHEST_PROTOCOL)
            self._file.append(self._HEAD.pack(len(data)) + data)
            self._batch = []

    def drain(self) -> Iterator[tuple[SpecRow, RowOutcome]]:
        """Every row and outcome, in order; the file is closed after."""
        self._spool()
        diffs = self._diffs
        try:
            for buffer, records in self._file.chunks():
                for at, length in records:
                    start = at + self._HEAD.size
                    for row_id, uuid, reason, kind, *rest in pickle.loads(buffer[start : start + length]):
                        row = SpecRow(row_id, uuid, "", None, reason)
                        if not rest:
                            yield row, kind
                        elif kind == _CHANGE:
                            old, new, diff = rest
                            yield row, RowChange(row_id, uuid, old, new, diffs[diff])  # type: ignore[arg-type]
                        else:
                            note_reason, flavor, diff = rest
                            yield row, (kind, RowNote(row_id, uuid, note_reason, flavor, diffs[diff]))
        finally:
            self._file.close()
            self._count = 0


_CHANGE = "change"  # PendingRows' name for a RowChange outcome (the others: a plan list's name)


def make_plan(
    flavors: Mapping[int, Flavor],
    rows: Iterable[SpecRow],
    scope: Scope,
    *,
    spool_dir: str | None = None,
    layout: CopyLayout = REQUEST_SPEC,
    planner: RowPlanner | None = None,
    left_alone: LeftAloneLater | None = None,
    with_digest: bool = True,
) -> Plan:
    """Compare every row with its flavor; rows must come in ascending id order.

    ``spool_dir``: where long lists of changes and notes are spooled, by name (plan workers; see ChangeList).
    ``layout``: which kind of flavor copy the rows hold (RequestSpecs by default).
    ``planner``: a RowPlanner of these flavors, scope and layout that judged earlier rows (a
    plan worker's, kept from one id range to the next): its verdicts are reused.
    ``left_alone``: the instances to leave alone, when they are still being found: rows
    are judged meanwhile (at most PENDING_ROWS; they wait in a file, PendingRows), and each
    one's outcome is decided when they come, as it would have been had they been there from
    the start. Without it, each row says itself why it is left alone (``SpecRow.left_alone``).
    ``with_digest=False``: leave ``plan.digest`` empty (a plan worker's part of a plan: the
    merge hashes every change again, in order).
    """
    plan = Plan(
        scope=scope, changes=ChangeList(spool_dir=spool_dir), held_back=NoteList(spool_dir=spool_dir),
        orphans=NoteList(spool_dir=spool_dir), errors=NoteList(spool_dir=spool_dir),
        left_alone=NoteList(spool_dir=spool_dir, count_reasons=True),
    )
    digest = PlanDigest(scope) if with_digest else None
    if planner is None:
        planner = RowPlanner(flavors, scope, layout)
    elif planner.scope != scope or planner.layout != layout or planner.flavors is not flavors:
        raise ValueError("a RowPlanner of other flavors, scope or copies")

    def record(outcome: RowOutcome) -> None:
        # A change first: comparing one with a string calls the dataclass's __eq__, twice.
        if isinstance(outcome, RowChange):
            plan.changes.append(outcome)
            if digest is not None:
                digest.add(outcome.id, outcome.old_sha256, outcome.new_sha256)
        elif outcome == IN_SYNC:
            plan.in_sync += 1
        elif outcome == OUT_OF_SCOPE:
            plan.out_of_scope += 1
        else:
            kind, note = outcome
            getattr(plan, kind).append(note)

    known = None if left_alone is not None else {}
    pending: PendingRows | None = None  # rows judged before they came

    def decide_pending(known: Mapping[str, str]) -> None:
        assert left_alone is not None and pending is not None
        for waiting, outcome in pending.drain():
            record(_decided(waiting, outcome, left_alone.reason(waiting, known)))

    for row in rows:
        plan.rows_read += 1
        if known is None:
            assert left_alone is not None
            known = left_alone.known() if pending is None or len(pending) < PENDING_ROWS else left_alone.wait()
            if known is None:  # judged now, decided when they come
                pending = pending or PendingRows()
                pending.add(row, planner.plan_row(row))
                continue
            if pending is not None:
                decide_pending(known)
                pending = None
        if left_alone is not None:
            reason = left_alone.reason(row, known)
            if reason != row.left_alone:
                row = SpecRow(row.id, row.instance_uuid, row.spec, row.updated_at, reason)
        record(planner.plan_row(row))
    if pending is not None:  # every row came before they did
        assert left_alone is not None
        decide_pending(left_alone.wait())
    plan.digest = digest.hexdigest() if digest is not None else ""
    return plan


def _decided(row: SpecRow, outcome: RowOutcome, reason: str) -> RowOutcome:
    """A row's outcome, judged before the instances to leave alone came, now that ``reason`` is known.

    What plan_row gives: outside the scope first, then left alone for ``reason``, else the verdict.
    """
    if outcome == OUT_OF_SCOPE or reason == row.left_alone:
        return outcome
    if reason:
        return "left_alone", RowNote(row.id, row.instance_uuid, reason)
    return outcome


def merge_plans(scope: Scope, parts: Iterable[Plan]) -> Plan:
    """One plan from the plans of consecutive id ranges, in id order (what workers return).

    The same as make_plan over all the rows at once: counts add up, lists follow each
    other, and the digest is computed again over every change in order.
    """
    merged = PlanMerger(scope)
    for part in parts:
        merged.add(part)
    return merged.plan()


class PlanMerger:
    """merge_plans a part at a time: the plan workers' parts are merged as they come in, while
    the workers plan the next ones, so that only the last part is merged after they finish."""

    def __init__(self, scope: Scope) -> None:
        self._plan = Plan(scope=scope)
        self._digest = PlanDigest(scope)

    def add(self, part: Plan) -> None:
        """The plan of the next id range (its lists are emptied into the merged plan)."""
        plan = self._plan
        plan.rows_read += part.rows_read
        plan.in_sync += part.in_sync
        plan.out_of_scope += part.out_of_scope
        for notes, part_notes in zip(plan.notes, part.notes, strict=True):
            notes.extend(part_notes)
            part_notes.close()
        plan.changes.extend_from(part.changes, self._digest)
        part.changes.close()

    def plan(self) -> Plan:
        """The merged plan, with its digest."""
        self._plan.digest = self._digest.hexdigest()
        return self._plan


class RowPlanner:
    """Plans one row at a time; judges each distinct flavor copy once.

    Most rows carry a flavor copy the planner has already seen: the same flavor object, byte
    for byte up to the end of its extra_specs, as in thousands of other rows. Such a row is
    recognised by finding that text in it (two substring searches and a compare), and gets
    the verdict of the first row that carried it, without parsing it. Every other row, and
    every row the planner cannot recognise that way, is parsed in full. Apply parses and
    checks in full every row it rewrites, and that its flavor copy is the one planned.

    What a verdict depends on, the copy's id, name, flavorid and extra specs, comes before
    the end of its extra_specs in every flavor Nova writes: what follows differs between
    copies of one flavor (a RequestSpec's keeps the flavor's description, an instance's has
    it nulled), so recognising by that head judges them once for both tables
    (``for_layout``). A copy whose text has them in another order is recognised by its
    whole flavor object.
    """

    # A copy is looked up by the first characters of its flavor object (name, version, id,
    # name): enough to tell flavors apart; copies of one flavor are then compared in full.
    WINDOW = 160
    MAX_KNOWN_COPIES = 10_000

    def __init__(self, flavors: Mapping[int, Flavor], scope: Scope, layout: CopyLayout = REQUEST_SPEC) -> None:
        self.flavors = flavors
        self.scope = scope
        self.layout = layout
        self._flavors_by_flavorid = {f.flavorid: f for f in flavors.values()}
        self._judged = _Judged()

    def for_layout(self, layout: CopyLayout) -> RowPlanner:
        """A planner of the same flavors and scope for the other kind of copy, sharing what this
        one has judged: a copy judged in one table is recognised in the other (a plan worker
        plans both; where flavors are many, judging each copy twice was a third of its work)."""
        sibling = RowPlanner(self.flavors, self.scope, layout)
        sibling._judged = self._judged
        return sibling

    def plan_row(self, row: SpecRow) -> RowOutcome:
        """Return a RowChange, IN_SYNC, OUT_OF_SCOPE, or ``(plan list name, RowNote)``."""
        scope = self.scope
        if scope.instance_uuids is not None and row.instance_uuid not in scope.instance_uuids:
            return OUT_OF_SCOPE
        if row.left_alone:
            return "left_alone", RowNote(row.id, row.instance_uuid, row.left_alone)
        spec, layout = row.spec, self.layout
        at = find_flavor_start(spec, layout)
        found = self._recognise(spec, at) if at >= 0 else None
        if found is None:
            try:
                copy = read_embedded_flavor(spec, layout)
            except SpecShapeError as exc:
                return "errors", RowNote(row.id, row.instance_uuid, str(exc))
            verdict = self._judge(copy)
            flavor_text = self._remember(spec, at, copy, verdict) if at >= 0 else None
        else:
            flavor_text, verdict = found
        if verdict.outcome is not None:
            return _note(verdict.outcome, row, verdict)
        # The row changes. A row parsed above was checked as a whole; one recognised by its
        # flavor text was not, and is checked in full when it is written (apply parses and
        # checks every row it rewrites), so a plan costs no parse for it.
        if flavor_text is None or not spec.isascii():
            try:
                at, flavor_text = locate_flavor(spec, layout)  # raises with the reason
            except SpecShapeError as exc:
                return "errors", RowNote(row.id, row.instance_uuid, str(exc), verdict.label)
        assert verdict.diff is not None and verdict.new_specs_json is not None
        old_sha256, new_sha256 = flavor_text.splice_hashes(spec, at, verdict.new_specs_json)
        return RowChange(row.id, row.instance_uuid, old_sha256, new_sha256, verdict.diff)

    def _recognise(self, spec: str, at: int) -> tuple[FlavorText, _Verdict] | None:
        for flavor_text, verdict in self._judged.copies.get(spec[at : at + self.WINDOW], ()):
            if spec.startswith(flavor_text.text, at):
                return flavor_text, verdict
        return None

    def _remember(self, spec: str, at: int, copy: EmbeddedFlavor, verdict: _Verdict) -> FlavorText | None:
        """The copy's FlavorText, kept with its verdict for the rows that carry it: its head when
        that says what the verdict depends on (``flavor_head_at``), else its whole flavor object;
        None for a text not in Nova's format (every such row is parsed)."""
        judged = self._judged
        flavor_text = flavor_head_at(spec, at, copy, judged.identities, self.layout)
        if flavor_text is None:
            try:
                flavor_text = flavor_text_at(spec, at, expected=copy, layout=self.layout)
            except SpecShapeError:
                return None
        if judged.count < self.MAX_KNOWN_COPIES:
            judged.copies.setdefault(spec[at : at + self.WINDOW], []).append((flavor_text, verdict))
            judged.count += 1
        return flavor_text

    def diff_of(self, flavor_id: int, extra_specs: dict[str, str]) -> SpecDiff:
        """The SpecDiff of a copy of flavor ``flavor_id`` (one of this planner's flavors) with
        these extra specs, as a plan of such a copy has it (``SpecDiff.planned_from``'s inverse)."""
        return self._diff(self.flavors[flavor_id], extra_specs)[0]

    def _judge(self, copy: EmbeddedFlavor) -> _Verdict:
        """What to do with every row that carries this flavor copy."""
        scope = self.scope
        label = f"{copy.name} (id {copy.id}, flavorid {copy.flavorid})"
        if scope.flavor_ids is not None and not (
            copy.id in scope.flavor_ids or copy.flavorid in (scope.flavorids or ())
        ):
            return _Verdict(label, OUT_OF_SCOPE)
        flavor = self.flavors.get(copy.id)
        orphan_reason = self._orphan_reason(copy.id, copy.flavorid, flavor)
        if orphan_reason:
            return _Verdict(label, ("orphans", orphan_reason))
        assert flavor is not None
        if _in_scope(copy.extra_specs, scope) == _in_scope(flavor.extra_specs, scope):
            return _Verdict(label, IN_SYNC)
        null_keys = sorted(k for k, v in flavor.extra_specs.items() if v is None and scope.includes_key(k))
        if null_keys:
            reason = f"flavor {flavor.name} has no value (NULL) for {', '.join(null_keys)}; fix the flavor first"
            return _Verdict(label, ("errors", reason))
        diff, target_json = self._diff(flavor, copy.extra_specs)
        if not diff.applied:
            return _Verdict(label, ("held_back", "only risky keys differ"), diff)
        return _Verdict(label, None, diff, target_json)

    def _orphan_reason(self, flavor_id: int, flavorid: str, flavor: Flavor | None) -> str:
        if flavor is None:
            again = self._flavors_by_flavorid.get(flavorid)
            if again is not None:
                return (
                    f"flavor id {flavor_id} was deleted; flavorid {flavorid} was re-created "
                    f"as id {again.id}"
                )
            return f"flavor id {flavor_id} (flavorid {flavorid}) no longer exists"
        if flavor.flavorid != flavorid:
            return f"flavor id {flavor_id} now has flavorid {flavor.flavorid}, not {flavorid}"
        return ""

    def _diff(self, flavor: Flavor, copy: dict[str, str]) -> tuple[SpecDiff, bytes]:
        """The SpecDiff of this copy of ``flavor`` and its target extra specs as written (ASCII).

        Made once per flavor and copy. What changes in which key is worked out once per pair
        of extra specs: flavors often share theirs (a family differing in size only), and a
        property set on many flavors at once leaves the same stale copies in all of them.
        """
        judged = self._judged
        copy_items = tuple(sorted(copy.items()))
        made = judged.diffs.get((flavor.id, copy_items))
        if made is not None:
            return made
        flavor_items = judged.flavor_items.get(flavor.id)
        if flavor_items is None:
            flavor_items = judged.flavor_items[flavor.id] = tuple(sorted(flavor.extra_specs.items()))
        keys = judged.key_changes.get((flavor_items, copy_items))
        if keys is None:
            keys = judged.key_changes[(flavor_items, copy_items)] = self._key_changes(flavor.extra_specs, copy)
        applied, held_back, target, target_json = keys
        diff = SpecDiff(flavor.id, flavor.flavorid, flavor.name, applied, held_back, target)
        made = judged.diffs[(flavor.id, copy_items)] = (diff, target_json)
        return made

    def _key_changes(self, wanted: Mapping[str, str | None], copy: dict[str, str]) -> _KeyChanges:
        applied: list[KeyChange] = []
        held_back: list[KeyChange] = []
        target = dict(copy)
        for key in sorted(set(copy) | set(wanted)):
            old, new = copy.get(key), wanted.get(key)
            if old == new or not self.scope.includes_key(key):
                continue
            change = KeyChange(key, old, new, classify_key(key))
            if self.scope.all_keys or not is_risky(key):
                applied.append(change)
                if new is None:
                    del target[key]
                else:
                    target[key] = new
            else:
                held_back.append(change)
        return (tuple(applied), tuple(held_back), tuple(sorted(target.items())),
                dumps_extra_specs(target).encode("ascii"))


# A SpecDiff's applied and held-back changes, its target extra specs, and those as written.
_KeyChanges = tuple[tuple[KeyChange, ...], tuple[KeyChange, ...], tuple[tuple[str, str], ...], bytes]


class _Judged:
    """What a RowPlanner has judged (shared with the planners ``for_layout`` makes): each
    flavor copy's text and verdict, by the window that starts it, and the SpecDiffs made."""

    def __init__(self) -> None:
        self.copies: dict[str, list[tuple[FlavorText, _Verdict]]] = {}
        self.count = 0
        self.identities: dict[str, tuple[int, str, str] | None] = {}  # spec_json.flavor_head_at's
        self.diffs: dict[tuple[int, tuple[tuple[str, str], ...]], tuple[SpecDiff, bytes]] = {}
        self.flavor_items: dict[int, tuple[tuple[str, str | None], ...]] = {}
        self.key_changes: dict[tuple[tuple[tuple[str, str | None], ...], tuple[tuple[str, str], ...]], _KeyChanges] = {}


@dataclass(frozen=True, slots=True)
class _Verdict:
    """The judgement of one flavor copy: an outcome, or (outcome None) a change to make."""

    label: str
    outcome: str | tuple[str, str] | None  # IN_SYNC, OUT_OF_SCOPE or (plan list, reason)
    diff: SpecDiff | None = None
    new_specs_json: bytes | None = None  # the new extra_specs value, for changes


def _note(outcome: str | tuple[str, str], row: SpecRow, verdict: _Verdict) -> RowOutcome:
    if isinstance(outcome, str):
        return outcome
    kind, reason = outcome
    return kind, RowNote(row.id, row.instance_uuid, reason, verdict.label, verdict.diff)


def _in_scope(extra_specs: Mapping[str, str | None], scope: Scope) -> Mapping[str, str | None]:
    if not scope.key_prefixes:
        return extra_specs
    return {k: v for k, v in extra_specs.items() if scope.includes_key(k)}
