"""Backup files: written atomically and privately, read back only when every check passes.

Only file I/O: every test works in pytest's ``tmp_path``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from nova_flavor_sync.backup import (
    OLD_TOOL_BACKUP,
    BackupInfo,
    BackupRecord,
    check_same_database,
    list_backups,
    load_backup,
    private_dir,
    read_backup_info,
    write_backup,
)
from nova_flavor_sync.errors import BackupError, ExitCode
from nova_flavor_sync.spec_json import sha256_text

NOW = datetime(2026, 3, 14, 9, 26, 53, tzinfo=UTC)
PLAN_DIGEST = "plan-digest-0123456789abcdef"
SCOPE = {"flavors": ["m1.large"], "instances": None}

# Shaped like NovaApiDb.server_identity(): a MariaDB server (no server_uuid, no Galera).
MARIADB = {
    "host": "db.example.org",
    "port": 3306,
    "schema": "nova_api",
    "server_uuid": None,
    "server_hostname": "db1",
    "server_port": 3306,
    "server_id": 1,
    "galera_cluster_uuid": None,
}
MYSQL = {**MARIADB, "server_uuid": "3e11fa47-71ca-11e1-9e33-c80aa9429562"}
GALERA_UUID = "6fbc7e8e-0000-11ef-a1b2-0242ac120002"
GALERA_NODE1 = {**MARIADB, "server_hostname": "node1", "galera_cluster_uuid": GALERA_UUID}
GALERA_NODE2 = {**GALERA_NODE1, "server_hostname": "node2", "server_id": 2}

# Specs as Nova writes them (json.dumps defaults, so ensure_ascii escapes), plus raw
# non-ASCII and a literal backslash: every one must come back byte for byte.
SPEC_ESCAPED = json.dumps(
    {"flavor": {"name": "m1.\U0001f600", "extra_specs": {"hw:cpu_policy": "dedicated"}}}
)
SPEC_RAW = '{"name": "café ☃ 😀", "note": "line\\nbreak \\ud83d\\ude00 \\\\ tab\\t"}'


def record(
    row_id: int, spec: str, updated_at: str | None = None, new_spec: str | None = None
) -> BackupRecord:
    new_sha256 = sha256_text(new_spec) if new_spec else None
    return BackupRecord.of_row(row_id, f"uuid-{row_id}", spec, updated_at, new_sha256)


RECORDS = [
    record(7, SPEC_ESCAPED, None, new_spec="the spec the sync writes"),
    record(9, SPEC_RAW, "2025-12-31 23:59:58", new_spec=None),
]


def backup(directory: Path, records=RECORDS, now: datetime = NOW) -> BackupInfo:
    return write_backup(
        directory, records, databases={"nova_api": MARIADB}, plan_digest=PLAN_DIGEST, scope=SCOPE, now=now
    )


def reseal(data: bytes) -> bytes:
    """Recompute the checksum as the format says: sha256 of every byte before ', "checksum"'."""
    cut = data.rfind(b', "checksum": "')
    assert cut > 0
    digest = hashlib.sha256(data[:cut]).hexdigest()
    return data[:cut] + f', "checksum": "sha256:{digest}"}}\n'.encode()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def info_of(database: dict) -> BackupInfo:
    return BackupInfo(Path("flavor_copies_20260314_092653.json"), "", {"nova_api": database}, PLAN_DIGEST, {}, 0)


# -- round trip ------------------------------------------------------------------------


def test_round_trip_gives_back_every_record_exactly(tmp_path):
    written = backup(tmp_path / "backups")

    loaded = load_backup(written.path)

    assert loaded.records == RECORDS
    assert [r.spec.encode() for r in loaded.records] == [SPEC_ESCAPED.encode(), SPEC_RAW.encode()]
    assert "\\ud83d\\ude00" in loaded.records[0].spec  # Nova's escapes stay escapes
    assert [r.updated_at for r in loaded.records] == [None, "2025-12-31 23:59:58"]
    assert [r.new_sha256 for r in loaded.records] == [sha256_text("the spec the sync writes"), None]
    assert loaded.info == written
    assert loaded.info.record_count == 2
    assert loaded.info.plan_digest == PLAN_DIGEST
    assert loaded.info.database == MARIADB
    assert loaded.info.scope == SCOPE
    assert loaded.info.created_at == "2026-03-14T09:26:53Z"
    check_same_database(loaded.info, MARIADB)  # the stored identity still matches


def test_an_empty_backup_round_trips(tmp_path):
    written = backup(tmp_path, records=[])

    loaded = load_backup(written.path)

    assert loaded.records == []
    assert written.record_count == loaded.info.record_count == 0
    assert loaded.info.database == MARIADB and loaded.info.plan_digest == PLAN_DIGEST


def test_records_may_come_from_a_generator(tmp_path):
    written = backup(tmp_path, records=(r for r in RECORDS))

    assert load_backup(written.path).records == RECORDS


# -- the file on disk ------------------------------------------------------------------


def test_file_is_named_from_now_and_is_plain_json(tmp_path):
    written = backup(tmp_path)

    assert written.path == tmp_path / "flavor_copies_20260314_092653.json"
    with open(written.path, encoding="utf-8") as handle:
        document = json.load(handle)
    assert document["format"] == "nova-flavor-sync-backup"
    assert document["record_count"] == 2 and len(document["records"]) == 2


def test_two_backups_in_the_same_second_never_overwrite_each_other(tmp_path):
    first = backup(tmp_path, records=RECORDS[:1])
    second = backup(tmp_path, records=RECORDS[1:])

    assert first.path != second.path
    assert first.path.name.startswith("flavor_copies_20260314_092653")
    assert second.path.name.startswith("flavor_copies_20260314_092653")
    assert load_backup(first.path).records == RECORDS[:1]
    assert load_backup(second.path).records == RECORDS[1:]


def test_no_temporary_file_is_left_behind(tmp_path):
    written = backup(tmp_path)

    assert sorted(os.listdir(tmp_path)) == [written.path.name]


def test_file_is_0600_and_created_directories_are_0700(tmp_path):
    directory = tmp_path / "a" / "b" / "backups"

    written = backup(directory)

    assert mode_of(written.path) == 0o600
    for created in (tmp_path / "a", tmp_path / "a" / "b", directory):
        assert mode_of(created) == 0o700, created


def test_a_backup_appearing_while_writing_is_not_overwritten(tmp_path):
    other = tmp_path / "flavor_copies_20260314_092653.json"

    def records_while_another_run_finishes():
        yield RECORDS[0]
        other.write_bytes(b"another run's backup")  # same second, finished first
        yield RECORDS[1]

    written = backup(tmp_path, records=records_while_another_run_finishes())

    assert other.read_bytes() == b"another run's backup"
    assert load_backup(written.path).records == RECORDS


# -- private_dir -----------------------------------------------------------------------


def test_an_existing_private_directory_is_accepted(tmp_path):
    directory = tmp_path / "backups"
    directory.mkdir(mode=0o700)
    directory.chmod(0o700)

    assert private_dir(directory) == directory
    assert backup(directory).path.parent == directory


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o701], ids=["0755", "group-readable", "others-x"])
def test_a_directory_others_can_read_is_refused_and_nothing_is_written(tmp_path, mode):
    directory = tmp_path / "backups"
    directory.mkdir()
    directory.chmod(mode)

    advice = rf"mode {mode:04o}.*chmod 700 {re.escape(str(directory))}"
    with pytest.raises(BackupError, match=advice) as caught:
        backup(directory)

    assert caught.value.exit_code == ExitCode.REFUSED
    assert list(directory.iterdir()) == []
    assert mode_of(directory) == mode  # refused, not silently "fixed"


def test_a_regular_file_as_directory_is_refused_and_nothing_is_written(tmp_path):
    not_a_dir = tmp_path / "backups"
    not_a_dir.write_bytes(b"precious")

    with pytest.raises(BackupError, match=r"is not a directory") as caught:
        backup(not_a_dir)

    assert caught.value.exit_code == ExitCode.REFUSED
    assert not_a_dir.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["backups"]


# -- write failures --------------------------------------------------------------------


class DatabaseWentAway(Exception):
    pass


def test_a_failure_while_reading_records_propagates_and_leaves_no_file(tmp_path):
    def failing_records():
        yield RECORDS[0]
        raise DatabaseWentAway("lost connection during query")

    with pytest.raises(DatabaseWentAway, match="lost connection"):
        backup(tmp_path, records=failing_records())

    assert os.listdir(tmp_path) == []
    assert list_backups(tmp_path) == []


# -- load_backup refusals --------------------------------------------------------------


def _flip_a_spec_byte(data: bytes) -> bytes:
    at = data.index(b"dedicated")
    return data[:at] + b"D" + data[at + 1 :]


def _edit_checksum(data: bytes) -> bytes:
    at = data.rindex(b"sha256:") + len(b"sha256:")
    return data[:at] + (b"0" if data[at : at + 1] != b"0" else b"1") + data[at + 1 :]


def _resealed(old: bytes, new: bytes):
    """Edit the file, then recompute its checksum so that only the deeper checks can notice."""
    return lambda data: reseal(data.replace(old, new, 1))


def _content(content: bytes):
    return lambda _data: content


OURS = "not a nova-flavor-sync backup"
LOAD_REFUSALS = [
    # (make, match): "missing", "directory", or a function from the good file's bytes to the bad
    ("missing", r"does not exist"),
    ("directory", r"is a directory"),
    (_content(b""), r"damaged or truncated: not valid JSON"),
    (lambda data: data[: len(data) // 2], r"damaged or truncated"),
    (lambda data: data[: data.rindex(b', "checksum"')], r"damaged or truncated"),
    (lambda data: data[:-2], r"damaged or truncated"),  # lost its final '}' (and newline)
    (_flip_a_spec_byte, r"fails its checksum"),
    (_edit_checksum, r"fails its checksum"),
    (_resealed(b"dedicated", b"shared"), r"record 0 \(id 7\) does not match its sha256"),
    (_resealed(b'"record_count": 2', b'"record_count": 3'), r"says 3 records but holds 2"),
    (_resealed(b'"format_version": 2', b'"format_version": 3'), r"format version 3; this tool reads versions 1 and 2"),
    (_resealed(b'"nova-flavor-sync-backup"', b'"other-tool"'), OURS),
    (_content(b"{}"), OURS),
    (_content(b'[{"format": "nova-flavor-sync-backup"}]'), OURS),
    (_resealed(b'"instance_uuid": "uuid-9", ', b""), r"record 1 is malformed"),
    (_resealed(b'"id": 9,', b'"id": true,'), r"record 1 is malformed"),
    (_resealed(b'"database": "nova_api", "table": "request_specs", "id": 9',
               b'"database": "cell-x", "table": "instance_extra", "id": 9'),
     r"records of databases its header does not name: cell-x"),
    (_resealed(b'"table": "request_specs", "id": 9', b'"table": "instance_extra", "id": 9'),
     r"record 1 \(id 9\) names table 'instance_extra', not 'request_specs' of its database"),
    (lambda data: data[:-2] + b', "records": [], "record_count": 0}\n', r"fails its checksum"),
    (lambda data: data[:-1], r"fails its checksum"),
]
LOAD_REFUSAL_IDS = [
    "missing-file",
    "a-directory",
    "empty-file",
    "truncated-at-half",
    "truncated-before-checksum",
    "truncated-final-brace",
    "byte-flipped-in-spec",
    "checksum-edited",
    "spec-edited-checksum-recomputed",
    "record-count-edited-checksum-recomputed",
    "format-version-3-checksum-recomputed",
    "format-not-ours-checksum-recomputed",
    "empty-json-object",
    "json-list",
    "record-missing-field-checksum-recomputed",
    "record-id-boolean-checksum-recomputed",
    "record-of-an-unnamed-database",
    "record-in-the-wrong-table",
    "keys-appended-after-checksum",
    "final-newline-lost",
]


@pytest.mark.parametrize(("make", "match"), LOAD_REFUSALS, ids=LOAD_REFUSAL_IDS)
def test_load_backup_refuses(tmp_path, make, match):
    good = backup(tmp_path / "backups").path
    target = tmp_path / "request_specs_20260101_000000.json"
    if make == "directory":
        target.mkdir()
    elif make != "missing":
        target.write_bytes(make(good.read_bytes()))

    with pytest.raises(BackupError, match=match) as caught:
        load_backup(target)

    assert caught.value.exit_code == ExitCode.REFUSED


def test_a_resealed_but_unchanged_file_still_loads(tmp_path):
    """Guards the helper above: reseal() alone must not make a good file fail."""
    path = backup(tmp_path).path
    path.write_bytes(reseal(path.read_bytes()))

    assert load_backup(path).records == RECORDS


# -- read_backup_info / list_backups -------------------------------------------------------


def test_list_backups_shows_each_backup_in_name_order_and_reports_damaged_ones(tmp_path):
    later = backup(tmp_path, records=RECORDS, now=datetime(2026, 3, 15, tzinfo=UTC))
    earlier = backup(tmp_path, records=[], now=NOW)  # written second, listed first
    damaged = tmp_path / "request_specs_20260101_000000.json"
    damaged.write_bytes(b"\x00garbage, not a backup\n")
    (tmp_path / "notes.txt").write_text("not a backup name either")

    listed = list_backups(tmp_path)

    assert len(listed) == 3
    damaged_path, problem = listed[0]
    assert damaged_path == damaged and "damaged or not a backup" in problem
    assert [info.path for info in listed[1:]] == [earlier.path, later.path]
    assert [(info.record_count, info.created_at, info.plan_digest) for info in listed[1:]] == [
        (0, "2026-03-14T09:26:53Z", PLAN_DIGEST),
        (2, "2026-03-15T00:00:00Z", PLAN_DIGEST),
    ]


def test_read_backup_info_reads_header_and_trailer(tmp_path):
    written = backup(tmp_path)

    assert read_backup_info(written.path) == written


@pytest.mark.parametrize(
    "content",
    [b"", b"{}", b"[]\n", b"garbage\nmore garbage\n"],
    ids=["empty", "empty-object", "json-list", "garbage"],
)
def test_read_backup_info_refuses_what_is_not_a_backup(tmp_path, content):
    path = tmp_path / "request_specs_20260101_000000.json"
    path.write_bytes(content)

    with pytest.raises(BackupError, match="damaged or not a backup"):
        read_backup_info(path)


def _old_tool_backup(path, count: int) -> None:
    """A backup as the old nova-fix-flavors.py wrote it: json.dump(indent=2) of every RequestSpec."""
    specs = [{"id": i, "instance_uuid": f"uuid-{i}", "spec": '{"nova_object.name": "RequestSpec"}'}
             for i in range(1, count + 1)]
    path.write_text(json.dumps({"timestamp": "20260105_143210", "count": count, "specs": specs}, indent=2))


@pytest.mark.parametrize("count", [0, 1, 3], ids=["no-specs", "one-spec", "three-specs"])
def test_a_backup_of_the_old_tool_is_named_for_what_it_is_and_never_loaded(tmp_path, count):
    path = tmp_path / "request_specs_20260105_143210.json"
    _old_tool_backup(path, count)

    [(listed, problem)] = list_backups(tmp_path)
    assert listed == path and problem == f"{path.name}: {OLD_TOOL_BACKUP}"
    with pytest.raises(BackupError, match=r"was written by the old nova-fix-flavors\.py \(no checksum"):
        load_backup(path)


@pytest.mark.parametrize("exists", [True, False], ids=["empty-directory", "missing-directory"])
def test_list_backups_of_an_empty_or_missing_directory_is_empty(tmp_path, exists):
    directory = tmp_path / "backups"
    if exists:
        directory.mkdir()

    assert list_backups(directory) == []
    assert directory.exists() == exists  # listing never creates the directory


# -- check_same_database ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("taken", "current"),
    [
        (MARIADB, MARIADB),
        (MARIADB, {**MARIADB, "host": "vip.example.org", "port": 6033}),
        (MYSQL, {**MYSQL, "host": "10.0.0.5", "port": 3307}),
        (GALERA_NODE1, GALERA_NODE2),
    ],
    ids=["identical", "mariadb-through-a-vip", "mysql-through-a-vip", "galera-nodes-same-cluster"],
)
def test_same_database_passes(taken, current):
    check_same_database(info_of(taken), current)


@pytest.mark.parametrize(
    ("taken", "current", "match"),
    [
        (MARIADB, {**MARIADB, "schema": "nova_cell1"}, "schema 'nova_api', this is 'nova_cell1'"),
        (MARIADB, {**MARIADB, "server_hostname": "db2"}, r"taken on another server"),
        (MARIADB, {**MARIADB, "server_port": 3307}, r"taken on another server"),
        (MARIADB, {**MARIADB, "server_id": 2}, r"taken on another server"),
        (MYSQL, {**MYSQL, "server_uuid": "5a1d2c3b-71ca-11e1-9e33-c80aa9429562"}, "uuid=3e11"),
        (
            GALERA_NODE1,
            {**GALERA_NODE1, "galera_cluster_uuid": "deadbeef-0000-11ef-a1b2-0242ac120002"},
            "galera_cluster_uuid=6fbc7e8e",
        ),
        (
            {**MARIADB, "server_hostname": None, "server_port": None, "server_id": None},
            {**MARIADB, "server_hostname": None, "server_port": None, "server_id": None},
            r"does not say which server",
        ),
    ],
    ids=[
        "another-schema",
        "another-mariadb-hostname",
        "another-mariadb-port",
        "another-mariadb-server-id",
        "another-mysql-server-uuid",
        "another-galera-cluster",
        "no-server-fields",
    ],
)
def test_another_database_is_refused(taken, current, match):
    with pytest.raises(BackupError, match=match) as caught:
        check_same_database(info_of(taken), current)

    assert caught.value.exit_code == ExitCode.REFUSED


def test_a_backup_left_half_written_by_a_killed_run_is_listed_as_incomplete(tmp_path):
    good = backup(tmp_path).path
    leftover = tmp_path / ".request_specs_20260101_000000.4242.tmp"
    leftover.write_bytes(b'{"format": "nova-flavor-sync-backup", "records": [\n{"id": 1')

    listed = list_backups(tmp_path)

    assert [getattr(e, "path", None) for e in listed[:1]] == [good]
    assert listed[1][0] == leftover and "incomplete" in listed[1][1] and "safe to delete" in listed[1][1]


def test_a_version_1_backup_from_before_cells_still_loads_lists_and_restores_into_nova_api(tmp_path):
    """As the tool wrote them before it wrote instance copies: RequestSpecs only, one database."""
    spec = '{"nova_object.name": "RequestSpec"}'
    body = (
        '{"format": "nova-flavor-sync-backup", "format_version": 1, "created_at": "2026-01-02T03:04:05Z", '
        f'"database": {json.dumps(MARIADB)}, "plan_digest": "{PLAN_DIGEST}", "scope": {{}}, "records": [\n'
        f'{{"id": 7, "instance_uuid": "uuid-7", "spec": {json.dumps(spec)}, "updated_at": null, '
        f'"sha256": "{sha256_text(spec)}", "new_sha256": null}}\n], "record_count": 1'
    ).encode()
    path = tmp_path / "request_specs_20260102_030405.json"
    path.write_bytes(body + b', "checksum": "sha256:' + hashlib.sha256(body).hexdigest().encode() + b'"}\n')

    loaded = load_backup(path)
    assert [(r.database, r.table, r.id, r.spec) for r in loaded.records] == [("nova_api", "request_specs", 7, spec)]
    assert loaded.info.databases == {"nova_api": MARIADB} and loaded.info.records_by_database == {"nova_api": 1}
    check_same_database(loaded.info, MARIADB)
    assert list_backups(tmp_path) == [read_backup_info(path)]
