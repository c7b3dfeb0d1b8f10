"""The exact compare-and-swap statement (Alembic's op_fixture idea: assert the SQL)."""

from __future__ import annotations

from datetime import datetime

from nova_flavor_sync.db import SpecWrite, _cas_update


def test_one_update_guards_every_row_with_the_hash_of_what_was_read():
    now = datetime(2026, 1, 6, 14, 32, 10)
    sql, params = _cas_update([SpecWrite(7, "old7", "new text 7", "n7"), SpecWrite(9, "old9", "new text 9", "n9")], now)
    assert sql == (
        "UPDATE request_specs SET spec = CASE id WHEN %s THEN %s WHEN %s THEN %s END, updated_at = %s "
        "WHERE id IN (%s, %s) AND SHA2(spec, 256) = CASE id WHEN %s THEN %s WHEN %s THEN %s END"
    )
    assert params == [7, "new text 7", 9, "new text 9", now, 7, 9, 7, "old7", 9, "old9"]
