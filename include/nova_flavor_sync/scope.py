"""What a run looks at: --flavor, --instance, --key-prefix and --all-keys (pure).

``build_scope`` turns the operator's words into ids, and refuses values that match
nothing or more than one thing, before the database is read any further.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from nova_flavor_sync.errors import UsageError
from nova_flavor_sync.flavor import Flavor

SELECTOR_PREFIXES = ("id:", "name:", "flavorid:")


@dataclass(frozen=True)
class Scope:
    """Which rows and keys a run looks at, and whether risky keys are synced."""

    flavor_ids: frozenset[int] | None = None  # None: every flavor
    flavorids: frozenset[str] | None = None  # flavorids of the chosen flavors (finds orphans too)
    instance_uuids: frozenset[str] | None = None  # None: every instance
    key_prefixes: tuple[str, ...] = ()  # (): every key
    all_keys: bool = False  # sync placement/topology keys too

    def includes_key(self, key: str) -> bool:
        return not self.key_prefixes or key.startswith(self.key_prefixes)

    def as_dict(self) -> dict[str, Any]:
        """A stable, JSON-ready form (for the digest, backups and reports)."""
        return {
            "flavor_ids": sorted(self.flavor_ids) if self.flavor_ids is not None else None,
            "flavorids": sorted(self.flavorids) if self.flavorids is not None else None,
            "instance_uuids": sorted(self.instance_uuids) if self.instance_uuids is not None else None,
            "key_prefixes": sorted(self.key_prefixes),
            "all_keys": self.all_keys,
        }


def build_scope(
    flavors: Mapping[int, Flavor],
    *,
    flavor_selectors: Iterable[str] = (),
    instance_uuids: Iterable[str] = (),
    key_prefixes: Iterable[str] = (),
    all_keys: bool = False,
) -> Scope:
    """Resolve the operator's selectors against the flavors; raise UsageError if one is bad."""
    selectors = list(flavor_selectors)
    chosen = [resolve_flavor(selector, flavors) for selector in selectors]
    uuids = [parse_instance_uuid(value) for value in instance_uuids]
    prefixes = tuple(dict.fromkeys(key_prefixes))
    for prefix in prefixes:
        if not prefix.strip() or len(prefix) > 255:
            raise UsageError(f"--key-prefix {prefix!r} must be 1 to 255 non-blank characters")
    return Scope(
        flavor_ids=frozenset(f.id for f in chosen) if selectors else None,
        flavorids=frozenset(f.flavorid for f in chosen) if selectors else None,
        instance_uuids=frozenset(uuids) if uuids else None,
        key_prefixes=prefixes,
        all_keys=all_keys,
    )


def resolve_flavor(selector: str, flavors: Mapping[int, Flavor]) -> Flavor:
    """Find one flavor by ``id:N``, ``name:X``, ``flavorid:X`` or a bare id, name or flavorid."""
    field_name, _, wanted = selector.partition(":")
    if f"{field_name}:" not in SELECTOR_PREFIXES:
        field_name, wanted = "", selector
    matches = {
        f.id: f
        for f in flavors.values()
        if (field_name in ("", "id") and wanted == str(f.id))
        or (field_name in ("", "name") and wanted == f.name)
        or (field_name in ("", "flavorid") and wanted == f.flavorid)
    }
    if not matches:
        raise UsageError(f"--flavor {selector!r} matches no flavor (by id, name or flavorid)")
    if len(matches) > 1:
        found = ", ".join(f"id:{f.id} name:{f.name} flavorid:{f.flavorid}" for f in matches.values())
        raise UsageError(
            f"--flavor {selector!r} is ambiguous ({found}); "
            "say which with id:, name: or flavorid:"
        )
    return next(iter(matches.values()))


def parse_instance_uuid(value: str) -> str:
    """Return the UUID in Nova's form (lower case, with hyphens) or raise UsageError."""
    try:
        return str(uuid.UUID(value.strip()))
    except (ValueError, AttributeError):
        raise UsageError(f"--instance {value!r} is not a UUID") from None
