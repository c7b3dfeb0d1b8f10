"""make_plan: the pure comparison of flavor copies with flavors."""

from __future__ import annotations

import json

import pytest

from nova_flavor_sync import diff
from nova_flavor_sync.apply import sync_targets
from nova_flavor_sync.db import MISSING_INSTANCE_ROW, left_alone_reason
from nova_flavor_sync.demo import load_sample_specs
from nova_flavor_sync.diff import RowPlanner, make_plan
from nova_flavor_sync.flavor import Flavor
from nova_flavor_sync.plan import SpecRow
from nova_flavor_sync.scope import Scope
from nova_flavor_sync.spec_json import (
    INSTANCE_FLAVOR,
    REQUEST_SPEC,
    SpecShapeError,
    read_embedded_flavor,
    rewrite_extra_specs,
    sha256_text,
)

# Row 20 of the real sample: flavor id 1, flavorid "24", name gp2.small.
BASE = next(r for r in load_sample_specs() if r["id"] == 20)
COPY = read_embedded_flavor(BASE["spec"])
UUID = BASE["instance_uuid"]


def spec_with(extra_specs: dict[str, str]) -> str:
    return rewrite_extra_specs(BASE["spec"], extra_specs)


def row(row_id: int = 1, extra_specs: dict[str, str] | None = None, **kwargs) -> SpecRow:
    spec = spec_with(extra_specs) if extra_specs is not None else BASE["spec"]
    return SpecRow(row_id, kwargs.pop("uuid", f"00000000-0000-0000-0000-{row_id:012d}"), spec, **kwargs)


def flavors(extra_specs: dict[str, str | None] | None = None) -> dict[int, Flavor]:
    """The row's flavor as it is now in the database, with these extra specs."""
    flavor = Flavor(COPY.id, COPY.flavorid, COPY.name, dict(COPY.extra_specs if extra_specs is None else extra_specs))
    return {flavor.id: flavor}


def test_a_row_equal_to_its_flavor_is_in_sync_and_costs_nothing():
    plan = make_plan(flavors(), [row()], Scope())
    assert (plan.rows_read, plan.in_sync, plan.changes) == (1, 1, [])


def test_key_order_alone_is_not_drift():
    reordered = dict(reversed(list(COPY.extra_specs.items())))
    assert list(reordered) != list(COPY.extra_specs)
    assert make_plan(flavors(reordered), [row()], Scope()).in_sync == 1


def test_changed_added_and_removed_safe_keys_are_planned_with_the_exact_new_bytes():
    wanted = dict(COPY.extra_specs)
    wanted["aggregate_instance_extra_specs:storage_type"] = "ceph"  # changed (was nvme)
    wanted["quota:vif_inbound_average"] = "1000"  # added
    del wanted["quota:disk_read_iops_sec"]  # removed

    plan = make_plan(flavors(wanted), [row()], Scope())

    (change,) = plan.changes
    assert {(c.key, c.kind, c.old, c.new) for c in change.diff.applied} == {
        ("aggregate_instance_extra_specs:storage_type", "changed", "nvme", "ceph"),
        ("quota:vif_inbound_average", "added", None, "1000"),
        ("quota:disk_read_iops_sec", "removed", "500", None),
    }
    assert change.old_sha256 == sha256_text(BASE["spec"])
    assert change.new_sha256 == sha256_text(spec_with(wanted))
    assert change.diff.held_back == ()


def test_risky_keys_are_held_back_by_default_and_synced_with_all_keys():
    wanted = {**COPY.extra_specs, "hw:cpu_policy": "dedicated", "resources:VCPU": "0"}

    default = make_plan(flavors(wanted), [row()], Scope())
    everything = make_plan(flavors(wanted), [row()], Scope(all_keys=True))

    assert default.changes == [] and len(default.held_back) == 1
    assert {c.key for c in default.held_back[0].diff.held_back} == {"hw:cpu_policy", "resources:VCPU"}
    (change,) = everything.changes
    assert change.new_sha256 == sha256_text(spec_with(wanted))


