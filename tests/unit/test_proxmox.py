"""Proxmox VE backend: parsers on Proxmox's real formats and hostile input, config keys.
The shell scripts themselves run against temporary trees in test_proxmox_scripts.py."""

from __future__ import annotations

import pytest

from vmfenced.backends import proxmox as pve
from vmfenced.backends import proxmox_cluster as cluster
from vmfenced.backends import proxmox_ha as ha
from vmfenced.backends.registry import BACKENDS
from vmfenced.config import parse
from vmfenced.errors import ConfigError, ParseError
from vmfenced.model import RegisteredVM, RunningVM, VMMap

# pmxcfs's own rendering (reference: pve-cluster status.c cfs_create_vmlist_msg), 2 guests.
VMLIST = """{
"version": 7,
"ids": {
"100": { "node": "pve1", "type": "qemu", "version": 3 },
"101": { "node": "pve2", "type": "lxc", "version": 5 }}

}
"""
# Every character str.splitlines() breaks on besides "\n".
LINE_BREAKS = ("\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")


def framed(vmlist: str, *confs: tuple[str, str, str], end: bool = True) -> str:
    """What the registration script prints: byte lengths, then the values."""
    out = f"vmf:vmlist {len(vmlist.encode())}\n{vmlist}\n"
    for node, vmid, name in confs:
        sizes = " ".join(str(len(x.encode())) for x in (node, vmid, name))
        out += f"vmf:conf {sizes}\n{node}{vmid}{name}\n"
    return out + ("vmf:end\n" if end else "")


# ------------------------------------------------------------------------------ config


def config(*hosts: dict[str, object]) -> dict[str, object]:
    return {"hosts": list(hosts)}


def test_kind_proxmox_and_its_node_name() -> None:
    cfg = parse(
        config(
            {"name": "pve1", "address": "127.0.0.1", "kind": "proxmox"},
            {"name": "hv2", "address": "127.0.0.2", "kind": "proxmox", "pve_node": "pve2"},
            {"name": "kvm1", "address": "127.0.0.3", "kind": "libvirt"},
        )
    )
    assert [h.node for h in cfg.hosts] == ["pve1", "pve2", None]
    assert "proxmox" in BACKENDS and BACKENDS["proxmox"].hold_off_command is not None
    assert "VMF_PVE_NODE=pve2;" in pve.session_setup(cfg.hosts[1])


def test_pve_node_only_for_proxmox_and_once() -> None:
    with pytest.raises(ConfigError, match="pve_node: only for kind"):
        parse(config({"name": "kvm1", "address": "127.0.0.1", "kind": "libvirt", "pve_node": "x"}))
    with pytest.raises(ConfigError, match="both Proxmox node 'pve1'"):
        parse(
            config(
                {"name": "pve1", "address": "127.0.0.1", "kind": "proxmox"},
                {"name": "other", "address": "127.0.0.2", "kind": "proxmox", "pve_node": "pve1"},
            )
        )
    with pytest.raises(ConfigError, match="pve_node"):
        parse(config({"name": "a", "address": "127.0.0.1", "kind": "proxmox", "pve_node": "a/b"}))


# ------------------------------------------------------------------------------ running VMs


def test_listing_lines() -> None:
    vms = pve.parse_vm_lines(
        "vmf:vm 4242 100 pve1 webmail\nvmf:vm 77 8006 pve1 vm8006\n"
        "vmf:vm 90 101 pve2 a 'quoted' \"name\" vmf:end\nvmf:end\n"
    )
    assert vms == (
        RunningVM("webmail", "/etc/pve/nodes/pve1/qemu-server/100.conf", 4242, vmid="100"),
        RunningVM("vm8006", "/etc/pve/nodes/pve1/qemu-server/8006.conf", 77, vmid="8006"),
        RunningVM(
            "a 'quoted' \"name\" vmf:end",
            "/etc/pve/nodes/pve2/qemu-server/101.conf",
            90,
            vmid="101",
        ),
    )


