"""The exact compare-and-swap statements (Alembic's op_fixture idea: assert the SQL)."""

from __future__ import annotations

from datetime import datetime

from nova_flavor_sync.db import INSTANCE_EXTRA, REQUEST_SPECS, SpecWrite, _cas_update

NOW = datetime(2026, 1, 6, 14, 32, 10)
WRITES = [SpecWrite(7, "old7", "new text 7", "n7"), SpecWrite(9, "old9", "new text 9", "n9")]
PARAMS = [7, "new text 7", 9, "new text 9", NOW, 7, 9, 7, "old7", 9, "old9"]


def test_one_update_guards_every_request_spec_with_the_hash_of_what_was_read():
    sql, params = _cas_update(REQUEST_SPECS, WRITES, NOW)
    assert sql == (
        "UPDATE request_specs SET spec = CASE id WHEN %s THEN %s WHEN %s THEN %s END, updated_at = %s "
        "WHERE id IN (%s, %s) AND SHA2(spec, 256) = CASE id WHEN %s THEN %s WHEN %s THEN %s END"
    )
    assert params == PARAMS


def test_the_instance_copies_get_the_same_statement_on_instance_extra_flavor_while_the_instance_is_idle():
    sql, params = _cas_update(INSTANCE_EXTRA, WRITES, NOW)
    assert sql == (
        "UPDATE instance_extra SET flavor = CASE id WHEN %s THEN %s WHEN %s THEN %s END, updated_at = %s "
        "WHERE id IN (%s, %s) AND SHA2(flavor, 256) = CASE id WHEN %s THEN %s WHEN %s THEN %s END"
        " AND deleted = 0 AND instance_uuid IN (SELECT uuid FROM instances WHERE deleted = 0 "
        "AND task_state IS NULL AND (vm_state IS NULL OR vm_state != 'resized'))"
    )
    assert params == PARAMS
