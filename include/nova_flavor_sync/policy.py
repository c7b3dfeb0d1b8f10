"""Risk class of a flavor extra-spec key: may its value be changed in a RequestSpec copy?

The tool rewrites the flavor copy stored in ``nova_api.request_specs``. Nova's scheduler
reads that copy when it places a move (migrate, evacuate, unshelve, ...), while the virt
driver builds the guest from the instance's own flavor. So a key is risky when the
scheduler turns it into something that must match what the instance already holds:

* SCHEDULING - only host filters read it: a new value only changes which hosts qualify.
* GUEST      - only the virt driver reads it to build the guest: nothing the scheduler
               checks or allocates.
* PLACEMENT  - it becomes placement resources, request groups or Nova-derived traits,
               or it shapes the NUMA/CPU/memory/PCI/device topology: a changed value
               would make the next move claim or fit something the instance does not have.

``classify_key`` walks ``RULES`` top to bottom and the first full match wins. A key that
no rule names falls to the last rule and is PLACEMENT: an unknown key (``foo:bar``,
``hw:vpmem``, ``os:whatever``) is held back and never synced silently. Keys are
case-sensitive, as in Nova: ``HW:cpu_policy`` is unknown, hence PLACEMENT.

The known keys are those of Nova's validators (``nova/api/validation/extra_specs/``);
every rule names the file, relative to ``nova/``, that consumes the key and so justifies
its class (checked against openstack/nova master at commit 00a030403f67).
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass, field


class RiskClass(enum.StrEnum):
    """How risky it is to change a key in an existing instance's RequestSpec."""

    SCHEDULING = "scheduling"  # only steers host selection by filters: safe to sync
    GUEST = "guest"  # only changes the guest/hypervisor config on next rebuild/move: safe
    PLACEMENT = "placement"  # allocations, resource requests or topology: risky


RISK_DESCRIPTIONS: dict[RiskClass, str] = {
    RiskClass.SCHEDULING: "only changes which hosts qualify on the next move; safe to sync",
    RiskClass.GUEST: "only changes the guest config on the next rebuild or move; safe to sync",
    RiskClass.PLACEMENT: (
        "changes placement allocations, resource requests or NUMA/CPU/memory/device "
        "topology (or is unknown); held back"
    ),
}


@dataclass(frozen=True)
class Rule:
    """One row of the table: a key matching ``pattern`` (full match) is ``risk``."""

    pattern: str
    risk: RiskClass
    reason: str  # one short phrase, printed by reports for a held-back key
    source: str  # the Nova file that justifies the rule
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", re.compile(self.pattern))


S, G, P = RiskClass.SCHEDULING, RiskClass.GUEST, RiskClass.PLACEMENT

# Nova's request-group suffix: scheduler/utils.py ResourceRequest.XS_KEYPAT accepts any
# 1-64 chars of [a-zA-Z0-9_-] after "resources"/"trait", so "traits:X" is group "s".
_SUFFIX = r"[a-zA-Z0-9_-]{1,64}"
_LIBVIRT = "virt/libvirt/driver.py"
_REQUEST_FILTER = "scheduler/request_filter.py"

