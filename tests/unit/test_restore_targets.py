"""restore_targets: what a restore compares against before it writes a backed-up row back."""

from __future__ import annotations

from nova_flavor_sync.backup import BackupRecord
from nova_flavor_sync.restore import restore_targets
from nova_flavor_sync.spec_json import sha256_text

ORIGINAL, SYNCED = "original spec", "spec the sync wrote"


def test_a_restore_writes_only_over_what_the_sync_wrote_unless_forced():
    changed = BackupRecord.of_row(5, "uuid-5", ORIGINAL, None, sha256_text(SYNCED), "cell-uuid")
    unchanged = BackupRecord.of_row(6, "uuid-6", ORIGINAL, None, None)  # a --backup-all record

    careful = list(restore_targets([changed, unchanged]))
    forced = list(restore_targets([changed, unchanged], force=True))

    assert [t.expected_sha256 for t in careful] == [sha256_text(SYNCED), sha256_text(ORIGINAL)]
    assert [t.expected_sha256 for t in forced] == [None, None]  # whatever the row holds when read
    for target in careful + forced:
        assert target.new_sha256 == sha256_text(ORIGINAL) and target.build("anything") == ORIGINAL
    assert [t.instance_uuid for t in careful] == ["uuid-5", "uuid-6"]
