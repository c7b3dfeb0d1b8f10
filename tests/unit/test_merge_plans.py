"""merge_plans: the plan of consecutive id ranges (the plan workers'), merged without decoding every change."""

from __future__ import annotations

import pickle

import pytest

from nova_flavor_sync.diff import merge_plans
from nova_flavor_sync.plan import ChangeList, Plan, PlanDigest, RowChange, SpecDiff
from nova_flavor_sync.scope import Scope

SCOPE = Scope(all_keys=True)


def _diff(name: str) -> SpecDiff:
    return SpecDiff(1, "f", name, (), (), ())


def _changes(first: int, count: int, diffs: list[SpecDiff]) -> list[RowChange]:
    return [RowChange(i, f"{i:08d}-uuid-ü", f"{i:064x}", f"{i + 1:064x}", diffs[i % len(diffs)])
            for i in range(first, first + count)]


def _part(changes: list[RowChange], keep: int) -> Plan:
    plan = Plan(scope=SCOPE, changes=ChangeList(keep_in_memory=keep))
    for change in changes:
        plan.changes.append(change)
    plan.rows_read = len(changes)
    return pickle.loads(pickle.dumps(plan))  # as a worker hands it over: its own SpecDiff objects


@pytest.mark.parametrize("keep", [3, 2000])
@pytest.mark.parametrize("sizes", [(0, 0), (1, 10_000), (7_000, 5), (4, 4, 9_000)])
def test_merged_plan_is_the_plan_of_all_rows_in_order(keep, sizes):
    parts, every, first = [], [], 1
    for index, size in enumerate(sizes):
        changes = _changes(first, size, [_diff(f"{index}a"), _diff(f"{index}b")])
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
    assert per_diff == {name: n for name, n in
                        ((c.diff.flavor_name, sum(1 for x in every if x.diff.flavor_name == c.diff.flavor_name))
                         for c in every)}
    merged.changes.append(RowChange(first, "u", "0" * 64, "1" * 64, _diff("late")))  # still appendable
    assert [c.id for c in merged.changes][-2:] == ([first - 1, first] if every else [first])