def test_a_vm_without_a_config_node_is_not_a_listing_line() -> None:
    """A VM listed under its VMID only would be unseen by a request naming it."""
    with pytest.raises(ParseError):
        pve.parse_vm_lines("vmf:vm 77 8006 - 8006\nvmf:end\n")


@pytest.mark.parametrize("brk", LINE_BREAKS, ids=lambda c: f"U+{ord(c):04X}")
def test_a_name_holding_a_line_break_fails_the_listing(brk: str) -> None:
    """A break plus text shaped like a record would be a second VM to splitlines()."""
    text = f"vmf:vm 5 100 pve1 web{brk}vmf:vm 6 101 pve1 db\nvmf:end\n"
    with pytest.raises(ParseError, match="control or line-separator"):
        pve.parse_vm_lines(text)


@pytest.mark.parametrize(
    "text",
    [
        "vmf:vm 5 100 pve1 web\n",  # cut short
        "vmf:vm 5 100 pve1 web\nvmf:vm 6 100 pve2 web\nvmf:end\n",  # one VMID twice
        "vmf:vm 5 0100 pve1 web\nvmf:end\n",  # not a VMID
        "vmf:vm 5 100 pve/1 web\nvmf:end\n",  # not a node
        "vmf:vm 5 100 pve1 \nvmf:end\n",  # no name
        "vmf:doubt pid file of VMID 100 holds 5, which is not its kvm: /bin/sh\n",
        "vmf:end\nvmf:vm 5 100 pve1 web\n",  # after the end
    ],
)
def test_listing_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ParseError):
        pve.parse_vm_lines(text)


def test_map_finds_a_vm_by_name_or_vmid() -> None:
    vmmap = VMMap()
    vm = RunningVM("web", "/etc/pve/nodes/pve1/qemu-server/100.conf", 5, vmid="100")
    from vmfenced.model import HostInventory

    reg = RegisteredVM("101", "db", "/etc/pve/nodes/pve2/qemu-server/101.conf", owner="pve2")
    vmmap.update("pve1", HostInventory((vm,), (reg,), 0.0))
    assert [loc.vm for loc in vmmap.where_running("100")] == [vm]
    assert [loc.vm for loc in vmmap.where_running("web")] == [vm]
    assert vmmap.where_registered("101") == [("pve1", reg)]
    assert vmmap.is_known("db") and vmmap.is_known("101") and not vmmap.is_known("102")
    vmmap.drop_running("pve1", "100")
    assert vmmap.where_running("web") == [] and not vmmap.is_known("100")
    # The other kinds' handles (a libvirt UUID) are no request names.
    assert not RegisteredVM("uuid-1", "vm1", "").answers_to("uuid-1")


# ------------------------------------------------------------------------------ registrations


def test_registrations_of_the_whole_cluster() -> None:
    text = framed(VMLIST, ("pve1", "100", "webmail"), ("pve2", "101", "ignored-ct"))
    # Only qemu entries count, and only they need a VM config: the CT is not read at all.
    with pytest.raises(ParseError, match="VMID 101: only a config"):
        cluster.parse_registered(text)
    vms = cluster.parse_registered(framed(VMLIST, ("pve1", "100", "webmail")))
    assert vms == (
        RegisteredVM("100", "webmail", "/etc/pve/nodes/pve1/qemu-server/100.conf", owner="pve1"),
    )


def test_an_empty_cluster_has_no_ids() -> None:
    assert cluster.parse_registered(framed('{\n"version": 1}\n')) == ()


def test_a_frame_carries_any_text_as_a_value() -> None:
    """A name shaped like frames and records stays one name: lengths, not lines, frame it."""
    name = "x vmf:conf 4 3 1 vmf:end"
    vms = cluster.parse_registered(framed(VMLIST, ("pve1", "100", name)))
    assert [v.name for v in vms] == [name]


