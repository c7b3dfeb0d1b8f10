"""The dry run shows values, not only counts (``old -> new`` per flavor and key), and
``--export-changes FILE`` writes every change: against the demo cloud in the real MariaDB."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from dbtools import copies_hash
from nova_flavor_sync import cli

pytestmark = pytest.mark.db

AVX512 = ('c5.large: trait:HW_CPU_X86_AVX512F "forbidden" -> "required" [scheduling]: 122 '
          "(nova_api 61, cell1 38, cell2 23)")


def run(capsys, tmp_path: Path, *args: object) -> tuple[int, list[str], str]:
    """cli.main with its own log and backup directory: (exit code, stdout's messages, stderr)."""
    argv = ["--log-file", str(tmp_path / "log"), "--backup-dir", str(tmp_path / "backups"), *map(str, args)]
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, [re.sub(r"^\[[^\]]*\] \[[A-Z]+\] ", "", line) for line in out.splitlines()], err


def db_url(params) -> str:
    auth = f"{params.user}:{params.password}" if params.password else params.user
    return f"mysql+pymysql://{auth}@{params.host}:{params.port}/{params.database}"


def test_the_dry_run_shows_old_and_new_values_grouped_and_capped(demo_db, capsys, tmp_path):
    code, lines, err = run(capsys, tmp_path, "--db-url", db_url(demo_db))

    assert code == 3, err
    start = lines.index("Changes by value (flavor: key old -> new [risk class]: flavor copies (per copy)):")
    shown = lines[start + 1 : start + 22]
    assert f"  {AVX512}" in shown
    assert '  c5.small: aggregate_instance_extra_specs:site added "zürich-1" [scheduling]: 208 ' \
           "(nova_api 104, cell1 57, cell2 47)" in shown
    assert "  r5.large: aggregate_instance_extra_specs:storage_type removed (was \"nvme\") [scheduling]: 182 " \
           "(nova_api 91, cell1 60, cell2 31)" in shown
    assert shown[-1] == "  ... and 12 more lines: see --verbose, or every row in --export-changes FILE"
    totals = [int(re.search(r"\]: (\d+) \(", line)[1]) for line in shown[:-1]]
    assert totals == sorted(totals, reverse=True)  # the largest first: what the cap keeps

    code, verbose, _ = run(capsys, tmp_path, "--db-url", db_url(demo_db), "--verbose")
    start = verbose.index(lines[start])
    every = [line for line in verbose[start + 1 :] if line.startswith("  ")]
    assert len(every) >= 32 and not any(line.startswith("  ... and") for line in every)
    assert '  gp2.xlarge: hw:cpu_policy removed (was "shared") [placement, held back]: 100 ' \
           "(nova_api 50, cell1 26, cell2 24)" in every


def test_export_changes_writes_every_changed_key_of_every_copy(demo_db, capsys, tmp_path):
    export = tmp_path / "changes.jsonl"
    code, lines, err = run(capsys, tmp_path, "--db-url", db_url(demo_db), "--export-changes", export)

    assert code == 3, err
    assert f"Every change written to {export} (one line per changed key per flavor copy)" in lines
    assert f"  ... and 12 more lines: see --verbose, or every row in {export}" in lines
    records = [json.loads(line) for line in export.read_text().splitlines()]
    assert export.stat().st_mode & 0o077 == 0
    changed = [r for r in records if r["status"] == "change"]
    # Per copy and key, as many lines as the summary counts key changes ("Key changes by key").
    by_copy_key = Counter((r["copy"].split(" (")[0], r["key"]) for r in changed)
    summaries = [line for line in lines if line.startswith("Key changes by key: ")]
    for where, summary in zip(("nova_api", "cell1", "cell2"), summaries, strict=True):
        for key, count in re.findall(r"([^ ,=]+)=(\d+)", summary.removeprefix("Key changes by key: ")):
            assert by_copy_key[(where, key)] == int(count), (where, key)
    avx = [r for r in changed if (r["flavor"], r["key"]) == ("c5.large", "trait:HW_CPU_X86_AVX512F")]
    assert {(r["old"], r["new"], r["risk"]) for r in avx} == {("forbidden", "required", "scheduling")}
    assert len(avx) == 122 and len({(r["copy"], r["instance"]) for r in avx}) == 122
    statuses = Counter(r["status"] for r in records)
    assert statuses["held_back"] == 100 + 72 and statuses["orphan"] == 120 and statuses["left_alone"] == 364
    assert all(r["reason"] for r in records if r["status"] in ("orphan", "left_alone"))


def test_an_export_file_that_cannot_be_written_stops_the_run_before_anything_is_written(demo_db, capsys, tmp_path):
    before = copies_hash(demo_db)
    missing = tmp_path / "no-such-dir" / "changes.jsonl"

    code, _, err = run(capsys, tmp_path, "--db-url", db_url(demo_db), "--run", "--all-keys",
                       "--export-changes", missing)

    assert code == 4, err
    assert f"cannot write the changes file {missing}: No such file or directory" in err
    assert copies_hash(demo_db) == before and not list((tmp_path / "backups").iterdir())


def test_export_changes_does_not_go_with_restore(demo_db, capsys, tmp_path):
    code, _, err = run(capsys, tmp_path, "--db-url", db_url(demo_db), "--restore", tmp_path / "b.json",
                       "--export-changes", tmp_path / "c.jsonl")
    assert code == 2 and "--export-changes is for a plan (a dry run, --run or --verify)" in err
