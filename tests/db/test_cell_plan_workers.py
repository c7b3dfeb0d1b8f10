"""Planning the cells' instance copies in worker processes, and what both copies leave alone.

Against the real demo cloud (884 instances in cell1, 576 in cell2): the plan made by worker
processes must be exactly what one process makes, with the instances left alone that
``cells.instances_to_leave_alone`` gives, whether the copies are planned together
(``plan_both_copies``) or one at a time (``plan_copy``, as the DAG's mapped tasks do).
"""

from __future__ import annotations

import psutil
import pytest

from dbtools import connect, opened_cloud
from nova_flavor_sync import service
from nova_flavor_sync.cells import instances_to_leave_alone
from nova_flavor_sync.db import CELL0_UUID, NovaCellDb
from nova_flavor_sync.plan_worker import split_ids


def plan_both(cloud, workers):
    with opened_cloud(cloud.api) as (api, mapped, flavors, scope):
        both = service.plan_both_copies(api, mapped, scope, flavors=flavors, workers=workers)
        left_alone = instances_to_leave_alone(api, {mapping.uuid: db for mapping, db in mapped})
        by_scan = service.make_plan(api, scope, flavors=flavors, left_alone=left_alone)
    return both, by_scan


def summary(plan):
    return (plan.digest, list(plan.changes), plan.summary(), plan.left_alone, plan.errors, plan.orphans,
            plan.rows_read, plan.in_sync)


@pytest.mark.parametrize("workers", [2, 3])
def test_cells_planned_in_workers_make_exactly_the_plan_one_process_makes(demo_cloud, workers):
    alone, _ = plan_both(demo_cloud, 1)
    together, _ = plan_both(demo_cloud, workers)

    assert together.digest == alone.digest
    assert [c.where for c in together.copies] == [c.where for c in alone.copies]
    for mine, theirs in zip(together.copies, alone.copies, strict=True):
        assert summary(mine.plan) == summary(theirs.plan), mine.where
    assert [len(c.plan.changes) for c in together.copies] == [726, 409, 317]
    assert together.never_written == alone.never_written
    assert not psutil.Process().children()  # every worker has exited


@pytest.mark.parametrize("workers", [None, 2])
def test_one_cell_copy_planned_alone_in_workers_is_the_copy_both_copies_plan(demo_cloud, workers, monkeypatch):
    monkeypatch.setattr(service, "PLAN_WORKERS_FROM", 100)  # the demo's cells are small: force the workers
    together, _ = plan_both(demo_cloud, 1)
    with opened_cloud(demo_cloud.api) as (api, mapped, flavors, scope):
        left_alone = instances_to_leave_alone(api, {mapping.uuid: db for mapping, db in mapped})
        alone = [service.plan_copy(api, mapped, key, scope, flavors=flavors, left_alone=left_alone, workers=workers)
                 for key in service.copy_keys(mapped)]
    assert [c.key for c in alone] == [c.key for c in together.copies]
    for mine, theirs in zip(alone, together.copies, strict=True):
        assert summary(mine.plan) == summary(theirs.plan), mine.where
    assert not psutil.Process().children()


def test_requestspecs_leave_alone_what_a_scan_of_the_cells_would(demo_cloud):
    both, by_scan = plan_both(demo_cloud, 1)
    api_plan = both.copies[0].plan

    assert summary(api_plan) == summary(by_scan)
    reasons = api_plan.summary()["left_alone_by_reason"]
    assert reasons["instance is queued for delete"] == 56
    assert reasons["instance has no cell yet (still being built)"] == 10
    assert reasons["instance never scheduled (in cell0)"] == 30
    assert sum(n for r, n in reasons.items() if "resize" in r or "task_state" in r) == 106


def test_a_request_spec_without_an_instance_mapping_is_left_alone(demo_cloud):
    with connect(demo_cloud.api) as conn, conn.cursor() as cur:
        cur.execute("SELECT instance_uuid FROM request_specs ORDER BY id LIMIT 1")
        (uuid,) = cur.fetchone()
        cur.execute("DELETE FROM instance_mappings WHERE instance_uuid = %s", (uuid,))
    with service.connect(demo_cloud.api) as api:
        found = api.instances_without_a_cell()
    assert found[uuid] == "instance has no instance mapping"
    assert sorted(found.values()).count("instance has no cell yet (still being built)") == 10
    assert sorted(found.values()).count("instance never scheduled (in cell0)") == 30