def test_a_mixed_row_syncs_the_safe_keys_and_keeps_the_old_risky_values():
    wanted = {**COPY.extra_specs, "hw:cpu_policy": "dedicated", "aggregate_instance_extra_specs:storage_type": "ceph"}

    (change,) = make_plan(flavors(wanted), [row()], Scope()).changes

    expected = {**COPY.extra_specs, "aggregate_instance_extra_specs:storage_type": "ceph"}  # cpu_policy stays shared
    assert dict(change.diff.target_extra_specs) == expected
    assert change.new_sha256 == sha256_text(spec_with(expected))
    assert [c.key for c in change.diff.held_back] == ["hw:cpu_policy"]


def test_a_deleted_flavor_makes_an_orphan_that_is_never_touched():
    other = Flavor(COPY.id + 100, "other", "other", {})
    plan = make_plan({other.id: other}, [row()], Scope(all_keys=True))
    assert plan.changes == [] and "no longer exists" in plan.orphans[0].reason


def test_a_recreated_flavor_with_the_same_flavorid_makes_an_orphan():
    recreated = Flavor(COPY.id + 100, COPY.flavorid, COPY.name, {"aggregate_instance_extra_specs:storage_type": "ceph"})
    plan = make_plan({recreated.id: recreated}, [row()], Scope(all_keys=True))
    assert plan.changes == []
    assert plan.orphans[0].reason == (
        f"flavor id {COPY.id} was deleted; flavorid {COPY.flavorid} was re-created as id {recreated.id}"
    )


def test_an_id_that_now_has_another_flavorid_makes_an_orphan():
    reused = Flavor(COPY.id, "not-" + COPY.flavorid, "reused", {})
    plan = make_plan({reused.id: reused}, [row()], Scope(all_keys=True))
    assert plan.changes == [] and "now has flavorid" in plan.orphans[0].reason


def test_a_row_to_leave_alone_is_skipped_and_reported_with_its_reason():
    wanted = {**COPY.extra_specs, "aggregate_instance_extra_specs:storage_type": "ceph"}
    plan = make_plan(flavors(wanted), [row(left_alone="instance is queued for delete")], Scope())
    assert plan.changes == [] and [n.reason for n in plan.left_alone] == ["instance is queued for delete"]
    assert plan.summary()["left_alone_by_reason"] == {"instance is queued for delete": 1}


def test_a_malformed_row_is_an_error_entry_and_the_run_goes_on():
    wanted = {**COPY.extra_specs, "aggregate_instance_extra_specs:storage_type": "ceph"}
    bad = SpecRow(1, "00000000-0000-0000-0000-000000000001", "{oops")
    plan = make_plan(flavors(wanted), [bad, row(2)], Scope())
    assert [(e.id, "not valid JSON" in e.reason) for e in plan.errors] == [(1, True)]
    assert [c.id for c in plan.changes] == [2]


def test_a_null_value_in_the_flavor_is_an_error_not_a_guess():
    plan = make_plan(flavors({**COPY.extra_specs, "quota:cpu_shares": None}), [row()], Scope())
    assert plan.changes == [] and "NULL" in plan.errors[0].reason


def test_key_prefix_limits_the_keys_and_others_are_neither_synced_nor_held_back():
    wanted = {**COPY.extra_specs, "aggregate_instance_extra_specs:storage_type": "ceph",
              "quota:disk_read_iops_sec": "1", "hw:cpu_policy": "dedicated"}
    plan = make_plan(flavors(wanted), [row()], Scope(key_prefixes=("aggregate_instance_extra_specs:",)))
    (change,) = plan.changes
    assert [c.key for c in change.diff.applied] == ["aggregate_instance_extra_specs:storage_type"]
    assert change.diff.held_back == ()
    assert dict(change.diff.target_extra_specs)["quota:disk_read_iops_sec"] == "500"


def test_a_key_prefix_with_no_drift_leaves_the_row_in_sync():
    wanted = {**COPY.extra_specs, "quota:disk_read_iops_sec": "1"}
    plan = make_plan(flavors(wanted), [row()], Scope(key_prefixes=("aggregate_instance_extra_specs:",)))
    assert plan.in_sync == 1 and plan.changes == []


