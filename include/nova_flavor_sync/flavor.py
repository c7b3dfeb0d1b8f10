"""A flavor as nova_api holds it: a row of ``flavors`` with its ``flavor_extra_specs`` (pure).

Its own module because three others need it and none of them owns it: ``db`` reads
flavors, ``scope`` resolves the operator's --flavor against them, ``diff`` compares the
copies with them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Flavor:
    """A row of ``flavors`` with its ``flavor_extra_specs`` (a value may be NULL)."""

    id: int
    flavorid: str
    name: str
    extra_specs: dict[str, str | None]
