"""Plan.changes: a ChangeList, in memory while small and spooled to a file when big."""

from __future__ import annotations

import pytest

from nova_flavor_sync.plan import ChangeList, RowChange, SpecDiff, batched


def _diff(name: str) -> SpecDiff:
    return SpecDiff(1, "f", name, (), (), ())


DIFFS = [_diff("a"), _diff("b")]


def _changes(count: int) -> list[RowChange]:
    return [
        RowChange(i, f"{i:08d}-uuid-ü", f"{i:064x}", f"{i + 1:064x}", DIFFS[i % 2]) for i in range(1, count + 1)
    ]


@pytest.mark.parametrize("count", [0, 1, 5, 6, 20_001])
def test_a_spooled_list_gives_back_every_change_in_order_with_its_shared_diff(count):
    changes = ChangeList(keep_in_memory=5)
    for change in _changes(count):
        changes.append(change)
    back = list(changes)
    assert back == _changes(count) and len(changes) == count and bool(changes) == (count > 0)
    assert all(c.diff is DIFFS[c.id % 2] for c in back)
    assert list(changes) == back  # iterating twice reads it again
    expected = {name: rows for name, rows in (("b", (count + 1) // 2), ("a", count // 2)) if rows}
    assert {diff.flavor_name: rows for diff, rows in changes.per_diff()} == expected


def test_batches_cut_the_changes_in_order():
    changes = ChangeList(keep_in_memory=3)
    for change in _changes(11):
        changes.append(change)
    assert [[c.id for c in b] for b in batched(changes, 4)] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]
    assert changes[0].id == 1 and changes[-1].id == 11 and changes == _changes(11)


def test_a_big_list_lives_in_a_file_not_in_memory():
    changes = ChangeList(keep_in_memory=10)
    for change in _changes(1000):
        changes.append(change)
    assert changes._rows == [] and changes._file is not None


@pytest.mark.parametrize("count", [3, 50])
def test_a_change_list_survives_pickling_in_memory_or_spooled(count):
    import pickle

    changes = ChangeList(keep_in_memory=10)
    for change in _changes(count):
        changes.append(change)
    copy = pickle.loads(pickle.dumps(changes))
    assert list(copy) == _changes(count)
    copy.append(RowChange(count + 1, "u", "0" * 64, "1" * 64, DIFFS[0]))
    assert len(copy) == count + 1 and len(changes) == count
    assert list(copy)[-1].diff == DIFFS[0]


def test_a_list_spooled_in_a_named_file_is_handed_over_by_name(tmp_path):
    import pickle

    changes = ChangeList(keep_in_memory=10, spool_dir=str(tmp_path))
    for change in _changes(50):
        changes.append(change)
    handed = pickle.dumps(changes)
    assert len(handed) < 2000 and len(list(tmp_path.iterdir())) == 1  # the name, not the rows
    adopted = pickle.loads(handed)
    assert list(tmp_path.iterdir()) == []  # the receiver owns the (now unlinked) file
    adopted.append(RowChange(51, "u", "0" * 64, "1" * 64, DIFFS[0]))
    assert list(adopted) == _changes(50) + [RowChange(51, "u", "0" * 64, "1" * 64, DIFFS[0])]
