"""spec_json against the request specs real Nova 34 serialized (shipped sample)."""

from __future__ import annotations

import hashlib
import json

import pytest

from nova_flavor_sync.demo import load_sample_specs
from nova_flavor_sync.spec_json import (
    FlavorText,
    SpecShapeError,
    dumps_extra_specs,
    find_flavor_start,
    flavor_head_at,
    locate_flavor,
    read_embedded_flavor,
    rewrite_extra_specs,
    sha256_text,
)

SAMPLES = load_sample_specs()
SAMPLE_IDS = [f"row{r['id']}-{'-'.join(r['features']) or 'plain'}" for r in SAMPLES]


def _extra_specs_text(spec: str) -> str:
    data = json.loads(spec)["nova_object.data"]["flavor"]["nova_object.data"]["extra_specs"]
    return json.dumps(data)


@pytest.mark.parametrize("row", SAMPLES, ids=SAMPLE_IDS)
def test_reads_the_flavor_copy_of_every_real_spec(row):
    flavor = read_embedded_flavor(row["spec"])
    data = json.loads(row["spec"])["nova_object.data"]["flavor"]["nova_object.data"]
    assert (flavor.id, flavor.flavorid, flavor.name) == (data["id"], data["flavorid"], data["name"])
    assert flavor.extra_specs == data["extra_specs"]


@pytest.mark.parametrize("row", SAMPLES, ids=SAMPLE_IDS)
def test_rewriting_with_the_same_specs_gives_back_the_same_bytes(row):
    flavor = read_embedded_flavor(row["spec"])
    assert rewrite_extra_specs(row["spec"], flavor.extra_specs) == row["spec"]


@pytest.mark.parametrize("row", SAMPLES, ids=SAMPLE_IDS)
def test_a_rewrite_changes_only_the_extra_specs_bytes(row):
    old_spec = row["spec"]
    new_specs = {**read_embedded_flavor(old_spec).extra_specs, "aggregate_instance_extra_specs:storage_type": "ceph"}
    new_specs.pop("quota:disk_read_iops_sec", None)

    new_spec = rewrite_extra_specs(old_spec, new_specs)

    old_span, new_span = _extra_specs_text(old_spec), _extra_specs_text(new_spec)
    assert new_span == json.dumps(dict(sorted(new_specs.items())))
    before, _, after = old_spec.partition('"extra_specs": ' + old_span)
    assert new_spec == before + '"extra_specs": ' + new_span + after  # every other byte as Nova wrote it
    assert json.dumps(json.loads(new_spec)) == new_spec  # still in Nova's format
    assert sha256_text(new_spec) != sha256_text(old_spec)


def test_new_extra_specs_are_ordered_by_key_and_escaped_like_nova():
    spec = SAMPLES[0]["spec"]
    new_spec = rewrite_extra_specs(spec, {"b": "z\u00fcrich", "a": "\U0001f600"})
    assert '"extra_specs": {"a": "\\ud83d\\ude00", "b": "z\\u00fcrich"}' in new_spec
    assert new_spec.isascii()


def test_nova_object_changes_and_versions_are_kept():
    spec = SAMPLES[0]["spec"]
    new = json.loads(rewrite_extra_specs(spec, {}))
    old = json.loads(spec)
    assert new["nova_object.changes"] == old["nova_object.changes"]
    assert new["nova_object.version"] == old["nova_object.version"]
    flavor_new, flavor_old = new["nova_object.data"]["flavor"], old["nova_object.data"]["flavor"]
    assert flavor_new["nova_object.changes"] == flavor_old["nova_object.changes"]
    assert flavor_new["nova_object.version"] == flavor_old["nova_object.version"]


def test_sha256_is_of_the_utf8_bytes():
    assert sha256_text("z\u00fcrich") == hashlib.sha256("zürich".encode()).hexdigest()


def _mutated(change) -> str:
    document = json.loads(SAMPLES[0]["spec"])
    change(document, document["nova_object.data"]["flavor"])
    return json.dumps(document)


