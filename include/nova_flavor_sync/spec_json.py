"""Read and rewrite the flavor copy inside one column's JSON text (pure).

Nova keeps two copies of an instance's flavor, each in a JSON text (a ``CopyLayout``):
``request_specs.spec`` (``REQUEST_SPEC``, the RequestSpec's flavor) and the cell database's
``instance_extra.flavor`` (``INSTANCE_FLAVOR``, ``{"cur": ..., "old": ..., "new": ...}``:
only ``cur``, the instance's flavor, is ever read for planning or rewritten here).

Nova writes both with ``jsonutils.dumps``: ``json.dumps`` with its
defaults (``", "`` and ``": "`` separators, ASCII only, key order kept). A rewrite is a
splice: the text is cut just before and just after the flavor's ``extra_specs`` value, and
only that value is replaced with ``json.dumps`` of the new dict. Every other byte is the
original text itself, so object versions, ``nova_object.changes``, field order and escaping
stay exactly as Nova wrote them.

The cut is found in the text, not re-created: the flavor object is the only place the text
``"flavor": {"nova_object.name": "Flavor"`` (in a RequestSpec) or ``{"cur": {"nova_object.name":
"Flavor"`` (in an instance's flavor) can occur (inside a JSON string every ``"`` is escaped), it
must occur exactly once, and the parsed flavor found there must equal the one a whole-document
parse finds. The old ``extra_specs`` value must read back byte for byte as
``json.dumps`` writes it. A text that fails any of this was not written by Nova's serializer:
it can be read, but it is never rewritten.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

# Major versions of the objects whose layout this module knows. A minor version adds
# fields and keeps the path to the flavor; a new major version may not.
KNOWN_MAJOR_VERSIONS = {"RequestSpec": "1", "Flavor": "1"}

# How every spec Nova writes begins, up to the minor version of the RequestSpec object.
NOVA_SPEC_PREFIX = (
    '{"nova_object.name": "RequestSpec", "nova_object.namespace": "nova", '
    f'"nova_object.version": "{KNOWN_MAJOR_VERSIONS["RequestSpec"]}.'
)
# The flavor's key and the start of its value, as json.dumps writes them.
FLAVOR_KEY = '"flavor": '
FLAVOR_START = FLAVOR_KEY + '{"nova_object.name": "Flavor"'
# An instance's flavor column: Instance._save_flavor writes the keys cur, old, new in this order.
INSTANCE_FLAVOR_KEYS = ("cur", "old", "new")
CUR_KEY = '{"cur": '
CUR_START = CUR_KEY + '{"nova_object.name": "Flavor"'
EXTRA_SPECS_KEY = '"extra_specs": '

_decoder = json.JSONDecoder()


class SpecShapeError(ValueError):
    """The text is not a flavor copy this tool can read or rewrite; str() says why."""


@dataclass(frozen=True, slots=True)
class CopyLayout:
    """Where the flavor copy sits in the JSON text of one kind of column, and how it begins."""

    what: str  # the text's name in messages: "spec", "instance flavor"
    prefix: str  # every text Nova writes begins with this
    marker: str  # occurs exactly once, where the flavor object starts
    marker_skip: int  # from the marker to the flavor object's "{"
    flavor_of: Callable[[Any], Any]  # the parsed document -> its flavor primitive, checked


def _request_spec_flavor(document: Any) -> Any:
    data = _check_object(document, "RequestSpec", "spec")
    if data.get("flavor") is None:
        raise SpecShapeError("spec has no flavor")
    return data["flavor"]


def _instance_cur_flavor(document: Any) -> Any:
    if not isinstance(document, dict):
        raise SpecShapeError("instance flavor is not a JSON object")
    if tuple(document) != INSTANCE_FLAVOR_KEYS:
        raise SpecShapeError(f"instance flavor has the keys {list(document)}, not cur, old, new")
    for key in ("old", "new"):
        if document[key] is not None:
            _check_object(document[key], "Flavor", f"instance flavor's {key}")
    if document["cur"] is None:
        raise SpecShapeError("instance flavor has no cur flavor")
    return document["cur"]


REQUEST_SPEC = CopyLayout("spec", NOVA_SPEC_PREFIX, FLAVOR_START, len(FLAVOR_KEY), _request_spec_flavor)
INSTANCE_FLAVOR = CopyLayout(
    "instance flavor",
    CUR_START + ', "nova_object.namespace": "nova", '
    f'"nova_object.version": "{KNOWN_MAJOR_VERSIONS["Flavor"]}.',
    CUR_START,
    len(CUR_KEY),
    _instance_cur_flavor,
)


@dataclass(frozen=True, slots=True)
class EmbeddedFlavor:
    """The flavor copy a RequestSpec carries."""

    id: int  # flavors.id at the time the copy was made
    flavorid: str  # flavors.flavorid at that time
    name: str
    extra_specs: dict[str, str]


@dataclass(frozen=True, slots=True)
class FlavorText:
    """Where a spec's flavor object, and its extra_specs value inside it, sit in the text.

    ``text`` is the flavor object's exact bytes (or its head: up to the end of its
    extra_specs, ``flavor_head_at``); ``specs_start``/``specs_end`` are offsets of the extra_specs value
    within it. The same flavor copy has the same ``text`` in every spec
    that carries it, which is what lets a planner recognise a copy it has already judged (it
    keeps one FlavorText for each of thousands of copies: nothing more is kept here).
    """

    text: str
    specs_start: int
    specs_end: int

    def splice(self, spec_text: str, at: int, new_specs_json: str) -> str:
        """``spec_text`` (whose flavor object starts at ``at``) with a new extra_specs value."""
        return spec_text[: at + self.specs_start] + new_specs_json + spec_text[at + self.specs_end :]

    def splice_hashes(self, spec_text: str, at: int, new_specs_json: bytes) -> tuple[str, str]:
        """``(sha256_text(spec_text), sha256_text(self.splice(...)))``, without building the new text.

        The bytes before the extra_specs value are hashed once for both (a plan needs only
        the hashes of a changed row). Only for ASCII texts, whose character offsets are
        byte offsets: ``locate_flavor`` refuses any other.
        """
        data = memoryview(spec_text.encode("ascii"))
        cut, rest = at + self.specs_start, at + self.specs_end
        new = hashlib.sha256(data[:cut])
        old = new.copy()
        old.update(data[cut:])
        new.update(new_specs_json)
        new.update(data[rest:])
        return old.hexdigest(), new.hexdigest()


def sha256_text(text: str) -> str:
    """Hex sha256 of the text's UTF-8 bytes (equal to MariaDB's ``SHA2(spec, 256)``)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def dumps_extra_specs(extra_specs: Mapping[str, str]) -> str:
    """The extra_specs value as this tool writes it: ordered by key, Nova's json.dumps format."""
    for key, value in extra_specs.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise SpecShapeError(f"new extra spec {key!r} is not a string pair")
    return json.dumps(dict(sorted(extra_specs.items())))


