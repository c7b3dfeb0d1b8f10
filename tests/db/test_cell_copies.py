"""The instances' own flavor copies (instance_extra.flavor in each cell), planned and synced by the same engine.

Against the real demo cloud: the counts are those its README gives (409 stale instances in
cell1, 317 in cell2; 106 in the middle of an operation; 56 deleted).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from dbtools import connect
from nova_flavor_sync import service
from nova_flavor_sync.db import NovaCellDb


def plan_cell(cloud, cell: str, *, all_keys: bool = True):
    with service.connect(cloud.api) as api:
        flavors, scope = service.resolve_scope(api, all_keys=all_keys)
        queued = api.queued_for_delete()
    with NovaCellDb(cloud.cells[cell]) as db:
        return service.make_cell_plan(db, scope, flavors=flavors, queued_for_delete=queued)


def flavor_rows(params) -> dict[int, tuple[str, str, datetime | None]]:
    with connect(params) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, instance_uuid, flavor, updated_at FROM instance_extra")
        return {row_id: (uuid, text, updated) for row_id, uuid, text, updated in cur.fetchall()}


@pytest.mark.parametrize(("cell", "stale", "busy"), [("cell1", 409, 71), ("cell2", 317, 35)])
def test_each_cell_plans_its_stale_instances_and_leaves_busy_and_deleted_ones_alone(demo_cloud, cell, stale, busy):
    plan = plan_cell(demo_cloud, cell)
    reasons = plan.summary()["left_alone_by_reason"]

    assert len(plan.changes) == stale and plan.errors == []
    operations = sum(n for reason, n in reasons.items() if reason != "instance is queued for delete")
    assert operations == busy
    assert any("task_state resize_migrated" in r for r in reasons) and any("vm_state resized" in r for r in reasons)


def test_a_sync_of_a_cell_rewrites_only_curs_extra_specs_and_a_rerun_finds_nothing(demo_cloud):
    cell = demo_cloud.cells["cell1"]
    plan = plan_cell(demo_cloud, "cell1")
    before = flavor_rows(cell)
    started = datetime.now(UTC).replace(tzinfo=None, microsecond=0)

    with NovaCellDb(cell) as db:
        result = service.apply_plan(db, plan)

    assert len(result.updated) == len(plan.changes) == 409 and not result.conflicts and not result.errors
    after = flavor_rows(cell)
    changed = {c.id for c in plan.changes}
    for row_id, (uuid, old_text, old_updated) in before.items():
        new_uuid, new_text, new_updated = after[row_id]
        if row_id not in changed:
            assert (new_text, new_updated) == (old_text, old_updated), row_id  # left alone, byte for byte
            continue
        old, new = json.loads(old_text), json.loads(new_text)
        assert (new["old"], new["new"]) == (old["old"], old["new"])
        new_cur, old_cur = new["cur"]["nova_object.data"], old["cur"]["nova_object.data"]
        assert {k: v for k, v in new_cur.items() if k != "extra_specs"} == \
            {k: v for k, v in old_cur.items() if k != "extra_specs"}
        assert {k: v for k, v in new["cur"].items() if k != "nova_object.data"} == \
            {k: v for k, v in old["cur"].items() if k != "nova_object.data"}  # version, changes untouched
        assert json.dumps(new) == new_text  # Nova's own format
        assert new_updated >= started  # as Nova's ORM would set it
    assert plan_cell(demo_cloud, "cell1").changes == []
