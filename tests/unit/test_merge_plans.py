"""merge_plans: the plan of consecutive id ranges (the plan workers'), merged without decoding every change."""

from __future__ import annotations

import pickle
from collections import Counter

import pytest

from nova_flavor_sync.diff import merge_plans
from nova_flavor_sync.plan import ChangeList, Plan, PlanDigest, RowChange, SpecDiff
from nova_flavor_sync.scope import Scope

SCOPE = Scope(all_keys=True)


def _diff(name: str) -> SpecDiff:
    return SpecDiff(1, "f", name, (), (), ())


def _uuid(i: int, uuids: str) -> str:
    if uuids == "nova" or (uuids == "one odd" and i != 9_000):
        return f"{i:08x}-0000-4000-8000-{i:012x}"  # 36 characters, as Nova's
    return f"{i:08d}-uuid-ü"


def _changes(first: int, count: int, diffs: list[SpecDiff], uuids: str = "other") -> list[RowChange]:
    return [RowChange(i, _uuid(i, uuids), f"{i:064x}", f"{i + 1:064x}", diffs[i % len(diffs)])
            for i in range(first, first + count)]


def _part(changes: list[RowChange], keep: int) -> Plan:
    plan = Plan(scope=SCOPE, changes=ChangeList(keep_in_memory=keep))
    for change in changes:
        plan.changes.append(change)
    plan.rows_read = len(changes)
    return pickle.loads(pickle.dumps(plan))  # as a worker hands it over: its own SpecDiff objects


# Merging reads the digest's part of each record where it starts when every uuid has Nova's
# 36 characters, and each record's head otherwise: both ways, and a file with one odd uuid.
@pytest.mark.parametrize("uuids", ["other", "nova", "one odd"])
@pytest.mark.parametrize("keep", [3, 2000])
@pytest.mark.parametrize("sizes", [(0, 0), (1, 10_000), (7_000, 5), (4, 4, 9_000)])
def test_merged_plan_is_the_plan_of_all_rows_in_order(keep, sizes, uuids):
    parts, every, first = [], [], 1
    for index, size in enumerate(sizes):
        changes = _changes(first, size, [_diff(f"{index}a"), _diff(f"{index}b")], uuids)
        parts.append(_part(changes, keep))
        every += changes
        first += size
    digest = PlanDigest(SCOPE)
    for change in every:
        digest.add(change.id, change.old_sha256, change.new_sha256)

    merged = merge_plans(SCOPE, parts)

    assert merged.digest == digest.hexdigest()
    assert list(merged.changes) == every and len(merged.changes) == len(every)
    assert merged.rows_read == len(every)
    per_diff = {d.flavor_name: n for d, n in merged.changes.per_diff()}
    assert per_diff == Counter(c.diff.flavor_name for c in every)
    merged.changes.append(RowChange(first, "u", "0" * 64, "1" * 64, _diff("late")))  # still appendable
    assert [c.id for c in merged.changes][-2:] == ([first - 1, first] if every else [first])