def read_embedded_flavor(spec_text: str, layout: CopyLayout = REQUEST_SPEC) -> EmbeddedFlavor:
    """Parse a text and return its flavor copy, or raise SpecShapeError."""
    return _checked_flavor(layout.flavor_of(_parse(spec_text, layout)), layout)


def find_flavor_start(spec_text: str, layout: CopyLayout = REQUEST_SPEC) -> int:
    """Offset of the flavor object in a text written the way Nova writes it, or -1.

    Cheap (two substring searches); it proves nothing about the rest of the text. -1 means
    "not recognisably Nova's format": parse the whole text instead.
    """
    if not spec_text.startswith(layout.prefix):
        return -1
    at = spec_text.find(layout.marker)
    if at < 0 or spec_text.find(layout.marker, at + 1) >= 0:
        return -1
    return at + layout.marker_skip


def locate_flavor(spec_text: str, layout: CopyLayout = REQUEST_SPEC) -> tuple[int, FlavorText]:
    """Parse the whole text, check it, and find its flavor object in the text.

    Returns the flavor object's offset and its FlavorText, or raises SpecShapeError: with
    the reason the text is unreadable, or, for a readable text, why it cannot be rewritten.
    """
    at, flavor_text, _ = _locate(spec_text, layout)
    return at, flavor_text


