"""CloudPlan.disagreement: stale in one copy only, among the instances both copies judged."""

from __future__ import annotations

import random

import pytest

from nova_flavor_sync import plan as plan_module
from nova_flavor_sync.plan import ChangeList, CloudPlan, CopyPlan, Disagreement, Plan, RowChange, RowNote, SpecDiff
from nova_flavor_sync.scope import Scope

DIFF = SpecDiff(1, "f", "m1", (), (), ())


def _plan(stale: list[str], untouched: list[str], rng: random.Random) -> Plan:
    plan = Plan(scope=Scope(), changes=ChangeList(keep_in_memory=5))
    for row_id, uuid in enumerate(stale, 1):
        plan.changes.append(RowChange(row_id, uuid, "0" * 64, "1" * 64, DIFF))
    for row_id, uuid in enumerate(untouched, len(stale) + 1):
        kind = rng.choice(["left_alone", "orphans", "errors", "held_back"])
        getattr(plan, kind).append(RowNote(row_id, uuid, "why"))
    return plan


def _as_gathered(cloud: CloudPlan) -> list[str]:
    """The definition: every stale and every untouched instance gathered, per side."""
    stale: dict[bool, set[str]] = {True: set(), False: set()}
    judged: dict[bool, set[str]] = {True: set(), False: set()}
    for copy in cloud.copies:
        side = copy.cell_uuid is None
        stale[side].update(c.instance_uuid for c in copy.plan.changes)
        for notes in (copy.plan.left_alone, copy.plan.orphans, copy.plan.errors, copy.plan.held_back):
            judged[side].update(n.instance_uuid for n in notes)
    return sorted((stale[True] ^ stale[False]) - judged[True] - judged[False])


@pytest.mark.parametrize("uuids_at_once", [200_000, 25])  # 25: the big plan's way, several passes
@pytest.mark.parametrize("seed", range(20))
def test_disagreeing_instances_are_those_stale_in_one_copy_and_judged_in_both(seed, uuids_at_once, monkeypatch):
    monkeypatch.setattr(plan_module, "UUIDS_AT_ONCE", uuids_at_once)
    rng = random.Random(seed)
    uuids = [f"uuid-{i}" for i in range(200)]
    copies = []
    for key in ("nova_api", "cell-a", "cell-b"):
        stale = rng.sample(uuids, rng.randrange(0, 120))
        untouched = rng.sample(uuids, rng.randrange(0, 40))
        copies.append(CopyPlan(key, None if key == "nova_api" else key, _plan(stale, untouched, rng)))
    cloud = CloudPlan(Scope(), copies)

    expected = _as_gathered(cloud)
    assert cloud.disagreement(sample=None) == Disagreement(len(expected), expected)
    assert cloud.disagreement(sample=3) == Disagreement(len(expected), expected[:3])


def test_no_disagreement_when_both_copies_are_stale_alike():
    rng = random.Random(1)
    stale = [f"uuid-{i}" for i in range(50)]
    cloud = CloudPlan(Scope(), [CopyPlan("nova_api", None, _plan(stale, [], rng)),
                                CopyPlan("cell1", "c1", _plan(stale[::-1], ["uuid-x"], rng))])
    assert cloud.disagreement() == Disagreement(0, [])