def test_flavor_and_instance_scope_leave_other_rows_out():
    wanted = {**COPY.extra_specs, "aggregate_instance_extra_specs:storage_type": "ceph"}
    rows = [row(1), row(2)]
    by_instance = make_plan(flavors(wanted), rows, Scope(instance_uuids=frozenset({rows[1].instance_uuid})))
    by_flavor = make_plan(flavors(wanted), rows, Scope(flavor_ids=frozenset({999}), flavorids=frozenset({"x"})))
    assert [c.id for c in by_instance.changes] == [2] and by_instance.out_of_scope == 1
    assert by_flavor.changes == [] and by_flavor.out_of_scope == 2


def test_rows_with_the_same_copy_share_one_diff():
    wanted = {**COPY.extra_specs, "aggregate_instance_extra_specs:storage_type": "ceph"}
    plan = make_plan(flavors(wanted), [row(1), row(2)], Scope())
    assert plan.changes[0].diff is plan.changes[1].diff


def test_flavors_with_the_same_extra_specs_each_get_their_own_diff():
    # Two flavors of one family share their extra specs, and so their copies' key changes;
    # each copy is still planned against its own flavor.
    wanted = {**COPY.extra_specs, "aggregate_instance_extra_specs:storage_type": "ceph"}
    document = json.loads(BASE["spec"])
    document["nova_object.data"]["flavor"]["nova_object.data"].update(id=2, flavorid="25", name="gp2.medium")
    twin_spec = json.dumps(document)
    both = {**flavors(wanted), 2: Flavor(2, "25", "gp2.medium", dict(wanted))}
    plan = make_plan(both, [row(1), SpecRow(2, "u2", twin_spec)], Scope())
    first, twin = plan.changes
    assert (first.diff.flavor_id, first.diff.flavorid, twin.diff.flavor_id, twin.diff.flavorid) == (1, "24", 2, "25")
    assert first.diff.applied == twin.diff.applied and twin.diff.flavor_name == "gp2.medium"
    assert twin.new_sha256 == sha256_text(rewrite_extra_specs(twin_spec, wanted))


def test_the_digest_binds_rows_bytes_and_scope():
    wanted = {**COPY.extra_specs, "aggregate_instance_extra_specs:storage_type": "ceph"}
    base = make_plan(flavors(wanted), [row(1), row(2)], Scope()).digest
    assert make_plan(flavors(wanted), [row(1), row(2)], Scope()).digest == base
    assert make_plan(flavors(wanted), [row(1)], Scope()).digest != base
    assert make_plan(flavors(wanted), [row(1), row(2)], Scope(all_keys=True)).digest != base
    other_target = {**wanted, "quota:disk_read_iops_sec": "7"}
    assert make_plan(flavors(other_target), [row(1), row(2)], Scope()).digest != base
    drifted = [row(1), row(2, {**COPY.extra_specs, "quota:cpu_shares": "1"})]
    assert make_plan(flavors(wanted), drifted, Scope()).digest != base


def test_summary_counts_by_flavor_key_and_risk():
    wanted = {**COPY.extra_specs, "aggregate_instance_extra_specs:storage_type": "ceph",
              "quota:disk_read_iops_sec": "1", "hw:cpu_policy": "dedicated"}
    plan = make_plan(flavors(wanted), [row(1), row(2), SpecRow(3, "u", "bad")], Scope())
    summary = plan.summary()
    assert summary["by_flavor"] == {COPY.name: 2}
    assert summary["by_key"] == {"aggregate_instance_extra_specs:storage_type": 2, "quota:disk_read_iops_sec": 2}
    assert summary["by_risk"] == {"guest": 2, "scheduling": 2}
    assert summary["held_back_by_key"] == {"hw:cpu_policy": 2}
    assert (summary["to_update"], summary["errors"], summary["skipped"]) == (2, 1, 0)
    json.dumps(summary)  # goes to XCom as is


