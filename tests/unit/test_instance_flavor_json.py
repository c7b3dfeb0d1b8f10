"""spec_json on the instance's own flavor copy (instance_extra.flavor), against the real Nova 34 rows shipped."""

from __future__ import annotations

import json

import pytest

from nova_flavor_sync.demo import load_sample_instance_flavors
from nova_flavor_sync.spec_json import (
    INSTANCE_FLAVOR,
    SpecShapeError,
    find_flavor_start,
    instance_flavor_in_flux,
    read_embedded_flavor,
    rewrite_extra_specs,
)

SAMPLES = load_sample_instance_flavors()
IDS = [f"{r['cell']}-row{r['id']}-{'-'.join(r['features'])}" for r in SAMPLES]


@pytest.mark.parametrize("row", SAMPLES, ids=IDS)
def test_reads_the_cur_flavor_of_every_real_row(row):
    flavor = read_embedded_flavor(row["flavor"], INSTANCE_FLAVOR)
    cur = json.loads(row["flavor"])["cur"]["nova_object.data"]
    assert (flavor.id, flavor.flavorid, flavor.name, flavor.extra_specs) == (
        cur["id"], cur["flavorid"], cur["name"], cur["extra_specs"])
    assert flavor.id == row["instance_type_id"]  # the cell's own record of the flavor agrees


@pytest.mark.parametrize("row", SAMPLES, ids=IDS)
def test_a_rewrite_changes_only_curs_extra_specs(row):
    old_text = row["flavor"]
    cur_specs = read_embedded_flavor(old_text, INSTANCE_FLAVOR).extra_specs
    new_specs = {**cur_specs, "aggregate_instance_extra_specs:storage_type": "ceph", "hw_rng:allowed": "true"}

    new_text = rewrite_extra_specs(old_text, new_specs, layout=INSTANCE_FLAVOR)

    old_doc, new_doc = json.loads(old_text), json.loads(new_text)
    assert new_doc["cur"]["nova_object.data"]["extra_specs"] == dict(sorted(new_specs.items()))
    assert (new_doc["old"], new_doc["new"]) == (old_doc["old"], old_doc["new"])  # old and new untouched
    old_value, new_value = json.dumps(cur_specs), json.dumps(dict(sorted(new_specs.items())))
    at = old_text.index('"extra_specs": ' + old_value) + len('"extra_specs": ')
    # every byte outside cur's extra_specs value is Nova's, including old/new and their extra_specs
    assert new_text == old_text[:at] + new_value + old_text[at + len(old_value):]
    assert json.dumps(new_doc) == new_text  # still exactly Nova's format


@pytest.mark.parametrize("row", SAMPLES, ids=IDS)
def test_the_same_specs_give_back_the_same_bytes(row):
    flavor = read_embedded_flavor(row["flavor"], INSTANCE_FLAVOR)
    assert rewrite_extra_specs(row["flavor"], flavor.extra_specs, layout=INSTANCE_FLAVOR) == row["flavor"]


@pytest.mark.parametrize("row", SAMPLES, ids=IDS)
def test_old_or_new_set_means_an_operation_is_under_way(row):
    expected = bool({"old_set", "new_set"} & set(row["features"]))
    assert instance_flavor_in_flux(row["flavor"]) is expected
    assert find_flavor_start(row["flavor"], INSTANCE_FLAVOR) == len('{"cur": ')


def test_a_request_spec_is_not_an_instance_flavor_and_the_reverse():
    from nova_flavor_sync.demo import load_sample_specs

    spec = load_sample_specs()[0]["spec"]
    with pytest.raises(SpecShapeError, match="instance flavor has the keys"):
        read_embedded_flavor(spec, INSTANCE_FLAVOR)
    with pytest.raises(SpecShapeError, match="is not a RequestSpec object"):
        read_embedded_flavor(SAMPLES[0]["flavor"])


CUR = json.loads(SAMPLES[0]["flavor"])["cur"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "instance flavor is not valid JSON"),
        ("[]", "instance flavor is not a JSON object"),
        (json.dumps({"cur": CUR, "new": None, "old": None}), "has the keys ['cur', 'new', 'old'], not cur, old, new"),
        (json.dumps({"cur": None, "old": None, "new": None}), "instance flavor has no cur flavor"),
        (json.dumps({"cur": CUR, "old": {"x": 1}, "new": None}), "instance flavor's old is not a Flavor object"),
        (json.dumps({"cur": {**CUR, "nova_object.version": "2.0"}, "old": None, "new": None}),
         "has Flavor version '2.0'"),
        (json.dumps({"cur": CUR, "old": None, "new": None}, indent=1), "not in Nova's serialization format"),
    ],
    ids=["not-json", "not-object", "keys-reordered", "no-cur", "bad-old", "unknown-version", "not-novas-format"],
)
def test_texts_nova_did_not_write_are_never_rewritten(text, message):
    with pytest.raises(SpecShapeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        rewrite_extra_specs(text, {"a": "b"}, layout=INSTANCE_FLAVOR)