def _locate(spec_text: str, layout: CopyLayout) -> tuple[int, FlavorText, EmbeddedFlavor]:
    flavor = read_embedded_flavor(spec_text, layout)
    at = find_flavor_start(spec_text, layout)
    if at < 0 or not spec_text.isascii():
        raise SpecShapeError(
            f"{layout.what} is not in Nova's serialization format (json.dumps defaults); refusing to rewrite it"
        )
    return at, flavor_text_at(spec_text, at, expected=flavor, layout=layout), flavor


def flavor_text_at(
    spec_text: str, at: int, *, expected: EmbeddedFlavor | None = None, layout: CopyLayout = REQUEST_SPEC
) -> FlavorText:
    """Read the flavor object that starts at offset ``at`` and find its extra_specs value.

    With ``expected`` (the flavor the whole-document parse found), the two must agree.
    """
    try:
        value, end = _decoder.raw_decode(spec_text, at)
    except ValueError as exc:
        raise SpecShapeError(f"{layout.what} is not valid JSON: {exc}") from None
    flavor = _checked_flavor(value, layout)
    if expected is not None and flavor != expected:
        raise SpecShapeError(f"cannot locate the {layout.what}'s flavor in its text")
    text = spec_text[at:end]
    key_at = text.find(EXTRA_SPECS_KEY)
    if key_at < 0 or text.find(EXTRA_SPECS_KEY, key_at + 1) >= 0:
        raise SpecShapeError(
            f"{layout.what} is not in Nova's serialization format: cannot locate extra_specs in its flavor"
        )
    start = key_at + len(EXTRA_SPECS_KEY)
    # The value there must be the flavor's extra_specs, exactly as json.dumps writes them: a
    # complete JSON object, so that this is the value, not the start of a longer one.
    written = json.dumps(flavor.extra_specs)
    if not text.startswith(written, start):
        raise SpecShapeError("extra_specs is not stored where and how Nova writes it; refusing to rewrite it")
    return FlavorText(text, start, start + len(written))


def flavor_head_at(
    spec_text: str, at: int, expected: EmbeddedFlavor, identities: dict[str, tuple[int, str, str] | None],
    layout: CopyLayout = REQUEST_SPEC,
) -> FlavorText | None:
    """The head of the flavor object at offset ``at``: its text up to the end of its extra_specs
    value, when that text alone says the copy's id, flavorid, name and extra specs, and they are
    ``expected``'s (the whole-document parse's). Else None: read the whole object instead
    (``flavor_text_at``).

    Cheaper than ``flavor_text_at``: the text before extra_specs is the same in every copy of a
    flavor, so what it says is read once per such text and kept in ``identities``. Only a plan
    recognises copies by their heads; a rewrite always reads the whole text (``_locate``).
    """
    key_at = spec_text.find(EXTRA_SPECS_KEY, at)
    if key_at < 0:
        return None
    before = spec_text[at:key_at]
    if before in identities:
        identity = identities[before]
    else:
        identity = _head_identity(before, layout)
        if len(identities) < MAX_KNOWN_HEADS:
            identities[before] = identity
    if identity != (expected.id, expected.flavorid, expected.name):
        return None  # not readable alone, or a key after extra_specs overrides it
    start = key_at + len(EXTRA_SPECS_KEY)
    written = json.dumps(expected.extra_specs)
    if not spec_text.startswith(written, start):
        return None
    end = start + len(written)
    return FlavorText(spec_text[at:end], start - at, end - at)


