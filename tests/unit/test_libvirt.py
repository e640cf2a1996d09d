"""libvirt backend: parsers on real virsh output (and names libvirt accepts), config, session
setup. Its shell scripts, run for real, are tested in tests/integration/test_libvirt_scripts.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vmfenced.backends import libvirt as lv
from vmfenced.backends.registry import BACKENDS
from vmfenced.config import parse
from vmfenced.errors import ConfigError, ParseError
from vmfenced.model import RegisteredVM, RunningVM

# Captured from virsh 9.0.0 (Debian 12) on the lab's hosts; virsh ends every list with a blank line.
LIST_UUID_NAME = """6bf895bf-be0c-43bb-9295-271e4ce43641 vm1
a86d216a-39c5-4332-9517-2840f39d6cc9 vm1,x
0bfd32b1-ad6f-49b7-b9fa-f1f0c84c9603 vm10
8b7a2b92-86b5-44f6-9682-0373efa79d67 my vm 2

"""
LIST_NAME = "vm1\nvm1,x\nvm10\nmy vm 2\n\n"
UUID1 = "6bf895bf-be0c-43bb-9295-271e4ce43641"


def qemu_argv(name_arg: str, uuid: str = UUID1) -> list[str]:
    """The argv of a qemu 7.2 started by libvirt 9.0 (captured), run by a sleeping Python."""
    return [
        *(sys.executable, "-c", "import time; time.sleep(600)"),
        *("-name", name_arg, "-S", "-object"),
        '{"qom-type":"secret","id":"masterKey0","format":"raw",'
        '"file":"/var/lib/libvirt/qemu/domain-1-vm1/master-key.aes"}',
        *("-machine", "microvm,usb=off,dump-guest-core=off,memory-backend=microvm.ram"),
        *("-accel", "kvm", "-cpu", "qemu64", "-m", "32", "-smp", "1,sockets=1,cores=1,threads=1"),
        *("-uuid", uuid, "-display", "none", "-no-user-config", "-nodefaults"),
    ]


def guest(name: str) -> str:
    return f"guest={name.replace(',', ',,')},debug-threads=on"


# ------------------------------------------------------------------------------ parsers


def test_registered_uuid_and_name_on_real_output() -> None:
    vms = lv.parse_registered("vmf:uuid-name\n" + LIST_UUID_NAME)
    assert [(v.name, v.vmid) for v in vms] == [
        ("vm1", UUID1),
        ("vm1,x", "a86d216a-39c5-4332-9517-2840f39d6cc9"),
        ("vm10", "0bfd32b1-ad6f-49b7-b9fa-f1f0c84c9603"),
        ("my vm 2", "8b7a2b92-86b5-44f6-9682-0373efa79d67"),
    ]


def test_registered_names_only_from_an_older_virsh() -> None:
    vms = lv.parse_registered("vmf:name\n" + LIST_NAME)
    assert [(v.name, v.vmid) for v in vms] == [(n, n) for n in ("vm1", "vm1,x", "vm10", "my vm 2")]


@pytest.mark.parametrize(
    "text",
    [
        LIST_UUID_NAME,  # no marker: not our command's answer
        "vmf:uuid-name\n6bf895bf-be0c-43bb-9295-271e4ce43641\n",  # a UUID without its name
        "vmf:uuid-name\nerror: failed to connect to the hypervisor\n",
        "",
    ],
)
def test_registered_rejects_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ParseError):
        lv.parse_registered(text)


def test_vm_lines() -> None:
    text = f"vmf:vm 84 {UUID1} vm1\nvmf:vm 95 - my vm, 2\nvmf:end\n"
    assert lv.parse_vm_lines(text) == (
        RunningVM("vm1", "/run/libvirt/qemu/vm1.pid", 84, uuid=UUID1),
        RunningVM("my vm, 2", "/run/libvirt/qemu/my vm, 2.pid", 95),
    )
    assert lv.parse_vm_lines("vmf:end\n") == ()


@pytest.mark.parametrize(
    "text",
    [
        "vmf:vm 84 - vm1\n",  # cut short: no end marker, a VM could be missing
        "",
        "vmf:doubt bad pid file /run/libvirt/qemu/vm1.pid\n",
        "vmf:vm 84 - vm1\nvmf:vm 85 - vm1\nvmf:end\n",
        "vmf:end\nvmf:vm 84 - vm1\n",
        "vmf:vm x - vm1\nvmf:end\n",
        "awk: not found\nvmf:end\n",
    ],
)
def test_vm_lines_reject_anything_doubtful(text: str) -> None:
    with pytest.raises(ParseError):
        lv.parse_vm_lines(text)


def test_backend_is_registered_and_power_on_uses_the_uuid() -> None:
    assert BACKENDS["libvirt"] is lv.BACKEND
    command = lv.power_on_command(RegisteredVM(UUID1, "vm1", ""))
    assert command.endswith(f"\nvmf_on {UUID1} vm1")
    assert 'virsh start --domain "$vmf_d"' in command


# Names libvirt writes escaped in its pid file names (libvirt 9.0, seen on the lab).
ODD_NAMES = {
    "a&b'c\"d<e>f": "a&amp;b&apos;c&quot;d&lt;e&gt;f",
    "x&y": "x&amp;y",
    "q'r": "q&apos;r",
    'd"q': "d&quot;q",
    "l<t": "l&lt;t",
    "g>t": "g&gt;t",
    "x&amp;y": "x&amp;amp;y",  # a name that looks escaped is escaped again
    "my vm, 2": "my vm, 2",
}


def test_pid_file_is_the_escaped_name() -> None:
    for name, file in ODD_NAMES.items():
        assert lv.pid_file(name) == f"/run/libvirt/qemu/{file}.pid"


@pytest.mark.parametrize("bad", ["\r", "\t", "\x85", "\u2028", "\u2029", "\x0b", "\x1e"])
def test_parsers_split_on_newline_only_and_refuse_untrusted_names(bad: str) -> None:
    """libvirt accepts tab, CR, U+0085, U+2028 in a name (seen on the lab): the host's answer
    is a listing failure naming the character, never a name cut into two records."""
    name = f"vm1{bad}vmf:vm 5 - vm2"
    with pytest.raises(ParseError, match="control or line-separator"):
        lv.parse_vm_lines(f"vmf:vm 84 - {name}\nvmf:end\n")
    with pytest.raises(ParseError, match="control or line-separator"):
        lv.parse_registered(f"vmf:uuid-name\n{UUID1} {name}\n\n")
    with pytest.raises(ParseError, match="control or line-separator"):
        lv.parse_registered(f"vmf:name\n{name}\n\n")


def test_parsers_keep_odd_names_whole() -> None:
    text = "".join(f"vmf:vm {84 + i} - {n}\n" for i, n in enumerate(ODD_NAMES)) + "vmf:end\n"
    assert [vm.name for vm in lv.parse_vm_lines(text)] == list(ODD_NAMES)
    lines = "".join(f"{UUID1[:-2]}{i:02d} {n}\n" for i, n in enumerate(ODD_NAMES))
    assert [vm.name for vm in lv.parse_registered(f"vmf:uuid-name\n{lines}\n")] == list(ODD_NAMES)


# ------------------------------------------------------------------------------- config


def test_config_libvirt_host_and_uri() -> None:
    data = {
        "hosts": [
            {"name": "kvm1", "address": "192.0.2.21", "kind": "libvirt"},
            {
                "name": "kvm2",
                "address": "192.0.2.22",
                "kind": "libvirt",
                "libvirt_uri": "qemu+unix:///system",
            },
            {"name": "esx1", "address": "192.0.2.11"},
        ]
    }
    kvm1, kvm2, esx1 = parse(data).hosts
    assert (kvm1.kind, kvm1.libvirt_uri) == ("libvirt", "qemu:///system")
    assert kvm2.libvirt_uri == "qemu+unix:///system"
    assert esx1.kind == "esxi"


@pytest.mark.parametrize(
    ("host", "message"),
    [
        (
            {"name": "esx1", "address": "a", "libvirt_uri": "qemu:///system"},
            'hosts[0] (esx1): libvirt_uri: only for kind = "libvirt" (this host is esxi)',
        ),
        (
            {"name": "kvm1", "address": "a", "kind": "libvirt", "libvirt_uri": "qemu:///sys tem"},
            "hosts[0] (kvm1).libvirt_uri",
        ),
        ({"name": "kvm1", "address": "a", "kind": "xen"}, "hosts[0] (kvm1).kind"),
    ],
)
def test_config_libvirt_errors(host: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse({"hosts": [host]})
    assert any(p.startswith(message) for p in info.value.problems), info.value.problems


def test_session_setup_exports_the_uri_quoted() -> None:
    host = parse(
        {
            "hosts": [
                {
                    "name": "k",
                    "address": "a",
                    "kind": "libvirt",
                    "libvirt_uri": "qemu:///system?x='1'",
                }
            ]
        }
    ).hosts[0]
    script = lv.session_setup(host) + '; printf "%s|%s" "$LIBVIRT_DEFAULT_URI" "$LC_ALL"'
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout == "qemu:///system?x='1'|C"
