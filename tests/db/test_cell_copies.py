"""The instances' own flavor copies (instance_extra.flavor in each cell), planned and synced by the same engine.

Against the real demo cloud: the counts are those its README gives (409 stale instances in
cell1, 317 in cell2; 106 in the middle of an operation; 56 deleted).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from uuid import UUID

import pytest

from dbtools import connect, opened_cloud
from nova_flavor_sync import service
from nova_flavor_sync.db import NovaCellDb
from nova_flavor_sync.plan import Disagreement


def plan_cell(cloud, cell: str, *, all_keys: bool = True):
    with service.connect(cloud.api) as api:
        flavors, scope = service.resolve_scope(api, all_keys=all_keys)
        queued = dict.fromkeys(api.queued_for_delete(), "instance is queued for delete")
    with NovaCellDb(cloud.cells[cell]) as db:
        return service.make_cell_plan(db, scope, flavors=flavors, left_alone=queued)


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
        assert new_uuid == uuid
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


def test_both_copies_of_busy_deleted_unbuilt_and_cell0_instances_are_left_alone(demo_cloud):
    from nova_flavor_sync.cells import instances_to_leave_alone, locate_cells, open_cells, read_cell_mappings

    cell_urls = {name: f"mysql+pymysql://{p.user}:@{p.host}:{p.port}/{p.database}"
                 for name, p in demo_cloud.cells.items()}
    with service.connect(demo_cloud.api) as api:
        flavors, scope = service.resolve_scope(api, all_keys=True)
        with open_cells(locate_cells(read_cell_mappings(api), cell_urls=cell_urls)) as cells:
            left_alone = instances_to_leave_alone(api, cells)
            api_plan = service.make_plan(api, scope, flavors=flavors, left_alone=left_alone)
            cell_plans = [service.make_cell_plan(db, scope, flavors=flavors, left_alone=left_alone)
                          for uuid, db in cells.items() if uuid != "00000000-0000-0000-0000-000000000000"]

    reasons = api_plan.summary()["left_alone_by_reason"]
    assert reasons["instance is queued for delete"] == 56
    assert reasons["instance has no cell yet (still being built)"] == 10
    assert reasons["instance never scheduled (in cell0)"] == 30
    assert sum(n for r, n in reasons.items() if "resize" in r or "task_state" in r) == 106
    # The same instances are stale in both copies (the demo's copies agree): 409 + 317.
    assert len(api_plan.changes) == sum(len(p.changes) for p in cell_plans) == 726
    assert {c.instance_uuid for c in api_plan.changes} == {c.instance_uuid for p in cell_plans for c in p.changes}


def plan_cloud(cloud):
    with opened_cloud(cloud.api) as (api, cells, flavors, scope):
        return service.plan_both_copies(api, cells, scope, flavors=flavors)


def test_one_plan_for_both_copies_reports_each_cell_and_one_digest(demo_cloud):
    from nova_flavor_sync.report import GUEST_KEYS_TAKE_EFFECT, both_copies_lines

    cloud = plan_cloud(demo_cloud)
    lines = both_copies_lines(cloud)

    assert cloud.to_update == 726 * 2 and cloud.disagreement().count == 0
    assert [c.where.split()[0] for c in cloud.copies] == ["nova_api", "cell1", "cell2"]
    assert lines[0].startswith("RequestSpecs in nova_api: read 1500, 726 to update")
    assert any(line.startswith("Instance copies in cell1 (835ce9b0-6a5b-5709-b701-5eb36f22fdca): read 884, "
                               "409 to update") for line in lines)
    assert "Cell cell0 (00000000-0000-0000-0000-000000000000): 30 instances that never scheduled; counted, " \
           "never written" in lines
    assert lines[-3:] == [GUEST_KEYS_TAKE_EFFECT, "Both copies: 1452 to update (726 RequestSpecs, 726 instance copies)",
                          f"Plan digest: {cloud.digest}"]
    assert plan_cloud(demo_cloud).digest == cloud.digest  # the same data, the same digest


def test_an_instance_synced_in_one_copy_only_is_reported_as_disagreeing(demo_cloud):
    from nova_flavor_sync.report import both_copies_lines

    cloud = plan_cloud(demo_cloud)
    cell1 = next(c for c in cloud.copies if c.where.startswith("cell1"))
    first = next(iter(cell1.plan.changes))
    with NovaCellDb(demo_cloud.cells["cell1"]) as db:  # as if a run stopped after this instance's first write
        plan = service.make_cell_plan(db, cloud.scope, flavors=load_flavors(demo_cloud))
        only = [c for c in plan.changes if c.id == first.id]
        plan.changes = type(plan.changes)()
        for change in only:
            plan.changes.append(change)
        assert len(service.apply_plan(db, plan).updated) == 1

    again = plan_cloud(demo_cloud)

    assert again.disagreement() == Disagreement(1, [first.instance_uuid])
    assert again.digest != cloud.digest
    assert any(line.startswith("Copies disagree for 1 instances (stale in one copy only; ") and
               first.instance_uuid in line for line in both_copies_lines(again))


def load_flavors(cloud):
    with service.connect(cloud.api) as api:
        return api.load_flavors()


def test_an_instance_that_starts_an_operation_after_planning_keeps_its_copy_and_is_explained(demo_cloud):
    """The compare-and-swap of an instance copy also checks its instance is still idle.

    A live migration does not touch instance_extra.flavor, so the bytes alone would not show it.
    """
    cell = demo_cloud.cells["cell1"]
    plan = plan_cell(demo_cloud, "cell1")
    moving = next(iter(plan.changes))
    before = flavor_rows(cell)[moving.id]
    with connect(cell) as conn, conn.cursor() as cur:  # Nova starts a live migration meanwhile
        cur.execute("UPDATE instances SET task_state = 'migrating' WHERE uuid = %s", (moving.instance_uuid,))

    with NovaCellDb(cell) as db:
        result = service.apply_plan(db, plan)
        (note,) = service.explain_conflicts(db, plan.scope, result.conflicts, flavors=load_flavors(demo_cloud))

    assert result.conflicts == [moving.id] and len(result.updated) == len(plan.changes) - 1
    assert flavor_rows(cell)[moving.id] == before  # byte for byte, updated_at too
    assert note.reason == ("changed since planned, not overwritten; "
                           "now left alone: an operation is under way (task_state migrating)")


def test_an_instance_its_cell_has_no_row_for_keeps_both_copies(demo_cloud):
    """instance_mappings says cell1, but cell1 has no instances row: both copies left alone, with why."""
    cell1 = next(c for c in plan_cloud(demo_cloud).copies if c.where.startswith("cell1"))
    lost = next(iter(cell1.plan.changes)).instance_uuid
    with connect(demo_cloud.cells["cell1"]) as conn, conn.cursor() as cur:
        cur.execute("SET SESSION foreign_key_checks = 0")  # instance_extra keeps its row
        cur.execute("DELETE FROM instances WHERE uuid = %s", (lost,))

    again = plan_cloud(demo_cloud)

    assert all(lost not in {c.instance_uuid for c in copy.plan.changes} for copy in again.copies)
    notes = [(copy.where.split()[0], n.reason) for copy in again.copies for n in copy.plan.left_alone
             if n.instance_uuid == lost]
    assert notes == [("nova_api", "instance row missing from its cell"),
                     ("cell1", "instance row missing from its cell")]


def test_a_run_of_both_copies_explains_a_conflict_in_an_instance_copy_with_nova_api_s_flavors(demo_cloud):
    """apply_copies (the command line's write) meets a conflict in a cell: a cell database has no
    flavors, so the conflict is re-planned with nova_api's (it raised AttributeError before)."""
    with opened_cloud(demo_cloud.api) as (api, pairs, flavors, scope):
        cloud = service.plan_both_copies(api, pairs, scope, flavors=flavors)
        cell1 = next(c for c in cloud.copies if c.where.startswith("cell1"))
        moving = next(iter(cell1.plan.changes))
        with connect(demo_cloud.cells["cell1"]) as conn, conn.cursor() as cur:  # Nova starts a live migration
            cur.execute("UPDATE instances SET task_state = 'migrating' WHERE uuid = %s", (moving.instance_uuid,))
        applied = service.apply_copies(service.databases_of(api, pairs), cloud.copies)

    done = next(d for d in applied if d.copy is cell1)
    assert done.result.conflicts == [moving.id]
    assert [(n.id, n.reason) for n in done.conflicts] == [(moving.id, (
        "changed since planned, not overwritten; now left alone: an operation is under way (task_state migrating)"))]


def test_instances_missing_from_their_cell_are_found_with_or_without_reading_the_cell_from_nova_api(
        demo_cloud, caplog):
    """On one server nova_api's connection finds them in one anti-join; a nova_api user who may
    not read the cells' schemas gets the same instances from the uuid merge."""
    from dbtools import create_secret_account, drop_account, map_instances
    from nova_flavor_sync.cells import (
        MISSING_FROM_CELL,
        instances_to_leave_alone,
        locate_cells,
        open_cells,
        read_cell_mappings,
    )
    from nova_flavor_sync.dburl import parse_db_url

    unbuilt = [str(UUID(int=n)) for n in range(1, 4)]
    map_instances(demo_cloud.api, unbuilt)  # mapped to cell1, with an instances row there ...
    with connect(demo_cloud.cells["cell1"]) as conn, conn.cursor() as cur:  # ... which goes again
        cur.execute("DELETE FROM instances WHERE uuid IN %s", (unbuilt[:2],))
    cell_urls = {name: f"mysql+pymysql://{p.user}:@{p.host}:{p.port}/{p.database}"
                 for name, p in demo_cloud.cells.items()}
    user, api_only = create_secret_account(demo_cloud.api)  # may read nova_api, not the cells
    try:
        found = []
        caplog.set_level(logging.DEBUG, logger="nova_flavor_sync.cells")
        for params in (demo_cloud.api, parse_db_url(api_only)):
            with service.connect(params) as api, \
                    open_cells(locate_cells(read_cell_mappings(api), cell_urls=cell_urls)) as cells:
                found.append(instances_to_leave_alone(api, cells))
    finally:
        drop_account(demo_cloud.api, user)
    joined, merged = found
    assert caplog.text.count("no anti-join from nova_api") == 2  # the second user's, for cell1 and cell2 only
    assert joined == merged
    assert {u for u, reason in joined.items() if reason == MISSING_FROM_CELL} >= set(unbuilt[:2])
    assert unbuilt[2] not in joined
