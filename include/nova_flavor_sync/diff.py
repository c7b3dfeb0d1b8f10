"""Compare RequestSpec flavor copies with their flavors and build a Plan (pure, no I/O).

``make_plan`` is the functional core of every mode: dry run, sync, verify and the drift
check all call it. The common case, a row already in sync, costs one JSON parse and one
dict comparison.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from nova_flavor_sync.plan import (
    Flavor,
    KeyChange,
    Plan,
    PlanDigest,
    RowChange,
    RowNote,
    Scope,
    SpecDiff,
    SpecRow,
)
from nova_flavor_sync.policy import classify_key, is_risky
from nova_flavor_sync.spec_json import (
    SpecShapeError,
    read_embedded_flavor,
    rewrite_extra_specs,
    sha256_text,
)

IN_SYNC = "in_sync"  # plan_row's result for a row that needs nothing
OUT_OF_SCOPE = "out_of_scope"  # ... and for a row outside --flavor / --instance
RowOutcome = RowChange | tuple[str, RowNote] | str


def make_plan(flavors: Mapping[int, Flavor], rows: Iterable[SpecRow], scope: Scope) -> Plan:
    """Compare every row with its flavor; rows must come in ascending id order."""
    plan = Plan(scope=scope)
    digest = PlanDigest(scope)
    planner = RowPlanner(flavors, scope)
    for row in rows:
        plan.rows_read += 1
        outcome = planner.plan_row(row)
        if outcome == IN_SYNC:
            plan.in_sync += 1
        elif outcome == OUT_OF_SCOPE:
            plan.out_of_scope += 1
        elif isinstance(outcome, RowChange):
            plan.changes.append(outcome)
            digest.add(outcome.id, outcome.old_sha256, outcome.new_sha256)
        else:
            kind, note = outcome
            getattr(plan, kind).append(note)
    plan.digest = digest.hexdigest()
    return plan


class RowPlanner:
    """Plans one row at a time; remembers the diff of each distinct flavor copy."""

    def __init__(self, flavors: Mapping[int, Flavor], scope: Scope) -> None:
        self.flavors = flavors
        self.scope = scope
        self._flavors_by_flavorid = {f.flavorid: f for f in flavors.values()}
        self._diffs: dict[tuple[int, tuple[tuple[str, str], ...]], SpecDiff] = {}

    def plan_row(self, row: SpecRow) -> RowOutcome:
        """Return a RowChange, IN_SYNC, OUT_OF_SCOPE, or ``(plan list name, RowNote)``."""
        scope = self.scope
        if scope.instance_uuids is not None and row.instance_uuid not in scope.instance_uuids:
            return OUT_OF_SCOPE
        if row.queued_for_delete:
            return "queued_for_delete", RowNote(row.id, row.instance_uuid, "instance is queued for delete")
        try:
            copy = read_embedded_flavor(row.spec)
        except SpecShapeError as exc:
            return "errors", RowNote(row.id, row.instance_uuid, str(exc))
        label = f"{copy.name} (id {copy.id}, flavorid {copy.flavorid})"
        if scope.flavor_ids is not None and not (
            copy.id in scope.flavor_ids or copy.flavorid in (scope.flavorids or ())
        ):
            return OUT_OF_SCOPE
        flavor = self.flavors.get(copy.id)
        orphan_reason = self._orphan_reason(copy.id, copy.flavorid, flavor)
        if orphan_reason:
            return "orphans", RowNote(row.id, row.instance_uuid, orphan_reason, label)
        assert flavor is not None
        if _in_scope(copy.extra_specs, scope) == _in_scope(flavor.extra_specs, scope):
            return IN_SYNC
        null_keys = sorted(k for k, v in flavor.extra_specs.items() if v is None and scope.includes_key(k))
        if null_keys:
            return "errors", RowNote(
                row.id, row.instance_uuid,
                f"flavor {flavor.name} has no value (NULL) for {', '.join(null_keys)}; fix the flavor first",
                label,
            )
        diff = self._diff(flavor, copy.extra_specs)
        if not diff.applied:
            return "held_back", RowNote(row.id, row.instance_uuid, "only risky keys differ", label, diff)
        try:
            new_spec = rewrite_extra_specs(row.spec, dict(diff.target_extra_specs))
        except SpecShapeError as exc:
            return "errors", RowNote(row.id, row.instance_uuid, str(exc), label)
        return RowChange(row.id, row.instance_uuid, sha256_text(row.spec), sha256_text(new_spec), diff)

    def _orphan_reason(self, flavor_id: int, flavorid: str, flavor: Flavor | None) -> str:
        if flavor is None:
            again = self._flavors_by_flavorid.get(flavorid)
            if again is not None:
                return (
                    f"flavor id {flavor_id} was deleted; flavorid {flavorid} was re-created "
                    f"as id {again.id}"
                )
            return f"flavor id {flavor_id} (flavorid {flavorid}) no longer exists"
        if flavor.flavorid != flavorid:
            return f"flavor id {flavor_id} now has flavorid {flavor.flavorid}, not {flavorid}"
        return ""

    def _diff(self, flavor: Flavor, copy: dict[str, str]) -> SpecDiff:
        cache_key = (flavor.id, tuple(sorted(copy.items())))
        cached = self._diffs.get(cache_key)
        if cached is not None:
            return cached
        applied: list[KeyChange] = []
        held_back: list[KeyChange] = []
        target = dict(copy)
        for key in sorted(set(copy) | set(flavor.extra_specs)):
            old, new = copy.get(key), flavor.extra_specs.get(key)
            if old == new or not self.scope.includes_key(key):
                continue
            change = KeyChange(key, old, new, classify_key(key))
            if self.scope.all_keys or not is_risky(key):
                applied.append(change)
                if new is None:
                    del target[key]
                else:
                    target[key] = new
            else:
                held_back.append(change)
        diff = SpecDiff(
            flavor_id=flavor.id,
            flavorid=flavor.flavorid,
            flavor_name=flavor.name,
            applied=tuple(applied),
            held_back=tuple(held_back),
            target_extra_specs=tuple(sorted(target.items())),
        )
        self._diffs[cache_key] = diff
        return diff


def _in_scope(extra_specs: Mapping[str, str | None], scope: Scope) -> Mapping[str, str | None]:
    if not scope.key_prefixes:
        return extra_specs
    return {k: v for k, v in extra_specs.items() if scope.includes_key(k)}
