"""open_backup: a backup checked in one pass, a line at a time, then read again a database at a time.

It must say exactly what reading the whole document at once says (``backup._load_whole``,
the reader before it) about any file, good or bad. Only file I/O: pytest's ``tmp_path``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from datetime import UTC, datetime
from pathlib import Path

import pytest

from nova_flavor_sync.backup import API_DATABASE, BackupRecord, _load_whole, load_backup, open_backup, write_backup
from nova_flavor_sync.errors import BackupError
from nova_flavor_sync.spec_json import sha256_text

CELL = "6f1bd7e2-0000-4000-8000-000000000001"
DATABASES = {API_DATABASE: {"schema": "nova_api"}, CELL: {"cell": "cell1", "schema": "nova_cell1"}}


def _record(row_id: int, database: str, spec: str | None = None) -> BackupRecord:
    spec = spec if spec is not None else json.dumps({"id": row_id, "name": "m1.é ☃", "pad": "x" * (row_id % 5)})
    return BackupRecord.of_row(row_id, f"uuid-{row_id}", spec, None, sha256_text(f"new {row_id}"), database)


def _write(directory: Path, records: list[BackupRecord]) -> Path:
    return write_backup(directory, records, databases=DATABASES, plan_digest="digest", scope={},
                        now=datetime(2026, 3, 14, tzinfo=UTC)).path


def _reseal(data: bytes) -> bytes:
    cut = data.rfind(b', "checksum": "')
    if cut < 0:
        return data
    return data[:cut] + f', "checksum": "sha256:{hashlib.sha256(data[:cut]).hexdigest()}"}}\n'.encode()


def _outcome(read):
    try:
        backup = read()
    except BackupError as exc:
        return "refused", str(exc)
    return "read", backup.info, backup.records


# As back_up_copies writes them: nova_api's records, then each cell's, each in id order.
WRITTEN = [_record(i, API_DATABASE) for i in (2, 3, 7)] + [_record(i, CELL) for i in (1, 4, 9, 12)]
TOKENS = [b",", b"\n", b"]", b"[", b"{", b"}", b'"', b" ", b"records", b"record_count", b"database", b"0", b"1"]


def _mutated(data: bytes, rng: random.Random) -> bytes:
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(data) + 1)
        kind = rng.randrange(5)
        if kind == 0:
            data = data[:at]
        elif kind == 1:
            data = data[:at] + data[at + rng.randint(1, 4) :]
        elif kind == 2:
            data = data[:at] + rng.choice(TOKENS) + data[at:]
        elif kind == 3 and at < len(data):
            data = data[:at] + bytes([rng.randrange(256)]) + data[at + 1 :]
        else:
            lines = data.split(b"\n")
            i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
            data = b"\n".join(lines)
    return _reseal(data) if rng.random() < 0.7 else data  # resealed: only the deeper checks can tell


@pytest.mark.parametrize("seed", range(4))
def test_a_damaged_or_edited_backup_gets_the_answer_the_whole_document_gets(tmp_path, seed):
    rng = random.Random(seed)
    good = _write(tmp_path / "good", WRITTEN).read_bytes()
    empty = _write(tmp_path / "empty", []).read_bytes()
    answers = set()
    for trial in range(500):
        data = _mutated(rng.choice([good, empty]), rng)
        path = tmp_path / f"backup-{trial}.json"
        path.write_bytes(data)

        assert _outcome(lambda: load_backup(path)) == _outcome(lambda: _load_whole(path, data)), data  # noqa: B023
        answers.add(_outcome(lambda: load_backup(path))[0])  # noqa: B023
    assert answers == {"read", "refused"}


def _first_line(data: bytes, line: bytes) -> bytes:
    return line + data[data.index(b"\n") + 1 :]


@pytest.mark.parametrize("edit", [
    lambda data: _reseal(_first_line(data, b'{, "records": [\n')),  # a header without members
    lambda data: data[: data.rindex(b"], ")] + b"], }\n",  # a trailer without members
    lambda data: _reseal(data.replace(b'"record_count"', b'"format"', 1)),  # a key in both
    lambda data: _reseal(data.replace(b'\n], "record_count"', b'\n], "records": [], "record_count"', 1)),
    lambda data: _reseal(data.replace(b'"format"', b'\xef\xbb\xbf"format"', 1)),  # a BOM inside
    lambda data: _reseal(b"\xef\xbb\xbf" + data),  # a BOM first: the whole document is read past it
    lambda data: _reseal(data.replace(b'},\n{', b'},\n\x00{', 1)),
    lambda data: _reseal(data.replace(b'},\n{', b'},\n\n{', 1)),  # valid JSON, not our layout
    lambda data: _reseal(data.replace(b'},\n{', b'} ,\n {', 1)),
], ids=["empty-header", "empty-trailer", "key-twice", "records-twice", "bom-inside", "bom-first",
        "nul-first-in-a-line", "blank-line", "spaces"])
def test_edits_that_only_the_whole_document_can_judge(tmp_path, edit):
    data = edit(_write(tmp_path / "good", WRITTEN).read_bytes())
    path = tmp_path / "edited.json"
    path.write_bytes(data)

    assert _outcome(lambda: load_backup(path)) == _outcome(lambda: _load_whole(path, data))


def test_each_database_is_read_alone_in_file_order_and_by_id(tmp_path):
    path = _write(tmp_path, WRITTEN)

    with open_backup(path) as backup:
        assert backup.counts == {API_DATABASE: 3, CELL: 4}
        assert list(backup.records(CELL)) == WRITTEN[3:] == list(backup.records_by_id(CELL))
        assert list(backup.records(API_DATABASE)) == WRITTEN[:3]
        assert list(backup.records()) == WRITTEN
        assert list(backup.records("no-such-cell")) == []
        assert backup._in_memory is None  # streamed, not read whole


def test_a_backup_not_in_id_order_is_read_in_file_order_and_by_id_with_the_last_of_a_repeated_id(tmp_path):
    """Never written so by this tool (a hand-made file): by id, the records are sorted in memory."""
    shuffled = [_record(9, CELL), _record(3, API_DATABASE), _record(1, CELL), _record(9, CELL, spec='{"again": 1}')]
    path = _write(tmp_path, shuffled)

    with open_backup(path) as backup:
        assert backup.counts == {CELL: 3, API_DATABASE: 1}
        assert list(backup.records(CELL)) == [shuffled[0], shuffled[2], shuffled[3]]
        assert list(backup.records_by_id(CELL)) == [shuffled[2], shuffled[3]]
        assert list(backup.records_by_id(API_DATABASE)) == [shuffled[1]]


def test_a_backup_changed_in_place_after_its_check_is_read_no_further(tmp_path):
    path = _write(tmp_path, WRITTEN)
    with open_backup(path) as backup:
        with open(path, "r+b") as same_file:
            same_file.seek(0, os.SEEK_END)
            same_file.write(b" ")

        with pytest.raises(BackupError, match="changed after it was checked"):
            list(backup.records(CELL))


def test_a_backup_renamed_over_after_its_check_is_not_read(tmp_path):
    path = _write(tmp_path, WRITTEN)
    other = _write(tmp_path / "other", WRITTEN[:1])
    with open_backup(path) as backup:
        os.replace(other, path)

        assert list(backup.records()) == WRITTEN  # the file that was checked
