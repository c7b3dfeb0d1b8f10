"""value_changes: a plan grouped by (flavor, key, old, new), capped, escaped, exported."""

from __future__ import annotations

import json
import resource
import stat

import pytest

from nova_flavor_sync.demo import load_sample_specs
from nova_flavor_sync.diff import make_plan
from nova_flavor_sync.errors import ConfigError
from nova_flavor_sync.flavor import Flavor
from nova_flavor_sync.plan import CopyPlan, SpecRow
from nova_flavor_sync.scope import Scope
from nova_flavor_sync.spec_json import read_embedded_flavor, rewrite_extra_specs
from nova_flavor_sync.value_changes import (
    ValueChange,
    group_copies,
    group_lines,
    group_records,
    markdown_text,
    read_changes,
    shown_value,
    write_changes,
)

STORAGE = "aggregate_instance_extra_specs:storage_type"  # nvme in BASE's copy
# Row 20 of the real sample: flavor gp2.small, with aggregate_instance_extra_specs:storage_type nvme.
BASE = next(r for r in load_sample_specs() if r["id"] == 20)
COPY = read_embedded_flavor(BASE["spec"])
CELL1 = "cell1 (835ce9b0-0000-0000-0000-000000000001)"


def spec_with(extra_specs: dict[str, str]) -> str:
    return rewrite_extra_specs(BASE["spec"], extra_specs)


def flavor(**changes: str | None) -> dict[int, Flavor]:
    specs = {**COPY.extra_specs, **changes}
    return {COPY.id: Flavor(COPY.id, COPY.flavorid, COPY.name, {k: v for k, v in specs.items() if v is not None})}


def rows(count: int, *, specs: list[dict[str, str]] | None = None, start: int = 1):
    """``count`` RequestSpec rows of BASE's flavor, cycling through ``specs`` (default: BASE's own copy)."""
    texts = [spec_with(s) for s in specs] if specs else [BASE["spec"]]
    for i in range(start, start + count):
        yield SpecRow(i, f"00000000-0000-0000-0000-{i:012d}", texts[i % len(texts)])


def test_100k_changed_rows_read_as_a_few_lines_with_counts_per_copy_and_examples():
    flavors = flavor(**{STORAGE: "ceph", "quota:vif_inbound_average": "1000", "quota:disk_read_iops_sec": None,
                        "hw:mem_page_size": "large"})
    other_copy = {**COPY.extra_specs, STORAGE: "ssd"}  # another stale value of the same key
    api = make_plan(flavors, rows(100_000, specs=[COPY.extra_specs, other_copy]), Scope())
    cell = make_plan(flavors, rows(10, start=200_001), Scope())
    assert len(api.changes) == 100_000 and api.changes._file is not None  # spooled: streamed back
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    groups = group_copies([CopyPlan("nova_api", None, api), CopyPlan(CELL1, "835ce9b0", cell)]).groups()

    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 20_000  # KiB: no row kept
    assert [(g.change.key, g.change.old, g.change.new, g.change.held_back, dict(g.counts)) for g in groups] == [
        ("quota:disk_read_iops_sec", "500", None, False, {"nova_api": 100_000, CELL1: 10}),
        ("quota:vif_inbound_average", None, "1000", False, {"nova_api": 100_000, CELL1: 10}),
        (STORAGE, "nvme", "ceph", False, {"nova_api": 50_000, CELL1: 10}),
        (STORAGE, "ssd", "ceph", False, {"nova_api": 50_000}),
        ("hw:mem_page_size", None, "large", True, {"nova_api": 100_000, CELL1: 10}),
    ]
    assert groups[2].examples == ["00000000-0000-0000-0000-000000000002", "00000000-0000-0000-0000-000000000004",
                                  "00000000-0000-0000-0000-000000000006"]
    assert groups[3].examples[0] == "00000000-0000-0000-0000-000000000001"
    lines = group_lines(groups)
    assert lines[2] == (f'gp2.small: {STORAGE} "nvme" -> "ceph" [scheduling]: 50010 (nova_api 50000, cell1 10)')
    assert lines[0].startswith('gp2.small: quota:disk_read_iops_sec removed (was "500") [guest]: 100010')
    assert lines[1].startswith('gp2.small: quota:vif_inbound_average added "1000" [guest]: 100010')
    assert lines[4] == ('gp2.small: hw:mem_page_size added "large" [placement, held back]: 100010 '
                        "(nova_api 100000, cell1 10)")