# The first full match wins. Order matters only where patterns overlap: group_policy
# must come before the "no namespace" rule, and the catch-all must stay last.
RULES: tuple[Rule, ...] = (
    # --- placement request syntax (scheduler/utils.py ResourceRequest._process_extra_specs)
    Rule(rf"resources({_SUFFIX})?:.+", P, "placement resource amount", "scheduler/utils.py"),
    # Unnumbered trait:X=required|forbidden does become a required/forbidden trait of
    # the unsuffixed placement group (scheduler/utils.py), but the issue asks to treat it
    # as scheduling-only: it allocates nothing, it only narrows which providers qualify.
    Rule(r"trait:.+", S, "unnumbered trait: narrows candidate hosts", "scheduler/utils.py"),
    # A suffixed trait belongs to a granular request group: it decides which provider
    # each group's resources are allocated from, so it is part of the allocation.
    Rule(rf"trait{_SUFFIX}:.+", P, "trait of a granular request group", "scheduler/utils.py"),
    Rule(r"group_policy", P, "policy between granular request groups", "scheduler/utils.py"),
    # --- host filters only (scheduler/filters/)
    Rule(
        r"aggregate_instance_extra_specs:.+",
        S,
        "aggregate metadata match",
        "scheduler/filters/aggregate_instance_extra_specs.py",
    ),
    Rule(
        r"capabilities:.+",
        S,
        "host capability match",
        "scheduler/filters/compute_capabilities_filter.py",
    ),
    # Both filters above also read keys without a namespace (null.py's deprecated
    # hide_hypervisor_id is one; group_policy was matched first).
    Rule(
        r"[^:]+",
        S,
        "no namespace: host capability/aggregate match",
        "scheduler/filters/compute_capabilities_filter.py",
    ),
    # --- devices and accelerators that become placement request groups
    Rule(r"pci_passthrough:alias", P, "PCI device request", "pci/request.py"),
    Rule(r"accel:.+", P, "Cyborg device profile request groups", "accelerator/cyborg.py"),
    # --- hw: keys that shape topology or resources (virt/hardware.py, scheduler/utils.py)
    Rule(r"hw:cpu_.+", P, "CPU pinning/topology", "virt/hardware.py"),
    Rule(r"hw:emulator_threads_policy", P, "extra PCPU for emulator threads", "scheduler/utils.py"),
    Rule(r"hw:numa_.+", P, "guest NUMA topology", "virt/hardware.py"),
    Rule(r"hw:mem_page_size", P, "huge pages: NUMA topology", "virt/hardware.py"),
    # numa_get_constraints only validates it (it needs hw:mem_page_size), but it pins
    # guest memory on the host and belongs with the memory constraints: held back.
    Rule(r"hw:locked_memory", P, "memory locking, tied to page size", "virt/hardware.py"),
    Rule(r"hw:mem_encryption", P, "MEM_ENCRYPTION_CONTEXT resource", "scheduler/utils.py"),
    Rule(r"hw:pmem", P, "PMEM_NAMESPACE_* resources", "scheduler/utils.py"),
    Rule(r"hw:pci_numa_affinity_policy", P, "PCI NUMA affinity", "virt/hardware.py"),
    # Keys Nova turns into required traits itself (ResourceRequest or a request filter)
    # after cross-checking them with the image properties: like hw:tpm_*, which the
    # issue classes risky, a changed value can make the next move fail outright.
    Rule(r"hw:mem_encryption_model", P, "memory encryption trait", "scheduler/utils.py"),
    Rule(r"hw:tpm_.+", P, "vTPM traits", "scheduler/utils.py, scheduler/request_filter.py"),
    Rule(r"hw:ephemeral_encryption.*", P, "ephemeral encryption traits", _REQUEST_FILTER),
    Rule(r"hw:virtio_packed_ring", P, "virtio packed ring trait", _REQUEST_FILTER),
    Rule(r"hw:sound_model", P, "virtio sound trait", _REQUEST_FILTER),
    # hw:maxphysaddr_mode becomes a trait; _bits goes to ComputeCapabilitiesFilter and
    # only means something with mode=emulate, so the pair is held back together.
    Rule(r"hw:maxphysaddr_.+", P, "guest physical address size trait", "scheduler/utils.py"),
    Rule(r"os:secure_boot", P, "UEFI secure boot trait", "scheduler/utils.py"),
    # --- guest-only keys: read by the virt driver alone
    Rule(r"hw:watchdog_action", G, "watchdog device", _LIBVIRT),
    Rule(r"hw:boot_menu", G, "boot menu", _LIBVIRT),
    Rule(r"hw:hide_hypervisor_id", G, "hypervisor id hiding", _LIBVIRT),
    Rule(r"hw:vif_multiqueue_enabled", G, "virtio-net multiqueue", "virt/libvirt/vif.py"),
    Rule(r"hw:pmu", G, "virtual PMU", _LIBVIRT),
    Rule(r"hw:serial_port_count", G, "serial ports", _LIBVIRT),
    # Only the image property hw_viommu_model becomes a trait (request_filter.py).
    Rule(r"hw:viommu_model", G, "vIOMMU model", _LIBVIRT),
    Rule(r"hw:usb_model", G, "USB controller", _LIBVIRT),
    Rule(r"hw:redirected_usb_ports", G, "USB redirection", _LIBVIRT),
    Rule(r"quota:.+", G, "hypervisor CPU/disk/network tuning", "virt/libvirt/designer.py"),
    Rule(r"hw_rng:.+", G, "random number generator device", _LIBVIRT),
    Rule(r"hw_video:.+", G, "video RAM limit", _LIBVIRT),
    Rule(r"vmware:.+", G, "VMware hardware version/storage policy", "virt/vmwareapi/vmops.py"),
    # --- everything else: the safe default. (?s): a key with a newline is unknown too.
    Rule(r"(?s).*", P, "unknown key: held back by default", "none: safe default"),
)

del S, G, P, _SUFFIX, _LIBVIRT, _REQUEST_FILTER


# A cloud has few distinct keys and a plan asks about each of them for every distinct flavor
# copy it judges (thousands where flavors are many): each answer is worked out once.
@functools.lru_cache(maxsize=4096)
def rule_for(key: str) -> Rule:
    """The first rule of ``RULES`` that fully matches ``key`` (the last one always does)."""
    for rule in RULES:
        if rule.regex.fullmatch(key):
            return rule
    raise AssertionError("unreachable: the last rule matches every key")


def classify_key(key: str) -> RiskClass:
    """Risk class of a flavor extra-spec key; unknown keys are PLACEMENT."""
    return rule_for(key).risk


def is_risky(key: str) -> bool:
    """True when changing ``key`` in a RequestSpec copy must be held back."""
    return classify_key(key) is RiskClass.PLACEMENT


def reason_for(key: str) -> str:
    """Short phrase saying which rule classified ``key``, for reports."""
    return rule_for(key).reason
