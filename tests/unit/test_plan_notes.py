"""Plan.left_alone: a NoteList, in memory while small and spooled to a file when big, like Plan.changes."""

from __future__ import annotations

import pickle

import pytest

from nova_flavor_sync.diff import merge_plans
from nova_flavor_sync.plan import ChangeList, NoteList, Plan, RowNote, SpecDiff
from nova_flavor_sync.scope import Scope

DIFFS = [SpecDiff(1, "f", "a", (), (), ()), SpecDiff(2, "g", "b", (), (), ())]
REASONS = ["instance is deleted", "an operation is under way (task_state résizing ☃)", ""]


def _notes(count: int, first: int = 1) -> list[RowNote]:
    return [
        RowNote(i, f"{i:08d}-uuid-ü", REASONS[i % 3], f"m1.ü{i % 2} (id {i % 2})" if i % 4 else "",
                DIFFS[i % 2] if i % 5 == 0 else None)
        for i in range(first, first + count)
    ]


def _filled(notes: list[RowNote], keep: int, spool_dir: str | None = None, count_reasons: bool = True) -> NoteList:
    filled = NoteList(keep_in_memory=keep, spool_dir=spool_dir, count_reasons=count_reasons)
    for note in notes:
        filled.append(note)
    return filled


@pytest.mark.parametrize("count_reasons", [True, False], ids=["reasons-counted", "reasons-read-back"])
@pytest.mark.parametrize("count", [0, 1, 5, 6, 20_001])
def test_a_spooled_list_gives_back_every_note_in_order_with_its_shared_diff(count, count_reasons):
    notes = _filled(_notes(count), keep=5, count_reasons=count_reasons)

    back = list(notes)
    assert back == _notes(count) and len(notes) == count and bool(notes) == (count > 0)
    assert all(n.diff is None or n.diff is DIFFS[n.id % 2] for n in back)
    assert list(notes) == back  # iterating twice reads it again
    assert notes.count_by_reason() == {r: n for r in REASONS if (n := sum(1 for x in back if x.reason == r))}
    assert (notes._file is not None) == (count > 5) and (notes._rows == []) == (count > 5 or count == 0)
    assert {d.flavor_name: n for d, n in notes.per_diff()} == {
        name: n for name, n in (("a", sum(1 for x in back if x.diff is DIFFS[0])),
                                ("b", sum(1 for x in back if x.diff is DIFFS[1]))) if n}


def test_a_slice_from_the_start_reads_only_that_far_and_compares_as_a_list():
    notes = _filled(_notes(10_000), keep=10)

    assert notes[:10] == _notes(10) and notes[3:5] == _notes(10)[3:5]
    assert notes[0] == _notes(1)[0] and notes[-1] == _notes(10_000)[-1]
    assert notes == _notes(10_000) and notes != _notes(9_999)


@pytest.mark.parametrize("count", [3, 50])
def test_a_note_list_survives_pickling_in_memory_or_spooled(count):
    notes = _filled(_notes(count), keep=10)

    copy = pickle.loads(pickle.dumps(notes))

    assert list(copy) == _notes(count) and copy.count_by_reason() == notes.count_by_reason()
    copy.append(RowNote(count + 1, "u", "late", "", DIFFS[0]))
    assert len(copy) == count + 1 and len(notes) == count
    assert list(copy)[-1].diff == DIFFS[0]


def test_a_list_spooled_in_a_named_file_is_handed_over_by_name(tmp_path):
    notes = _filled(_notes(50), keep=10, spool_dir=str(tmp_path))

    handed = pickle.dumps(notes)

    assert len(handed) < 2000 and len(list(tmp_path.iterdir())) == 1  # the name, not the notes
    adopted = pickle.loads(handed)
    assert list(tmp_path.iterdir()) == []  # the receiver owns the (now unlinked) file
    adopted.append(RowNote(51, "u", "late"))
    assert list(adopted) == _notes(50) + [RowNote(51, "u", "late")]


@pytest.mark.parametrize("keep", [3, 2000])
@pytest.mark.parametrize("sizes", [(0, 0), (1, 10_000), (7_000, 5)])
def test_merged_plans_keep_every_note_in_order(keep, sizes):
    parts, every, first = [], [], 1
    for index, size in enumerate(sizes):
        notes = _notes(size, first)
        plan = Plan(scope=Scope(), changes=ChangeList(keep_in_memory=keep),
                    left_alone=_filled(notes, keep, count_reasons=index % 2 == 0))
        parts.append(pickle.loads(pickle.dumps(plan)))  # as a worker hands it over: its own SpecDiff objects
        every += notes
        first += size

    merged = merge_plans(Scope(), parts)

    assert list(merged.left_alone) == every and len(merged.left_alone) == len(every)
    assert merged.summary()["left_alone_by_reason"] == dict(sorted(
        {r: sum(1 for n in every if n.reason == r) for r in {n.reason for n in every}}.items()))
    merged.left_alone.append(RowNote(first, "u", "late"))  # still appendable
    assert list(merged.left_alone)[-1] == RowNote(first, "u", "late")