# At most this many texts before extra_specs are kept in ``flavor_head_at``'s ``identities`` (about one
# per flavor): past it, each new one is parsed again.
MAX_KNOWN_HEADS = 10_000


def _head_identity(before: str, layout: CopyLayout) -> tuple[int, str, str] | None:
    """``(id, flavorid, name)`` of a flavor object whose text up to its extra_specs key is
    ``before``, when that text is the start of a Flavor object whose ``nova_object.data`` ends
    there: closing it parses, and the closed object's last key is that extra_specs."""
    try:
        value = _parse(before + EXTRA_SPECS_KEY + "{}}}", layout)
        flavor = _checked_flavor(value, layout)
    except SpecShapeError:
        return None
    data = value["nova_object.data"]
    if list(value)[-1] != "nova_object.data" or list(data)[-1] != "extra_specs":
        return None
    return flavor.id, flavor.flavorid, flavor.name


def rewrite_extra_specs(
    spec_text: str,
    extra_specs: Mapping[str, str] | None = None,
    *,
    new_specs_json: str | None = None,
    layout: CopyLayout = REQUEST_SPEC,
    planned_from: tuple[int, str, Mapping[str, str]] | None = None,
) -> str:
    """Return ``spec_text`` with the flavor's extra_specs replaced, ordered by key.

    Every byte outside the extra_specs value is the original text's. Give the new value as
    ``extra_specs``, or already serialised by ``dumps_extra_specs`` as ``new_specs_json``.
    ``planned_from``: the copy the new value was planned for, as its flavor id, flavorid and
    extra specs: a text whose copy, parsed in full, is another is refused.
    """
    if new_specs_json is None:
        new_specs_json = dumps_extra_specs(extra_specs or {})
    at, flavor_text, flavor = _locate(spec_text, layout)
    if planned_from is not None and (flavor.id, flavor.flavorid, flavor.extra_specs) != planned_from:
        raise SpecShapeError(
            f"its flavor copy (id {flavor.id}, flavorid {flavor.flavorid}) is not the one planned "
            f"(id {planned_from[0]}, flavorid {planned_from[1]}, the same extra specs); refusing to rewrite it"
        )
    return flavor_text.splice(spec_text, at, new_specs_json)


def instance_flavor_in_flux(flavor_text: str) -> bool:
    """True when an instance's flavor column has ``old`` or ``new`` set: a resize or migration is under way.

    Nova ends the text with ``"old": null, "new": null}`` when neither is set; any other text
    is parsed (and raises SpecShapeError if it is not an instance flavor).
    """
    if flavor_text.endswith(', "old": null, "new": null}') and flavor_text.startswith(INSTANCE_FLAVOR.prefix):
        return False
    document = _parse(flavor_text, INSTANCE_FLAVOR)
    INSTANCE_FLAVOR.flavor_of(document)  # checks the shape
    return document["old"] is not None or document["new"] is not None


def _parse(spec_text: str, layout: CopyLayout) -> Any:
    try:
        return orjson.loads(spec_text)
    except (TypeError, orjson.JSONDecodeError):
        # orjson refuses a few things json accepts (NaN, huge integers): ask json too.
        try:
            return json.loads(spec_text)
        except (TypeError, ValueError) as exc:
            raise SpecShapeError(f"{layout.what} is not valid JSON: {exc}") from None


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


def _checked_flavor(value: Any, layout: CopyLayout) -> EmbeddedFlavor:
    """Return a checked copy of a flavor primitive found in a text of ``layout``."""
    flavor = _check_object(value, "Flavor", f"{layout.what}'s flavor")
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
    return EmbeddedFlavor(
        id=flavor_id,
        flavorid=flavorid,
        name=name if isinstance(name, str) else "",
        extra_specs=dict(extra_specs),
    )
