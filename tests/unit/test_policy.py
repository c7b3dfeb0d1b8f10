"""Risk classes of flavor extra-spec keys (nova_flavor_sync.policy)."""

from __future__ import annotations

import pytest

from nova_flavor_sync.policy import (
    RISK_DESCRIPTIONS,
    RULES,
    RiskClass,
    classify_key,
    is_risky,
    reason_for,
    rule_for,
)

S, G, P = RiskClass.SCHEDULING, RiskClass.GUEST, RiskClass.PLACEMENT
FALLBACK_REASON = RULES[-1].reason

# (id, key, expected class). One case per rule of RULES at least (checked below), plus
# the edges that tell neighbouring rules apart.
CASES = [
    # placement request syntax
    ("resources-unsuffixed", "resources:VCPU", P),
    ("resources-numbered", "resources1:VCPU", P),
    ("resources-named-suffix", "resources_foo:VCPU", P),
    ("resources-custom-class", "resources2:CUSTOM_GPU", P),
    ("trait-unnumbered-is-scheduling", "trait:HW_CPU_X86_AVX2", S),
    ("trait-unnumbered-custom", "trait:CUSTOM_FAST", S),
    ("trait-numbered", "trait1:HW_CPU_X86_AVX2", P),
    ("trait-named-suffix", "trait_g:CUSTOM_FAST", P),
    # Nova's suffix pattern also reads "traits:X" as group "s" (scheduler/utils.py).
    ("traits-plural-is-group-s", "traits:HW_CPU_X86_AVX2", P),
    ("trait-empty-name-unknown", "trait:", P),
    ("group-policy-despite-no-namespace", "group_policy", P),
    # host filters
    ("aggregate-instance-extra-specs", "aggregate_instance_extra_specs:ssd", S),
    ("capabilities", "capabilities:cpu_info:arch", S),
    ("no-namespace", "ssd", S),
    ("no-namespace-deprecated-hide-hypervisor-id", "hide_hypervisor_id", S),
    # devices and accelerators
    ("pci-passthrough-alias", "pci_passthrough:alias", P),
    ("pci-passthrough-unknown-key", "pci_passthrough:other", P),
    ("accel-device-profile", "accel:device_profile", P),
    # hw: topology and resources
    ("hw-cpu-policy", "hw:cpu_policy", P),
    ("hw-cpu-thread-policy", "hw:cpu_thread_policy", P),
    ("hw-cpu-sockets", "hw:cpu_sockets", P),
    ("hw-cpu-max-sockets", "hw:cpu_max_sockets", P),
    ("hw-cpu-realtime", "hw:cpu_realtime", P),
    ("hw-cpu-realtime-mask", "hw:cpu_realtime_mask", P),
    ("hw-cpu-dedicated-mask", "hw:cpu_dedicated_mask", P),
    ("hw-emulator-threads-policy", "hw:emulator_threads_policy", P),
    ("hw-numa-nodes", "hw:numa_nodes", P),
    ("hw-numa-cpus-per-node", "hw:numa_cpus.0", P),
    ("hw-numa-mem-per-node", "hw:numa_mem.1", P),
    ("hw-mem-page-size", "hw:mem_page_size", P),
    ("hw-locked-memory", "hw:locked_memory", P),
    ("hw-mem-encryption", "hw:mem_encryption", P),
    ("hw-mem-encryption-model", "hw:mem_encryption_model", P),
    ("hw-pmem", "hw:pmem", P),
    ("hw-pci-numa-affinity-policy", "hw:pci_numa_affinity_policy", P),
    # hw:/os: keys Nova turns into traits itself
    ("hw-tpm-model", "hw:tpm_model", P),
    ("hw-tpm-version", "hw:tpm_version", P),
    ("hw-tpm-secret-security", "hw:tpm_secret_security", P),
    ("hw-ephemeral-encryption", "hw:ephemeral_encryption", P),
    ("hw-ephemeral-encryption-format", "hw:ephemeral_encryption_format", P),
    ("hw-virtio-packed-ring", "hw:virtio_packed_ring", P),
    ("hw-sound-model", "hw:sound_model", P),
    ("hw-maxphysaddr-mode", "hw:maxphysaddr_mode", P),
    ("hw-maxphysaddr-bits", "hw:maxphysaddr_bits", P),
    ("os-secure-boot", "os:secure_boot", P),
    # guest only
    ("hw-watchdog-action", "hw:watchdog_action", G),
    ("hw-boot-menu", "hw:boot_menu", G),
    ("hw-hide-hypervisor-id", "hw:hide_hypervisor_id", G),
    ("hw-vif-multiqueue", "hw:vif_multiqueue_enabled", G),
    ("hw-pmu", "hw:pmu", G),
    ("hw-serial-port-count", "hw:serial_port_count", G),
    ("hw-viommu-model", "hw:viommu_model", G),
    ("hw-usb-model", "hw:usb_model", G),
    ("hw-redirected-usb-ports", "hw:redirected_usb_ports", G),
    ("quota-cpu-shares", "quota:cpu_shares", G),
    ("quota-disk-io", "quota:disk_read_bytes_sec", G),
    ("hw-rng-allowed", "hw_rng:allowed", G),
    ("hw-rng-rate-bytes", "hw_rng:rate_bytes", G),
    ("hw-video-ram-max", "hw_video:ram_max_mb", G),
    ("vmware-hw-version", "vmware:hw_version", G),
    # unknown keys are held back
    ("unknown-namespace", "foo:bar", P),
    ("unknown-hw-key", "hw:vpmem", P),
    ("unknown-os-key", "os:distro", P),
    ("empty-key", "", P),
    ("empty-namespace", ":bar", P),
    # exact namespaces: no prefix or suffix tolerance
    ("hw-underscore-namespace-is-not-hw", "hw_cpu:policy", P),
    ("prefixed-namespace", "xhw:watchdog_action", P),
    ("suffixed-guest-key", "hw:watchdog_action_x", P),
    ("capabilities-lookalike", "capabilities_x:foo", P),
    ("trailing-newline", "hw:watchdog_action\n", P),
    ("newline-in-trait", "trait:X\nY", P),
    # case-sensitive, as in Nova
    ("case-HW-namespace", "HW:watchdog_action", P),
    ("case-hw-key", "hw:WATCHDOG_ACTION", P),
    ("case-Trait", "Trait:HW_CPU_X86_AVX2", P),
    ("case-Quota", "Quota:cpu_shares", P),
    ("case-Capabilities", "Capabilities:cpu_info:arch", P),
]


