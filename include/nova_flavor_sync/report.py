"""Text for people: the lines the CLI prints and the DAG tasks log (pure, no I/O)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from nova_flavor_sync.backup import BackupInfo
from nova_flavor_sync.plan import CloudPlan, CopyPlan, KeyChange, NoteList, Plan, RowChange, RowNote
from nova_flavor_sync.policy import RiskClass
from nova_flavor_sync.value_changes import LINES_SHOWN, group_copies, group_lines

if TYPE_CHECKING:
    from pathlib import Path

    from nova_flavor_sync.apply import ApplyResult
    from nova_flavor_sync.service import CopyApplied, RestoreResult

BRIEF_LIMIT = 10  # rows listed per kind without --verbose


def key_changes(changes: Sequence[KeyChange]) -> str:
    """``{"key": [old, new], ...}``; null stands for a key that is absent on that side."""
    return json.dumps({c.key: [c.old, c.new] for c in changes}, ensure_ascii=False)


def change_lines(change: RowChange) -> list[str]:
    lines = [
        f"Mismatch: {change.instance_uuid} (Flavor: {change.diff.flavorid})",
        f"Changes: {key_changes(change.diff.applied)}",
    ]
    if change.diff.held_back:
        lines.append(f"Held back (risky, see --all-keys): {key_changes(change.diff.held_back)}")
    return lines


def plan_lines(plan: Plan, *, verbose: bool) -> list[str]:
    """Every row the plan changes (verbose) and every row it will not touch, and why."""
    lines: list[str] = []
    if verbose:
        for change in plan.changes:
            lines += change_lines(change)
        for note in plan.held_back:
            assert note.diff is not None
            lines.append(
                f"Held back: {note.instance_uuid} (Flavor: {note.diff.flavorid}) "
                f"risky changes only: {key_changes(note.diff.held_back)}"
            )
    lines += _notes("Error", plan.errors, verbose=True)
    lines += _notes("Orphan", plan.orphans, verbose=verbose)
    lines += _notes("Left alone", plan.left_alone, verbose=verbose)
    return lines


def summary_lines(plan: Plan, *, what: str = "request specs", digest: bool = True) -> list[str]:
    """Counts by flavor, key and risk class, and (``digest``) the digest that identifies the plan."""
    summary = plan.summary()
    lines = [
        f"Read {plan.rows_read} {what}: {len(plan.changes)} to update, {plan.in_sync} in sync, "
        f"{len(plan.held_back)} with only risky changes (held back), {len(plan.orphans)} orphans, "
        f"{len(plan.left_alone)} left alone, {len(plan.errors)} errors"
        + (f", {plan.out_of_scope} out of scope" if plan.out_of_scope else "")
    ]
    if summary["by_flavor"]:
        lines.append("To update by flavor: " + _counts(summary["by_flavor"]))
    if summary["by_key"]:
        lines.append("Key changes by key: " + _counts(summary["by_key"]))
    if summary["by_risk"]:
        lines.append("Key changes by risk class: " + _counts(summary["by_risk"]))
    if summary["held_back_by_key"]:
        lines.append(
            f"Held back ({RiskClass.PLACEMENT.value} keys; --all-keys syncs them): "
            + _counts(summary["held_back_by_key"])
        )
    if digest:
        lines.append(f"Plan digest: {plan.digest}")
    return lines


# Said when a plan changes guest keys in instance copies: nothing changes a running guest.
GUEST_KEYS_TAKE_EFFECT = (
    "Guest keys (quota:*, hw:watchdog_action, hw_rng:*, hw_video:*, ...) take effect on each guest's next "
    "hard reboot, resize or migration, when Nova builds the guest again from its instance copy; running guests "
    "are not touched"
)


# Where the dry run's capped list of value changes sends people for the rest.
ALL_VALUE_CHANGES = "--verbose, or every row in --export-changes FILE"


def cloud_plan_lines(cloud: CloudPlan, *, verbose: bool, full_view: str = ALL_VALUE_CHANGES) -> list[str]:
    """A plan of both copies, as the dry run shows it: each copy's rows and counts, what changes by
    value (all of it when ``verbose``, else the largest LINES_SHOWN lines and a pointer to ``full_view``),
    then the totals.

    Ends with the lines of ``both_copies_lines`` (the last one is the digest an approval binds).
    """
    lines: list[str] = []
    for copy in cloud.copies:
        lines += [f"== {copy.what} in {copy.where} =="] if copy.cell_uuid is not None else []
        lines += plan_lines(copy.plan, verbose=verbose)
        lines += summary_lines(copy.plan, what=copy.rows_named, digest=False)
    return lines + value_change_lines(cloud.copies, verbose=verbose, full_view=full_view) + both_copies_lines(cloud)


def value_change_lines(
    copies: Sequence[CopyPlan], *, verbose: bool, full_view: str = ALL_VALUE_CHANGES
) -> list[str]:
    """``Changes by value ...:`` and a line per (flavor, key, old, new): its flavor copies, per copy."""
    groups = group_copies(copies).groups()
    if not groups:
        return []
    shown = group_lines(groups, limit=None if verbose else LINES_SHOWN, more=full_view)
    return ["Changes by value (flavor: key old -> new [risk class]: flavor copies (per copy)):"] + [
        "  " + line for line in shown]


def both_copies_lines(cloud: CloudPlan) -> list[str]:
    """One line per copy and cell, what is never written, instances whose copies disagree, the digest."""
    lines = []
    for copy in cloud.copies:
        plan = copy.plan
        lines.append(
            f"{copy.what} in {copy.where}: read {plan.rows_read}, {len(plan.changes)} to update, "
            f"{plan.in_sync} in sync, {len(plan.held_back)} held back, {len(plan.orphans)} orphans, "
            f"{len(plan.left_alone)} left alone, {len(plan.errors)} errors"
        )
        reasons = plan.summary()["left_alone_by_reason"]
        if reasons:
            lines.append(f"  left alone in {copy.where}: " + _counts(reasons))
    for where, instances in cloud.never_written.items():
        lines.append(f"Cell {where}: {instances} instances that never scheduled; counted, never written")
    disagreeing = cloud.disagreement(sample=5)
    if disagreeing.count:
        lines.append(
            f"Copies disagree for {disagreeing.count} instances (stale in one copy only; a run that stopped "
            f"between its two writes leaves this; run again): {', '.join(disagreeing.instances)}"
            + (" ..." if disagreeing.count > 5 else "")
        )
    guest_keys = any(copy.cell_uuid and copy.plan.summary()["by_risk"].get(RiskClass.GUEST.value)
                     for copy in cloud.copies)
    if guest_keys:
        lines.append(GUEST_KEYS_TAKE_EFFECT)
    api = sum(len(copy.plan.changes) for copy in cloud.copies if copy.cell_uuid is None)
    lines.append(f"Both copies: {cloud.to_update} to update ({api} RequestSpecs, "
                 f"{cloud.to_update - api} instance copies)")
    lines.append(f"Plan digest: {cloud.digest}")
    return lines


def copies_applied_lines(applied: Sequence[CopyApplied]) -> list[str]:
    """What the writes did, per copy (cells first, as they were written)."""
    lines: list[str] = []
    for done in applied:
        lines.append(f"{done.copy.what} in {done.copy.where}:")
        lines += ["  " + line for line in apply_lines(done.result, done.conflicts)]
    return lines


def summary_line(updated: int, skipped: int, errors: int) -> str:
    return f"Summary: Updated={updated}, Skipped={skipped}, Errors={errors}"


def apply_lines(result: ApplyResult, conflicts: Sequence[RowNote]) -> list[str]:
    lines = [
        f"Applied in {result.batches} batches ({result.retries} retries): {len(result.updated)} updated, "
        f"{len(result.already)} already up to date, {len(result.conflicts)} conflicts, "
        f"{len(result.gone)} deleted meanwhile, {len(result.errors)} errors"
    ]
    lines += _notes("Conflict", conflicts, verbose=True)
    lines += [f"Error: row {row_id}: {reason}" for row_id, reason in sorted(result.errors.items())]
    return lines


def restore_lines(result: RestoreResult, *, verbose: bool) -> list[str]:
    info = result.backup
    lines = [
        f"Backup {info.path} ({info.record_count} records, taken {info.created_at}, "
        f"plan digest {info.plan_digest}) is intact and belongs to "
        + ("this database" if len(info.databases) == 1 else f"these {len(info.databases)} databases")
    ]
    verb = "restored" if result.run else "would restore"
    lines += [f"{info.where(key)}: {count} of {info.records_by_database.get(key, 0)} records {verb}"
              for key, count in result.restored_by_database.items()]
    lines += _notes("Skipped", result.skipped, verbose=verbose)
    lines += [f"Error: row {row_id}: {reason}" for row_id, reason in sorted(result.errors.items())]
    if result.not_verified:
        lines.append(f"Read back different from the backup: rows {_ids(result.not_verified)}")
    verb = "Restored" if result.run else "Would restore"
    lines.append(f"Summary: {verb}={len(result.restored)}, Skipped={len(result.skipped)}, Errors={len(result.errors)}")
    return lines


def backup_list_lines(found: Sequence[BackupInfo | tuple[Path, str]], directory: Path) -> list[str]:
    if not found:
        return [f"No backups in {directory}"]
    lines = [f"Backups in {directory}:"]
    for entry in found:
        if isinstance(entry, BackupInfo):
            by_copy = "  ".join(f"{entry.where(key)}={count}" for key, count in entry.records_by_database.items())
            lines.append(
                f"{entry.path.name}  records={entry.record_count}  taken={entry.created_at}  "
                f"schema={entry.database.get('schema')}  plan={entry.plan_digest[:12]}"
                + (f"  ({by_copy})" if by_copy else "")
            )
        else:
            lines.append(f"{entry[0].name}  UNREADABLE: {entry[1]}")
    return lines


def _notes(kind: str, notes: Sequence[RowNote] | NoteList, *, verbose: bool) -> list[str]:
    shown = notes if verbose else notes[:BRIEF_LIMIT]
    lines = [
        f"{kind}: row {n.id} ({n.instance_uuid}){' ' + n.flavor if n.flavor else ''}: {n.reason}" for n in shown
    ]
    if len(notes) > len(shown):
        lines.append(f"... and {len(notes) - len(shown)} more {kind.lower()} rows (--verbose lists all)")
    return lines


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name}={count}" for name, count in counts.items())


def _ids(ids: Sequence[int]) -> str:
    return ", ".join(str(i) for i in ids[:20]) + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")