@pytest.mark.parametrize("brk", ["\n", *LINE_BREAKS], ids=lambda c: f"U+{ord(c):04X}")
def test_a_name_holding_a_line_break_fails_the_registrations(brk: str) -> None:
    text = framed(VMLIST, ("pve1", "100", f"web{brk}vmf:end"))
    with pytest.raises(ParseError, match="control or line-separator"):
        cluster.parse_registered(text)


DUP_VMID = '{"version": 7, "ids": {"100": {"node": "pve1", "type": "qemu", "version": 3},\
 "100": {"node": "pve2", "type": "qemu", "version": 4}}}'
DUP_NODE = '{"version": 7, "ids": {"100": {"node": "pve1", "node": "pve2", "type": "qemu",\
 "version": 3}}}'


@pytest.mark.parametrize(
    ("vmlist", "match"),
    [
        (DUP_VMID, "appears twice"),
        (DUP_NODE, "appears twice"),
        ('{"version": 7, "version": 8}', "appears twice"),
        ('{"version": "7"}', "integer version"),
        ('{"version": true}', "integer version"),
        ('{"version": 7, "ids": []}', "ids is not an object"),
        ('{"version": 7, "extra": 1}', "not an object of version and ids"),
        ('{"version": 7, "ids": {"x1": {}}}', "not a VMID"),
        # `$` would accept a trailing line feed.
        ('{"version": 7, "ids": {"12\\n": {"node": "a", "type": "qemu", "version": 1}}}', "VMID"),
        ('{"version": 7, "ids": {"12": {"node": "pve1\\n", "type": "qemu", "version": 1}}}', "no"),
        ('{"version": 7, "ids": {"100": {"node": "pve1", "type": "qemu"}}}', "not node, type"),
        ('{"version": 7, "ids": {"100": {"node": 1, "type": "qemu", "version": 1}}}', "no node"),
        (
            '{"version": 7, "ids": {"100": {"node": "a b", "type": "qemu", "version": 1}}}',
            "no node",
        ),
        ('{"version": 7, "ids": {"100": {"node": "a", "type": "vm", "version": 1}}}', "bad type"),
        ('{"version": 7, "ids": {"100": {"node": "a", "type": "qemu", "version": 1.5}}}', "bad"),
        ('{"version": NaN}', "not JSON"),
        ('{"version": 7', "not JSON"),
        ("[" * 100_000, "not JSON|too deep"),
    ],
)
def test_vmlist_is_parsed_strictly(vmlist: str, match: str) -> None:
    with pytest.raises(ParseError, match=match):
        cluster.parse_vmlist(vmlist)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        # A VMID whose config is on two nodes.
        (framed(VMLIST, ("pve1", "100", "a"), ("pve2", "100", "b")), "config on pve1 and pve2"),
        # .vmlist and the config disagree on the owner (a migration caught half-way).
        (framed(VMLIST, ("pve2", "100", "a")), ".vmlist says pve1"),
        # A config .vmlist does not list.
        (framed(VMLIST, ("pve1", "100", "a"), ("pve1", "102", "c")), "only a config"),
        # A VM in .vmlist without its config.
        (framed(VMLIST), "only in .vmlist"),
        (framed(VMLIST, ("pve1", "100", "a"), end=False), "incomplete"),
        (framed(VMLIST, ("pve1", "100", "a")) + "more\n", "after vmf:end"),
        (framed(VMLIST, ("pve1", "100", "a")).replace("vmf:conf 4 3 1", "vmf:conf 4 3 2"), "frame"),
        (framed(VMLIST, ("pve1", "100", "a")).replace("vmf:conf 4 3 1", "vmf:conf 4 3 0"), "frame"),
        (framed(VMLIST, ("pve1", "100", "we\ufffdb")), "not UTF-8"),
        (framed(VMLIST, ("pve1", "100", "a")).replace("vmf:vmlist", "vmf:vmlst"), "unexpected"),
        ("vmf:doubt no /etc/pve/nodes: /etc/pve not mounted\n", "unexpected"),
        ("", "incomplete"),
        (framed(VMLIST, ("pve.1/x", "100", "a")), "not understood"),
        (framed(VMLIST, ("pve1\n", "100", "a")), "not understood"),
        (framed(VMLIST, ("pve1", "100\n", "a")), "not understood"),
    ],
)
def test_registrations_refuse_what_they_cannot_read(text: str, match: str) -> None:
    with pytest.raises(ParseError, match=match):
        cluster.parse_registered(text)