def test_rows_held_back_entirely_are_grouped_as_held_back():
    plan = make_plan(flavor(**{"hw:mem_page_size": "large"}), rows(4), Scope())
    assert not plan.changes and len(plan.held_back) == 4
    (group,) = group_copies([CopyPlan("nova_api", None, plan)]).groups()
    assert group.change == ValueChange("gp2.small", "hw:mem_page_size", None, "large", "placement", True)
    assert group.total == 4 and len(group.examples) == 3


def test_long_lists_are_capped_with_a_pointer_to_the_full_view():
    specs = [{**COPY.extra_specs, STORAGE: f"old-{n}"} for n in range(30)]
    plan = make_plan(flavor(**{STORAGE: "ceph"}), rows(30, specs=specs), Scope())
    groups = group_copies([CopyPlan("nova_api", None, plan)]).groups()
    assert len(groups) == 30
    lines = group_lines(groups, more="--export-changes FILE")
    assert len(lines) == 21 and lines[-1] == "... and 10 more lines: see --export-changes FILE"
    assert len(group_lines(groups, limit=None)) == 30


def test_long_values_are_cut_and_odd_characters_cannot_break_a_line():
    long = "x" * 500
    assert shown_value(long) == json.dumps("x" * 59 + "\u2026", ensure_ascii=False) and len(shown_value(long)) == 62
    assert shown_value('a\nb|`c"') == '"a\\nb|`c\\""'
    assert shown_value(None) == "(absent)" and shown_value("") == '""'
    change = ValueChange("f", "k", "a\nb", "<script>alert(1)</script>", "scheduling")
    assert "\n" not in change.shown()


def test_markdown_text_escapes_what_markdown_or_html_would_read():
    nasty = 'm1.`x`|*y*_z_ <script>alert("1")</script> [l](http://e) \n# h'
    escaped = markdown_text(nasty)
    assert "\n" not in escaped
    for char in "`|*_<>[]()#\"":
        assert char not in escaped.replace("\\" + char, ""), char  # each one escaped
    # A Markdown reader gives the text back: backslash + ASCII punctuation is that character.
    assert escaped.replace("\\", "") == nasty.replace("\n", " ").replace("\\", "")


def test_the_export_has_a_line_per_changed_key_per_row_and_the_untouched_rows(tmp_path):
    flavors = flavor(**{STORAGE: "ceph", "hw:mem_page_size": "large"})
    left = [SpecRow(9, "00000000-0000-0000-0000-000000000009", BASE["spec"], left_alone="instance is being resized")]
    plan = make_plan(flavors, [*rows(2), *left], Scope())
    path = write_changes([CopyPlan("nova_api", None, plan)], tmp_path / "changes.jsonl")

    records = list(read_changes(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [(r["instance"][-1], r["row"], r["key"], r["old"], r["new"], r["risk"], r["status"], r["reason"])
            for r in records] == [
        ("1", 1, STORAGE, "nvme", "ceph", "scheduling", "change", None),
        ("1", 1, "hw:mem_page_size", None, "large", "placement", "held_back", None),
        ("2", 2, STORAGE, "nvme", "ceph", "scheduling", "change", None),
        ("2", 2, "hw:mem_page_size", None, "large", "placement", "held_back", None),
        ("9", 9, None, None, None, None, "left_alone", "instance is being resized"),
    ]
    assert {r["copy"] for r in records} == {"nova_api"} and records[0]["flavor"] == "gp2.small"
    # Grouping the export gives what grouping the plan gives.
    from_plan = group_copies([CopyPlan("nova_api", None, plan)]).groups()
    assert [(g.change, g.counts) for g in group_records(records).groups()] == [(g.change, g.counts) for g in from_plan]


def test_an_export_that_cannot_be_written_says_why_and_leaves_nothing(tmp_path):
    plan = make_plan(flavor(**{STORAGE: "ceph"}), rows(1), Scope())
    with pytest.raises(ConfigError, match=r"cannot write the changes file .*/missing/changes.jsonl: No such file"):
        write_changes([CopyPlan("nova_api", None, plan)], tmp_path / "missing" / "changes.jsonl")
    assert list(tmp_path.iterdir()) == []