def test_every_real_sample_row_plans_cleanly():
    samples = load_sample_specs()
    all_flavors = {}
    rows = []
    for sample in samples:
        copy = read_embedded_flavor(sample["spec"])
        changed = {**copy.extra_specs, "aggregate_instance_extra_specs:x": "y"}
        all_flavors[copy.id] = Flavor(copy.id, copy.flavorid, copy.name, changed)
        rows.append(SpecRow(sample["id"], sample["instance_uuid"], sample["spec"]))
    plan = make_plan(all_flavors, rows, Scope())
    assert len(plan.changes) == len(samples) and plan.errors == []


# -- recognising a flavor copy already judged (the fast path) -------------------------------


def _outcomes_parsing_every_row(all_flavors, rows, scope):
    """What a planner that never recognises a copy (parses every row in full) says of each row."""

    class NeverRecognises(RowPlanner):
        def _recognise(self, spec, at):
            return None

    planner = NeverRecognises(all_flavors, scope)
    return [planner.plan_row(r) for r in rows]


def test_recognised_rows_get_exactly_what_a_full_parse_gives():
    samples = load_sample_specs()
    rows, all_flavors = [], {}
    for n, sample in enumerate(samples * 3):  # every copy three times: twice recognised
        copy = read_embedded_flavor(sample["spec"])
        rows.append(SpecRow(n + 1, sample["instance_uuid"], sample["spec"]))
        if copy.id % 3:  # a third of the flavors drifted, with a safe and a risky key
            all_flavors[copy.id] = Flavor(
                copy.id, copy.flavorid, copy.name,
                {**copy.extra_specs, "aggregate_instance_extra_specs:x": "y", "hw:cpu_policy": "shared"},
            )
        elif copy.id % 2:
            all_flavors[copy.id] = Flavor(copy.id, copy.flavorid, copy.name, dict(copy.extra_specs))
    for scope in (Scope(), Scope(all_keys=True)):
        fast = make_plan(all_flavors, rows, scope)
        slow = _outcomes_parsing_every_row(all_flavors, rows, scope)
        slow_changes = [o for o in slow if not isinstance(o, str | tuple)]
        assert list(fast.changes) == slow_changes and len(slow_changes) > 0
        assert fast.in_sync == slow.count("in_sync") > 0
        slow_orphans = [o[1].reason for o in slow if isinstance(o, tuple) and o[0] == "orphans"]
        assert [n.reason for n in fast.orphans] == slow_orphans and slow_orphans
        assert len(fast.held_back) == sum(1 for o in slow if isinstance(o, tuple) and o[0] == "held_back")
        assert fast.errors == []


def test_a_damaged_row_that_carries_a_known_stale_copy_is_planned_and_refused_when_written():
    # The planner does not parse a row it recognises; apply parses every row it rewrites.
    wanted = {**COPY.extra_specs, "aggregate_instance_extra_specs:storage_type": "ceph"}
    damaged = BASE["spec"][:-1] + ", }"  # invalid JSON after the flavor
    plan = make_plan(flavors(wanted), [row(1), SpecRow(2, "u2", damaged)], Scope())
    assert [c.id for c in plan.changes] == [1, 2]
    with pytest.raises(SpecShapeError, match="not valid JSON"):
        rewrite_extra_specs(damaged, wanted)
    alone = make_plan(flavors(wanted), [SpecRow(2, "u2", damaged)], Scope())  # first of its copy: parsed
    assert alone.changes == [] and "not valid JSON" in alone.errors[0].reason


# The sample's flavor data ends: ... "extra_specs": {...}, "description": null, ..., "deleted": false}
FLAVOR_TAIL = '"deleted_at": null, "deleted": false}'


def with_flavor_tail(spec: str, tail: str) -> str:
    """``spec`` with ``tail`` in its flavor's data, after every key Nova writes there."""
    assert spec.count(FLAVOR_TAIL) == 1
    return spec.replace(FLAVOR_TAIL, FLAVOR_TAIL[:-1] + tail + "}")


def instance_flavor_of(spec: str, description: str | None) -> str:
    """The instance's own copy of a RequestSpec's flavor, as Instance._save_flavor writes it."""
    flavor = json.loads(spec)["nova_object.data"]["flavor"]
    flavor["nova_object.data"]["description"] = description
    return json.dumps({"cur": flavor, "old": None, "new": None})


