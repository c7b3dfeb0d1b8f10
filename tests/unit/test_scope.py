"""build_scope: the operator's --flavor/--instance/--key-prefix words, resolved or refused."""

from __future__ import annotations

import pytest

from nova_flavor_sync.errors import ExitCode, UsageError
from nova_flavor_sync.flavor import Flavor
from nova_flavor_sync.scope import build_scope

FLAVORS = {
    1: Flavor(1, "24", "gp2.small", {}),
    4: Flavor(4, "21", "g4.small", {}),
    21: Flavor(21, "c0ffee", "m1.xlarge", {}),
}


@pytest.mark.parametrize(
    ("selector", "flavor_id"),
    [("gp2.small", 1), ("24", 1), ("c0ffee", 21), ("id:21", 21), ("flavorid:21", 4), ("name:g4.small", 4), ("1", 1)],
    ids=["name", "flavorid", "flavorid-text", "id-prefix", "flavorid-prefix", "name-prefix", "bare-id"],
)
def test_a_flavor_is_found_by_id_name_or_flavorid(selector, flavor_id):
    scope = build_scope(FLAVORS, flavor_selectors=[selector])
    assert scope.flavor_ids == {flavor_id}
    assert scope.flavorids == {FLAVORS[flavor_id].flavorid}


BAD = {
    "unknown-flavor": (dict(flavor_selectors=["m9.huge"]), "matches no flavor"),
    "ambiguous-id-vs-flavorid": (dict(flavor_selectors=["21"]), "ambiguous"),
    "unknown-id": (dict(flavor_selectors=["id:99"]), "matches no flavor"),
    "sql-looking-flavor": (dict(flavor_selectors=["x' OR '1'='1"]), "matches no flavor"),
    "not-a-uuid": (dict(instance_uuids=["not-a-uuid"]), "is not a UUID"),
    "sql-looking-uuid": (dict(instance_uuids=["1 OR 1=1"]), "is not a UUID"),
    "blank-key-prefix": (dict(key_prefixes=["  "]), "non-blank"),
    "long-key-prefix": (dict(key_prefixes=["x" * 256]), "1 to 255"),
}


@pytest.mark.parametrize(("kwargs", "message"), BAD.values(), ids=BAD.keys())
def test_bad_selectors_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message) as caught:
        build_scope(FLAVORS, **kwargs)
    assert caught.value.exit_code == ExitCode.USAGE


def test_instance_uuids_are_normalised_to_novas_form():
    scope = build_scope(FLAVORS, instance_uuids=["86E3E726-0B0F-473B-A114-E0689F27F52C"])
    assert scope.instance_uuids == {"86e3e726-0b0f-473b-a114-e0689f27f52c"}


def test_no_selectors_means_everything():
    scope = build_scope(FLAVORS)
    assert (scope.flavor_ids, scope.instance_uuids, scope.key_prefixes) == (None, None, ())
    assert scope.includes_key("anything")


def test_key_prefixes_select_keys():
    scope = build_scope(FLAVORS, key_prefixes=["aggregate_instance_extra_specs:", "quota:"])
    assert scope.includes_key("quota:cpu_shares") and not scope.includes_key("hw:cpu_policy")
