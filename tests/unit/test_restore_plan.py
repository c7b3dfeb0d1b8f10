"""plan_restore: which backed-up rows may be put back."""

from __future__ import annotations

import pytest

from nova_flavor_sync.backup import BackupRecord
from nova_flavor_sync.restore import plan_restore
from nova_flavor_sync.spec_json import sha256_text

ORIGINAL, SYNCED, NOVA_LATER = "original spec", "spec the sync wrote", "spec nova wrote later"
RECORD = BackupRecord.of_row(5, "uuid-5", ORIGINAL, None, sha256_text(SYNCED))


@pytest.mark.parametrize(
    ("current", "force", "restores", "reason"),
    [
        ({5: ("uuid-5", SYNCED, None)}, False, True, None),
        ({5: ("uuid-5", NOVA_LATER, None)}, False, False, "changed since the sync"),
        ({5: ("uuid-5", NOVA_LATER, None)}, True, True, None),
        ({5: ("uuid-5", ORIGINAL, None)}, False, False, "already holds the backed-up spec"),
        ({}, True, False, "row no longer exists"),
        ({5: ("uuid-other", SYNCED, None)}, True, False, "now belongs to instance uuid-other"),
    ],
    ids=["as-the-sync-left-it", "changed-since", "changed-since-forced", "already-restored", "row-gone", "id-reused"],
)
def test_a_row_is_restored_only_when_that_is_safe(current, force, restores, reason):
    plan = plan_restore([RECORD], current, force=force)
    if restores:
        (target,) = plan.targets
        assert target.expected_sha256 == sha256_text(current[5][1])  # still compare-and-swap
        assert target.new_sha256 == RECORD.sha256 and target.build("anything") == ORIGINAL
    else:
        assert plan.targets == [] and reason in plan.skipped[0].reason