def test_a_copy_judged_in_a_cell_is_recognised_in_the_request_specs_by_its_head():
    # The instance's copy has the description nulled; the RequestSpec's keeps it: the texts
    # differ after extra_specs only, and the RequestSpec's is not parsed again.
    wanted = {**COPY.extra_specs, "aggregate_instance_extra_specs:storage_type": "ceph"}
    described = with_flavor_tail(BASE["spec"], "").replace('"description": null', '"description": "two vCPU"', 1)
    cells = RowPlanner(flavors(wanted), Scope(), INSTANCE_FLAVOR)
    instance = cells.plan_row(SpecRow(1, UUID, instance_flavor_of(BASE["spec"], None)))
    assert instance.new_sha256 == sha256_text(
        rewrite_extra_specs(instance_flavor_of(BASE["spec"], None), wanted, layout=INSTANCE_FLAVOR))
    request_specs = cells.for_layout(REQUEST_SPEC)
    damaged = described[:-1] + ", }"  # invalid JSON after the flavor: planned only if recognised
    fresh = RowPlanner(flavors(wanted), Scope()).plan_row(SpecRow(2, UUID, described))
    assert fresh.new_sha256 == sha256_text(rewrite_extra_specs(described, wanted))
    recognised = request_specs.plan_row(SpecRow(2, UUID, damaged))  # the first RequestSpec: not parsed
    assert recognised.diff == fresh.diff and recognised.old_sha256 == sha256_text(damaged)
    assert recognised.new_sha256 == sha256_text(damaged.replace(  # the damage kept, byte for byte
        json.dumps(COPY.extra_specs), json.dumps(dict(sorted(wanted.items()))), 1))
    again = request_specs.plan_row(SpecRow(3, UUID, described))
    assert (again.diff, again.old_sha256, again.new_sha256) == (fresh.diff, fresh.old_sha256, fresh.new_sha256)


def test_a_copy_whose_id_after_its_extra_specs_is_another_is_recognised_by_its_whole_flavor_only():
    # Nova writes the id, name and flavorid before extra_specs; a text that repeats one after
    # them with another value is another flavor's copy than its head says, so it is not
    # recognised by its head: a text with that head and another tail is parsed, not trusted.
    wanted = {**COPY.extra_specs, "aggregate_instance_extra_specs:storage_type": "ceph"}
    repeated = with_flavor_tail(BASE["spec"], ', "id": 7')
    damaged = with_flavor_tail(BASE["spec"], ', "id": 7, "swap": 0')[:-1] + ", }"
    both = {**flavors(wanted), 7: Flavor(7, COPY.flavorid, COPY.name, wanted)}
    plan = make_plan(both, [SpecRow(1, "u1", repeated), SpecRow(2, "u2", damaged)], Scope())
    assert [(c.id, c.diff.flavor_id) for c in plan.changes] == [(1, 7)]
    assert "not valid JSON" in plan.errors[0].reason


def test_a_row_recognised_by_its_head_is_not_rewritten_if_its_copy_is_another_flavor():
    # A key repeated after extra_specs (never written by Nova) overrides the one in the head:
    # the plan took the row for flavor 1's copy; apply parses it in full and refuses it.
    wanted = {**COPY.extra_specs, "aggregate_instance_extra_specs:storage_type": "ceph"}
    other = with_flavor_tail(BASE["spec"], ', "id": 7')
    plan = make_plan(flavors(wanted), [row(1), SpecRow(2, "u2", other)], Scope())
    assert [c.id for c in plan.changes] == [1, 2]
    rewrite = {target.id: target.build for target in sync_targets(plan.changes)}
    assert sha256_text(rewrite[1](BASE["spec"])) == plan.changes[0].new_sha256
    with pytest.raises(SpecShapeError, match=r"\(id 7, flavorid 24\) is not the one planned \(id 1"):
        rewrite[2](other)


def test_a_copy_in_a_text_not_in_novas_format_is_an_error_only_when_it_must_be_rewritten():
    compact = json.dumps(json.loads(BASE["spec"]), separators=(",", ":"))
    in_sync = make_plan(flavors(), [SpecRow(1, "u", compact)], Scope())
    assert in_sync.in_sync == 1
    wanted = {**COPY.extra_specs, "aggregate_instance_extra_specs:storage_type": "ceph"}
    stale = make_plan(flavors(wanted), [row(1), SpecRow(2, "u", compact)], Scope())
    assert [c.id for c in stale.changes] == [1]
    assert "not in Nova's serialization format" in stale.errors[0].reason