# ------------------------------------------------------------------------------ commands


def test_kill_command_guards_on_the_vmid() -> None:
    vm = RunningVM("web", "", 4242, vmid="100")
    command = pve.kill_command(vm, 2.0)
    assert command.endswith("\nvmf_pk 100 4242 400")
    assert 'vmf_pve_vm(ENVIRON["VMF_VMID"], RUN)' in command
    assert 'RUN = "/var/run/qemu-server"' in command
    with pytest.raises(ParseError, match="no VMID"):
        pve.kill_command(RunningVM("web", "", 4242), 2.0)


def test_a_trailing_line_feed_is_no_vmid_node_or_path() -> None:
    assert not cluster.VMID_RE.fullmatch("12\n") and not cluster.NODE_RE.fullmatch("pve1\n")
    with pytest.raises(ParseError, match="no VMID"):
        pve.kill_command(RunningVM("web", "", 4242, vmid="12\n"), 2.0)
    with pytest.raises(ParseError, match="not a VMID"):
        ha.hold_off_command("12\n")
    with pytest.raises(ParseError, match="not a VMID"):
        ha.power_on_command(RegisteredVM("12\n", "web", ""))
    with pytest.raises(ValueError, match="not a plain absolute path"):
        cluster.awk("", "/var/run/qemu-server\n", "/etc/pve")


def test_hold_off_command_is_a_hard_stop_through_the_crm() -> None:
    command = ha.hold_off_command("100")
    assert 'ha-manager crm-command stop "vm:$VMF_VMID" 0' in command
    assert "timeout -k 1 8 " in command and command.endswith("\nvmf_hold 100")
    with pytest.raises(ParseError):
        ha.hold_off_command("100; reboot")


@pytest.mark.parametrize(
    ("text", "outcome", "detail"),
    [
        ("vmf:ha not-managed\n", "not-managed", ""),
        ("vmf:ha stop-accepted \n", "stop-accepted", ""),
        ("vmf:ha stop-refused exit 255: cluster not ready - no quorum?\n", "stop-refused", ""),
        ("vmf:ha unknown cannot read the HA resources: x\n", "unknown", ""),
    ],
)
def test_parse_hold_off(text: str, outcome: str, detail: str) -> None:
    hold = ha.parse_hold_off(text)
    assert hold.outcome == outcome
    if outcome == "stop-refused":
        assert "no quorum" in hold.detail


@pytest.mark.parametrize(
    "text", ["", "vmf:ha started\n", "vmf:ha stop-accepted\u2028vmf:ha x", "vmf:ha not-managed\nx"]
)
def test_parse_hold_off_refuses_anything_else(text: str) -> None:
    with pytest.raises(ParseError):
        ha.parse_hold_off(text)


def test_power_on_checks_the_config_then_starts_by_vmid() -> None:
    reg = RegisteredVM("100", "it's web", "/etc/pve/nodes/pve1/qemu-server/100.conf", owner="pve1")
    command = ha.power_on_command(reg)
    assert command.endswith("\nvmf_on 100 'it'\"'\"'s web'")
    assert 'qm start "$VMF_VMID"' in command
    assert 'ha-manager set "vm:$VMF_VMID" --state started' in command
    with pytest.raises(ParseError):
        ha.power_on_command(RegisteredVM("$(reboot)", "x", ""))