def _set(path, value):
    def change(document, flavor):
        target = {"doc": document, "flavor": flavor, "data": flavor["nova_object.data"]}[path[0]]
        for key in path[1:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


def _drop(path):
    def change(document, flavor):
        target = {"doc": document, "flavor": flavor, "data": flavor["nova_object.data"]}[path[0]]
        del target[path[1]]
    return change


BAD_SPECS = {
    "not-json": ("{not json", "not valid JSON"),
    "empty": ("", "not valid JSON"),
    "truncated": (SAMPLES[0]["spec"][:-10], "not valid JSON"),
    "json-array": ("[1, 2]", "not a JSON object"),
    "json-string": ('"RequestSpec"', "not a JSON object"),
    "wrong-object": (_mutated(_set(("doc", "nova_object.name"), "BuildRequest")), "not a RequestSpec object"),
    "future-major-version": (_mutated(_set(("doc", "nova_object.version"), "2.0")), "version '2.0'"),
    "version-not-string": (_mutated(_set(("doc", "nova_object.version"), 1.15)), "version 1.15"),
    "no-data": (_mutated(_drop(("doc", "nova_object.data"))), "no nova_object.data"),
    "no-flavor": (_mutated(lambda d, f: d["nova_object.data"].pop("flavor")), "has no flavor"),
    "null-flavor": (_mutated(lambda d, f: d["nova_object.data"].update(flavor=None)), "has no flavor"),
    "flavor-wrong-object": (_mutated(_set(("flavor", "nova_object.name"), "ImageMeta")), "not a Flavor object"),
    "flavor-future-version": (_mutated(_set(("flavor", "nova_object.version"), "3.1")), "Flavor version '3.1'"),
    "flavor-id-string": (_mutated(_set(("data", "id"), "14")), "flavor id is not an integer"),
    "flavor-id-bool": (_mutated(_set(("data", "id"), True)), "flavor id is not an integer"),
    "flavor-id-missing": (_mutated(_drop(("data", "id"))), "flavor id is not an integer"),
    "flavorid-number": (_mutated(_set(("data", "flavorid"), 21)), "flavorid is not a string"),
    "no-extra-specs": (_mutated(_drop(("data", "extra_specs"))), "has no extra_specs"),
    "extra-specs-list": (_mutated(_set(("data", "extra_specs"), ["a"])), "extra_specs is not an object"),
    "extra-specs-null": (_mutated(_set(("data", "extra_specs"), None)), "extra_specs is not an object"),
    "value-number": (_mutated(_set(("data", "extra_specs", "hw:cpu_policy"), 2)), "non-string value"),
    "value-null": (_mutated(_set(("data", "extra_specs", "hw:cpu_policy"), None)), "non-string value"),
    "value-object": (_mutated(_set(("data", "extra_specs", "hw:cpu_policy"), {"a": "b"})), "non-string value"),
}


@pytest.mark.parametrize(("spec", "message"), BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_unreadable_specs_are_refused_with_the_reason(spec, message):
    with pytest.raises(SpecShapeError, match=message):
        read_embedded_flavor(spec)
    with pytest.raises(SpecShapeError, match=message):
        rewrite_extra_specs(spec, {})


def test_a_spec_not_in_novas_format_is_read_but_never_rewritten():
    compact = json.dumps(json.loads(SAMPLES[0]["spec"]), separators=(",", ":"))
    assert read_embedded_flavor(compact) == read_embedded_flavor(SAMPLES[0]["spec"])
    with pytest.raises(SpecShapeError, match="not in Nova's serialization format"):
        rewrite_extra_specs(compact, {})


def test_new_values_must_be_strings():
    with pytest.raises(SpecShapeError, match="not a string pair"):
        rewrite_extra_specs(SAMPLES[0]["spec"], {"hw:cpu_policy": 1})


# -- finding the flavor in the text (what a rewrite splices, and what a planner recognises) --


@pytest.mark.parametrize("row", SAMPLES, ids=SAMPLE_IDS)
def test_the_flavor_is_found_where_a_full_parse_finds_it(row):
    spec = row["spec"]
    at, flavor_text = locate_flavor(spec)
    assert at == find_flavor_start(spec)
    assert json.loads(flavor_text.text) == json.loads(spec)["nova_object.data"]["flavor"]
    assert flavor_text.text[flavor_text.specs_start : flavor_text.specs_end] == _extra_specs_text(spec)


@pytest.mark.parametrize("row", SAMPLES, ids=SAMPLE_IDS)
def test_splice_hashes_are_the_hashes_of_the_old_and_the_new_text(row):
    spec = row["spec"]
    at, flavor_text = locate_flavor(spec)
    new_json = dumps_extra_specs({"a": "b"})
    assert flavor_text.splice_hashes(spec, at, new_json.encode()) == (
        sha256_text(spec),
        sha256_text(rewrite_extra_specs(spec, {"a": "b"})),
    )


@pytest.mark.parametrize("row", SAMPLES, ids=SAMPLE_IDS)
def test_the_head_of_every_real_copy_is_its_text_up_to_the_end_of_its_extra_specs(row):
    spec = row["spec"]
    at, flavor_text = locate_flavor(spec)
    copy = read_embedded_flavor(spec)
    identities: dict = {}
    head = flavor_head_at(spec, at, copy, identities)
    assert head == FlavorText(flavor_text.text[: flavor_text.specs_end], flavor_text.specs_start,
                              flavor_text.specs_end)
    assert list(identities.values()) == [(copy.id, copy.flavorid, copy.name)]


def _flavor_data_changed(spec: str, change) -> str:
    document = json.loads(spec)
    flavor = document["nova_object.data"]["flavor"]
    flavor["nova_object.data"] = change(flavor["nova_object.data"])
    return json.dumps(document)


def _id_moved_after_extra_specs(spec: str) -> str:
    return _flavor_data_changed(spec, lambda data: {**{k: v for k, v in data.items() if k != "id"}, "id": data["id"]})


def _extra_specs_key_deeper_before(spec: str) -> str:
    return _flavor_data_changed(spec, lambda data: {"projects": {"extra_specs": {}}, **data})


def _id_repeated_after_extra_specs(spec: str) -> str:
    """The flavor's data with ``"id": 999`` at its end: a second id, which a parse takes."""
    at, flavor_text = locate_flavor(spec)
    data_end = spec.index("}", spec.index('"deleted": ', at + flavor_text.specs_end))
    return spec[:data_end] + ', "id": 999' + spec[data_end:]


@pytest.mark.parametrize("changed", [_id_moved_after_extra_specs, _extra_specs_key_deeper_before,
                                     _id_repeated_after_extra_specs])
def test_a_copy_whose_head_does_not_say_which_copy_it_is_has_no_head(changed):
    # The planner then recognises the copy by its whole flavor object, if at all.
    spec = changed(SAMPLES[0]["spec"])
    at = find_flavor_start(spec)
    assert at >= 0 and flavor_head_at(spec, at, read_embedded_flavor(spec), {}) is None


def _with_hint(name: str, value) -> str:
    document = json.loads(SAMPLES[0]["spec"])
    document["nova_object.data"]["scheduler_hints"] = {name: value}
    return json.dumps(document)


def test_text_that_only_looks_like_a_flavor_inside_strings_is_not_found():
    # Inside a JSON string every quote is escaped, so the flavor's text cannot appear there.
    spec = _with_hint("x", ['"flavor": {"nova_object.name": "Flavor"'])
    at = find_flavor_start(spec)
    assert json.JSONDecoder().raw_decode(spec, at)[0] == json.loads(spec)["nova_object.data"]["flavor"]
    rewritten = json.loads(rewrite_extra_specs(spec, {"a": "b"}))["nova_object.data"]
    assert rewritten["scheduler_hints"] == {"x": ['"flavor": {"nova_object.name": "Flavor"']}
    assert rewritten["flavor"]["nova_object.data"]["extra_specs"] == {"a": "b"}


def test_a_second_flavor_object_anywhere_makes_the_text_unrecognisable_and_unrewritable():
    flavor = json.loads(SAMPLES[0]["spec"])["nova_object.data"]["flavor"]
    spec = _with_hint("flavor", flavor)  # a hint named "flavor" holding a Flavor object
    assert find_flavor_start(spec) == -1
    assert read_embedded_flavor(spec) == read_embedded_flavor(SAMPLES[0]["spec"])  # still readable
    with pytest.raises(SpecShapeError, match="not in Nova's serialization format"):
        rewrite_extra_specs(spec, {})


def test_an_extra_spec_named_extra_specs_is_refused_not_guessed():
    spec = rewrite_extra_specs(SAMPLES[0]["spec"], {"extra_specs": "x"})
    assert read_embedded_flavor(spec).extra_specs == {"extra_specs": "x"}
    with pytest.raises(SpecShapeError, match="cannot locate extra_specs"):
        rewrite_extra_specs(spec, {})


def test_a_spec_with_raw_non_ascii_text_is_read_but_never_rewritten():
    spec = _with_hint("zone", ["zürich"]).replace("z\\u00fcrich", "zürich")
    assert not spec.isascii()
    assert read_embedded_flavor(spec) == read_embedded_flavor(SAMPLES[0]["spec"])
    with pytest.raises(SpecShapeError, match="not in Nova's serialization format"):
        rewrite_extra_specs(spec, {})


def test_text_before_the_flavor_must_be_a_request_spec_for_it_to_be_recognised():
    spec = SAMPLES[0]["spec"]
    assert find_flavor_start(spec) > 0
    assert find_flavor_start(spec.replace('"RequestSpec"', '"BuildRequest"', 1)) == -1
    assert find_flavor_start(spec.replace('"nova_object.version": "1.', '"nova_object.version": "2.', 1)) == -1