@pytest.mark.parametrize(("key", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_classify_key(key: str, expected: RiskClass) -> None:
    assert classify_key(key) is expected


@pytest.mark.parametrize(("key", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_is_risky_means_placement(key: str, expected: RiskClass) -> None:
    assert is_risky(key) is (expected is P)


def test_every_rule_has_a_case() -> None:
    # A rule no case reaches is either shadowed by an earlier rule or untested.
    used = {id(rule_for(key)) for _, key, _ in CASES}
    unused = [rule.pattern for rule in RULES if id(rule) not in used]
    assert unused == []


def test_last_rule_is_the_placement_catch_all() -> None:
    assert RULES[-1].risk is P
    assert RULES[-1].regex.fullmatch("anything:at all\nreally")


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ("hw:cpu_policy", "CPU"),
        ("resources1:VCPU", "resource"),
        ("trait1:CUSTOM_FAST", "granular"),
        ("trait:CUSTOM_FAST", "unnumbered"),
        ("hw:watchdog_action", "watchdog"),
        ("group_policy", "group"),
        ("foo:bar", "unknown"),
    ],
    ids=[
        "cpu-policy",
        "numbered-resources",
        "numbered-trait",
        "unnumbered-trait",
        "watchdog",
        "group-policy",
        "unknown",
    ],
)
def test_reason_for_names_the_rule(key: str, fragment: str) -> None:
    assert fragment in reason_for(key)


@pytest.mark.parametrize(
    ("key", "is_fallback"),
    [
        ("hw:cpu_policy", False),
        ("pci_passthrough:alias", False),
        # Nova's group suffix is any 1-64 of [a-zA-Z0-9_-], not only digits: these are
        # placement request groups, not unknown keys (same class, different reason).
        ("resources_foo:VCPU", False),
        ("resources-x:VCPU", False),
        ("trait_g:CUSTOM_FAST", False),
        ("trait" + "g" * 64 + ":CUSTOM_FAST", False),
        # Longer suffixes are not request-group syntax for Nova: unknown.
        ("trait" + "g" * 65 + ":CUSTOM_FAST", True),
        ("foo:bar", True),
    ],
    ids=[
        "known-hw",
        "known-pci",
        "resources-named-suffix",
        "resources-dash-suffix",
        "trait-named-suffix",
        "trait-64-char-suffix",
        "trait-65-char-suffix",
        "unknown",
    ],
)
def test_reason_for_tells_known_from_unknown(key: str, is_fallback: bool) -> None:
    assert (reason_for(key) == FALLBACK_REASON) is is_fallback


def test_every_class_has_a_description() -> None:
    assert set(RISK_DESCRIPTIONS) == set(RiskClass)
    assert all(text.strip() for text in RISK_DESCRIPTIONS.values())


@pytest.mark.parametrize(
    ("member", "value"),
    [(S, "scheduling"), (G, "guest"), (P, "placement")],
    ids=["scheduling", "guest", "placement"],
)
def test_class_values_are_stable(member: RiskClass, value: str) -> None:
    # Reports print and compare these strings.
    assert member == value
    assert RiskClass(value) is member


def test_non_string_key_is_rejected() -> None:
    with pytest.raises(TypeError):
        classify_key(None)  # type: ignore[arg-type]
