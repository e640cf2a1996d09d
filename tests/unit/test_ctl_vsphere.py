"""vmfencectl status with vSphere entries: the way each VM's fence goes now, and warnings."""

from __future__ import annotations

from tests.fakedaemon import host, status_result, vm
from vmfenced.clients.ctl import render_status


def _status() -> dict[str, object]:
    result = status_result(
        host("esx1", path="ssh:esx1", vsphere="vc1/esx1"),
        host("vc1/esx2", kind="vsphere", path="api:vc1", warnings=["TLS not verified\x1b[2J"]),
        host("kvm1", kind="libvirt"),
    )
    result["vms"] = [
        vm("gfs-node1", "node1", "esx1"),
        vm("gfs-node2", "node2", "vc1/esx2"),
        vm("app", None, "kvm1"),
        {**vm("gone", None, "esx1", "off"), "host": None},
    ]
    return result


def test_each_vm_shows_the_path_its_fence_takes() -> None:
    text = render_status(_status(), 2.0)
    rows = {line.split()[0]: line.split()[-1] for line in text.split("\n") if line}
    assert "FENCE PATH" in text
    assert rows["gfs-node1"] == "ssh:esx1"
    assert rows["gfs-node2"] == "api:vc1"
    assert rows["app"] == "ssh:kvm1"
    assert rows["gone"] == "-"


def test_session_warnings_are_printed_without_control_characters() -> None:
    text = render_status(_status(), 2.0)
    assert "warning: vc1/esx2: TLS not verified\\x1b[2J\n" in text


def test_no_path_column_without_a_vsphere_entry() -> None:
    assert "FENCE PATH" not in render_status(status_result(), 2.0)


def test_a_vsphere_entry_has_no_ssh_mode() -> None:
    """An API entry reports no mode: its MODE is `api`, never a `shell` it does not have."""
    rows = [line.split() for line in render_status(_status(), 2.0).split("\n")]
    modes = {row[0]: row[2] for row in rows if len(row) > 2}
    assert modes["vc1/esx2"] == "api" and modes["esx1"] == "shell"
