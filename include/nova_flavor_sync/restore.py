"""Turn backup records into writes that put the backed-up bytes back (pure).

A restore is a sync with old and new swapped, applied by the same ``apply`` code: each row
is written only if it still holds what the sync wrote (``new_sha256``), or, with ``force``,
whatever it holds when the restore reads it, and only while it still belongs to the
record's instance. Either way the write is compare-and-swap.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from nova_flavor_sync.apply import RowTarget
from nova_flavor_sync.backup import BackupRecord


def restore_targets(records: Iterable[BackupRecord], *, force: bool = False) -> Iterator[RowTarget]:
    """The write that puts each record's bytes back, for ``apply.apply_batches``.

    A record without ``new_sha256`` (a row the sync did not change, in a --backup-all
    backup) is put back only with ``force``: otherwise its row must still hold the bytes
    the sync would have written there, which for an unchanged row are its own.
    """
    for record in records:
        expected = None if force else (record.new_sha256 or record.sha256)
        yield RowTarget(record.id, expected, record.sha256, _constant(record.spec), record.instance_uuid)


def _constant(spec: str):  # type: ignore[no-untyped-def]
    return lambda _current: spec