def test_plans_of_consecutive_id_ranges_merge_into_the_plan_of_all_rows():
    from nova_flavor_sync.diff import merge_plans

    samples = load_sample_specs()
    rows, all_flavors = [], {}
    for n, sample in enumerate(samples * 4):
        copy = read_embedded_flavor(sample["spec"])
        rows.append(SpecRow(n + 1, sample["instance_uuid"], sample["spec"]))
        if copy.id % 3:
            all_flavors[copy.id] = Flavor(copy.id, copy.flavorid, copy.name,
                                          {**copy.extra_specs, "aggregate_instance_extra_specs:x": "y"})
    whole = make_plan(all_flavors, rows, Scope())
    parts = [make_plan(all_flavors, rows[a:b], Scope()) for a, b in ((0, 10), (10, 11), (11, 11), (11, len(rows)))]
    merged = merge_plans(Scope(), parts)
    assert merged.digest == whole.digest and list(merged.changes) == list(whole.changes)
    assert merged.summary() == whole.summary() and merged.orphans == whole.orphans


class LeftAloneLater:
    """The instances to leave alone, coming only after ``after`` rows were judged (as in a plan worker)."""

    def __init__(self, reasons: dict[str, str], after: int) -> None:
        self.reasons, self.after, self.asked, self.waited = reasons, after, 0, False

    def known(self):
        self.asked += 1
        return self.reasons if self.asked > self.after else None

    def wait(self):
        self.waited = True
        return self.reasons

    reason = staticmethod(left_alone_reason)


def plan_outcome(plan):
    return (plan.digest, list(plan.changes), list(plan.left_alone), list(plan.errors), list(plan.held_back),
            plan.in_sync, plan.out_of_scope, plan.rows_read)


@pytest.mark.parametrize("pending_rows", [50_000, 3])  # 3: the plan waits for them
@pytest.mark.parametrize("after", [0, 1, 4, 100])  # 100: they come only after the last row
def test_rows_judged_before_the_instances_to_leave_alone_came_are_decided_as_if_they_had(
        after, pending_rows, monkeypatch):
    monkeypatch.setattr(diff, "PENDING_ROWS", pending_rows)
    wanted = {**COPY.extra_specs, "aggregate_instance_extra_specs:storage_type": "ceph"}
    busy = "an operation is under way (task_state migrating)"
    rows = [row(1), row(2, wanted), row(3), row(4, left_alone=busy), row(5, left_alone=MISSING_INSTANCE_ROW),
            row(6), row(7, wanted), row(8, left_alone=busy), row(9), row(10, {**wanted, "hw:cpu_policy": "dedicated"})]
    uuid = {r.id: r.instance_uuid for r in rows}
    # queued for delete: a stale row, an in-sync one, a busy one, one without its instance row
    reasons = {uuid[i]: "instance is queued for delete" for i in (1, 2, 4, 5)} | {"elsewhere": "x"}
    known_from_the_start = [SpecRow(r.id, r.instance_uuid, r.spec, r.updated_at, left_alone_reason(r, reasons))
                            for r in rows]

    expected = make_plan(flavors(wanted), known_from_the_start, Scope())
    later = LeftAloneLater(reasons, after)
    judged_first = make_plan(flavors(wanted), rows, Scope(), left_alone=later)

    assert plan_outcome(judged_first) == plan_outcome(expected)
    assert [n.reason for n in expected.left_alone] == ["instance is queued for delete"] * 3 + [
        MISSING_INSTANCE_ROW, busy]
    assert len(expected.changes) == 3 and expected.in_sync == 1
    (held_back,) = judged_first.held_back  # a note with its SpecDiff: the planner's own object
    assert [c.key for c in held_back.diff.held_back] == ["hw:cpu_policy"]
    assert later.waited == (after >= min(pending_rows, len(rows)))
