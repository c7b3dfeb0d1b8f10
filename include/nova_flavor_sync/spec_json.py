"""Read and rewrite the flavor copy inside one ``request_specs.spec`` text (pure).

Nova stores ``jsonutils.dumps(request_spec.obj_to_primitive())``: ``json.dumps`` with its
defaults, so ``json.dumps(json.loads(text)) == text`` for every row Nova wrote. The rewrite
relies on that: it re-serialises the document with only ``extra_specs`` replaced and then
proves, byte by byte, that everything before and after the ``extra_specs`` value is unchanged.
A text that does not round-trip was not written by Nova's serializer; it is refused, not
"normalised".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Major versions of the objects whose layout this module knows. A minor version adds
# fields and keeps the path to the flavor; a new major version may not.
KNOWN_MAJOR_VERSIONS = {"RequestSpec": "1", "Flavor": "1"}


class SpecShapeError(ValueError):
    """The text is not a RequestSpec this tool can read or rewrite; str() says why."""


@dataclass(frozen=True, slots=True)
class EmbeddedFlavor:
    """The flavor copy a RequestSpec carries."""

    id: int  # flavors.id at the time the copy was made
    flavorid: str  # flavors.flavorid at that time
    name: str
    extra_specs: dict[str, str]


def sha256_text(text: str) -> str:
    """Hex sha256 of the text's UTF-8 bytes (equal to MariaDB's ``SHA2(spec, 256)``)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_embedded_flavor(spec_text: str) -> EmbeddedFlavor:
    """Parse a spec and return its flavor copy, or raise SpecShapeError."""
    return _flavor_of(_parse(spec_text))[1]


def rewrite_extra_specs(spec_text: str, extra_specs: Mapping[str, str]) -> str:
    """Return ``spec_text`` with the flavor's extra_specs replaced, ordered by key.

    Every byte outside the extra_specs value is kept: object versions,
    ``nova_object.changes``, field order and escaping are exactly what Nova wrote.
    """
    document = _parse(spec_text)
    if json.dumps(document) != spec_text:
        raise SpecShapeError(
            "spec is not in Nova's serialization format (json.dumps defaults); "
            "refusing to rewrite it"
        )
    flavor_data, old = _flavor_of(document)
    for key, value in extra_specs.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise SpecShapeError(f"new extra spec {key!r} is not a string pair")

    # Find where the extra_specs value sits by serialising with a marker in its place.
    marker = "nova-flavor-sync:extra-specs-marker"
    flavor_data["extra_specs"] = marker
    with_marker = json.dumps(document)
    prefix, found, suffix = with_marker.partition(json.dumps(marker))
    if not found or json.dumps(marker) in suffix:
        raise SpecShapeError("cannot locate extra_specs in the spec text")
    if prefix + json.dumps(old.extra_specs) + suffix != spec_text:
        raise SpecShapeError("extra_specs is not stored where Nova writes it")
    return prefix + json.dumps(dict(sorted(extra_specs.items()))) + suffix


def _parse(spec_text: str) -> dict[str, Any]:
    try:
        document = json.loads(spec_text)
    except (TypeError, ValueError) as exc:
        raise SpecShapeError(f"spec is not valid JSON: {exc}") from None
    _check_object(document, "RequestSpec", "spec")
    return document


def _check_object(value: Any, name: str, where: str) -> dict[str, Any]:
    """Check an oslo versioned-object primitive and return its ``nova_object.data``."""
    if not isinstance(value, dict):
        raise SpecShapeError(f"{where} is not a JSON object")
    if value.get("nova_object.name") != name:
        raise SpecShapeError(
            f"{where} is not a {name} object (nova_object.name is {value.get('nova_object.name')!r})"
        )
    version = value.get("nova_object.version")
    if not isinstance(version, str) or version.split(".")[0] != KNOWN_MAJOR_VERSIONS[name]:
        raise SpecShapeError(
            f"{where} has {name} version {version!r}; this tool knows "
            f"{KNOWN_MAJOR_VERSIONS[name]}.x only"
        )
    data = value.get("nova_object.data")
    if not isinstance(data, dict):
        raise SpecShapeError(f"{where} has no nova_object.data object")
    return data


def _flavor_of(document: dict[str, Any]) -> tuple[dict[str, Any], EmbeddedFlavor]:
    """Return the flavor's mutable data dict and a checked copy of its fields."""
    data = document["nova_object.data"]
    if data.get("flavor") is None:
        raise SpecShapeError("spec has no flavor")
    flavor = _check_object(data["flavor"], "Flavor", "spec's flavor")
    flavor_id, flavorid = flavor.get("id"), flavor.get("flavorid")
    if not isinstance(flavor_id, int) or isinstance(flavor_id, bool):
        raise SpecShapeError(f"flavor id is not an integer: {flavor_id!r}")
    if not isinstance(flavorid, str):
        raise SpecShapeError(f"flavor flavorid is not a string: {flavorid!r}")
    if "extra_specs" not in flavor:
        raise SpecShapeError("flavor has no extra_specs")
    extra_specs = flavor["extra_specs"]
    if not isinstance(extra_specs, dict):
        raise SpecShapeError(f"flavor extra_specs is not an object: {type(extra_specs).__name__}")
    for key, value in extra_specs.items():
        if not isinstance(value, str):
            raise SpecShapeError(f"extra spec {key!r} has a non-string value: {value!r}")
    name = flavor.get("name")
    return flavor, EmbeddedFlavor(
        id=flavor_id,
        flavorid=flavorid,
        name=name if isinstance(name, str) else "",
        extra_specs=dict(extra_specs),
    )