def test_instances_without_a_cell_answers_as_the_single_join_did(demo_cloud):
    """The two-query instances_without_a_cell gives what the one query joining the mappings' rows gave."""
    with connect(demo_cloud.api) as conn, conn.cursor() as cur:
        cur.execute("SELECT instance_uuid FROM request_specs ORDER BY id LIMIT 3")
        no_mapping, no_cell, to_cell0 = (uuid for (uuid,) in cur.fetchall())
        cur.execute("DELETE FROM instance_mappings WHERE instance_uuid = %s", (no_mapping,))
        cur.execute("UPDATE instance_mappings SET cell_id = NULL WHERE instance_uuid = %s", (no_cell,))
        cur.execute("UPDATE instance_mappings SET cell_id = (SELECT id FROM cell_mappings WHERE uuid = %s) "
                    "WHERE instance_uuid = %s", (CELL0_UUID, to_cell0))
        cur.execute("SELECT instance_uuid FROM instance_mappings WHERE cell_id IS NULL AND instance_uuid != %s "
                    "ORDER BY instance_uuid LIMIT 1", (no_cell,))
        (no_spec,) = cur.fetchone()
        cur.execute("DELETE FROM request_specs WHERE instance_uuid = %s", (no_spec,))  # not asked about
        cur.execute(
            "SELECT r.instance_uuid, m.id, m.cell_id, c.uuid FROM request_specs r "
            "LEFT JOIN instance_mappings m ON m.instance_uuid = r.instance_uuid "
            "LEFT JOIN cell_mappings c ON c.id = m.cell_id "
            "WHERE m.id IS NULL OR m.cell_id IS NULL OR c.uuid = %s",
            (CELL0_UUID,),
        )
        joined = {
            uuid: "instance has no instance mapping" if mapping is None
            else "instance has no cell yet (still being built)" if cell_id is None
            else "instance never scheduled (in cell0)"
            for uuid, mapping, cell_id, _cell_uuid in cur.fetchall()
        }
    with service.connect(demo_cloud.api) as api:
        found = api.instances_without_a_cell()
    assert found == joined
    assert (found[no_mapping], found[no_cell], found[to_cell0]) == (
        "instance has no instance mapping", "instance has no cell yet (still being built)",
        "instance never scheduled (in cell0)")
    assert no_spec not in found and len(found) >= 10 + 30


def test_a_cell_is_read_in_id_ranges_without_gaps_or_overlaps(demo_cloud):
    with NovaCellDb(demo_cloud.cells["cell1"]) as db:
        ranges = split_ids(db.flavor_id_bounds(), 3)
        parts = [[r.id for r in db.iter_flavor_rows(page_size=7, id_range=ids)] for ids in ranges]
        every = [r.id for r in db.iter_flavor_rows()]
    assert [i for part in parts for i in part] == every and len(every) == 884


@pytest.mark.parametrize("workers", [1, 2])
def test_an_instance_whose_flavor_alone_says_it_is_in_flux_is_left_alone_in_both_copies(
        demo_cloud, workers, monkeypatch):
    # Planned together, the cells' plans find such instances as they read their flavors (no
    # scan of every flavor): the RequestSpecs wait for them. A failed resize can leave an
    # instance active, with no task_state, and its new flavor set.
    import json

    from nova_flavor_sync.db import IN_FLUX, NOT_IN_FLUX_END

    monkeypatch.setattr(service, "PLAN_WORKERS_FROM", 100)  # the demo's cells are small: force the workers
    with connect(demo_cloud.cells["cell2"]) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT e.instance_uuid, e.flavor FROM instance_extra e JOIN instances i ON i.uuid = e.instance_uuid "
            "WHERE i.deleted = 0 AND i.task_state IS NULL AND i.vm_state = 'active' ORDER BY e.id LIMIT 1"
        )
        uuid, flavor = cur.fetchone()
        assert flavor.endswith(NOT_IN_FLUX_END)
        document = json.loads(flavor)
        document["new"] = document["cur"]
        cur.execute("UPDATE instance_extra SET flavor = %s WHERE instance_uuid = %s", (json.dumps(document), uuid))

    both, by_scan = plan_both(demo_cloud, workers)

    for copy in both.copies:
        notes = {note.instance_uuid: note.reason for note in copy.plan.left_alone}
        assert notes.get(uuid) == (IN_FLUX if copy.cell_uuid in (None, both.copies[2].cell_uuid) else None), copy.where
    assert summary(both.copies[0].plan) == summary(by_scan)  # what the scan for them gives
    assert not psutil.Process().children()
