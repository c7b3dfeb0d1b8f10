"""How the Airflow apply step splits a big plan into mapped tasks (nova_flavor_sync_airflow.apply_ranges)."""

from __future__ import annotations

import nova_flavor_sync_airflow as airflow_side
import pytest

from nova_flavor_sync.plan import Plan, PlanDigest, RowChange, SpecDiff
from nova_flavor_sync.plan_file import load_plan, save_plan
from nova_flavor_sync.scope import Scope

CHANGED_ROWS_AT_1M = 450_000  # the benchmark's million rows, 45% stale


@pytest.fixture(scope="module")
def big_plan_file(tmp_path_factory):
    diff = SpecDiff(1, "f", "m1.xlarge", (), (), ())
    plan = Plan(scope=Scope())
    digest = PlanDigest(plan.scope)
    for n in range(CHANGED_ROWS_AT_1M):
        row_id = 2 * n + 7  # gaps, as in a real table
        change = RowChange(row_id, f"uuid-{row_id}", f"{n:064x}", f"{n + 1:064x}", diff)
        plan.changes.append(change)
        digest.add(row_id, change.old_sha256, change.new_sha256)
    plan.digest = digest.hexdigest()
    return plan, save_plan(plan, tmp_path_factory.mktemp("plans"))


@pytest.mark.parametrize(("batch_size", "auto_tune"), [(1, False), (500, False), (500, True)])
def test_a_million_row_plan_stays_within_airflows_mapping_limit_and_covers_every_row_once(
    big_plan_file, batch_size, auto_tune
):
    plan, path = big_plan_file
    ranges = airflow_side.apply_ranges(str(path), batch_size, auto_tune=auto_tune)
    assert len(ranges) <= airflow_side.MAX_APPLY_TASKS < 1024  # core.max_map_length's default
    assert sum(r["rows"] for r in ranges) == CHANGED_ROWS_AT_1M
    assert all(a["last_id"] < b["first_id"] for a, b in zip(ranges, ranges[1:], strict=False))  # disjoint
    assert ranges[0]["first_id"] == 7 and ranges[-1]["last_id"] == 2 * CHANGED_ROWS_AT_1M + 5
    per_task = {r["rows"] for r in ranges[:-1]}
    assert per_task == {max(batch_size if not auto_tune else 5000, CHANGED_ROWS_AT_1M // airflow_side.MAX_APPLY_TASKS)}


def test_an_apply_task_reads_only_its_own_range_of_a_big_plan(big_plan_file):
    plan, path = big_plan_file
    first, *_ = airflow_side.apply_ranges(str(path), 500)
    saved = load_plan(path, expected_digest=plan.digest, first_id=first["first_id"], last_id=first["last_id"])
    assert len(saved.changes) == first["rows"] == 500
