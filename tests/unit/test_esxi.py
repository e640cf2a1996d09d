"""ESXi parsers on the real output forms of ../shared/reference/esxi-commands.md; hostile names
and the power-on re-check are in test_esxi_hostile.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vmfenced.backends import parse_kill_marker
from vmfenced.backends.esxi import (
    kill_command,
    parse_esxcli_xml,
    parse_getallvms,
    parse_vmdumper,
    vmx_tail,
)
from vmfenced.errors import ParseError
from vmfenced.model import KillOutcome, RunningVM

VMDUMPER = (
    'vmid=68762 pid=-1 cfgFile="/vmfs/volumes/5cce4874-3f0b1d2e-7a51-0025b500001f/RH236_3.1/'
    'RH236_3.1.vmx" uuid="56 4d 70 ad 43 f1 5e 25-8a 12 a0 e2 18 2e 38 ec" '
    'displayName="RH236_3.1" vmxCartelID=68761\n'
    'vmid=22541454 pid=-1 cfgFile="/vmfs/volumes/ds1/gfs node 2/gfs node 2.vmx" '
    'uuid="56 4d 11 22 33 44 55 66-77 88 99 aa bb cc dd ee" '
    'displayName="gfs node 2 — ñandú" vmxCartelID=22541452\n'
)

ESXCLI_XML = """<?xml version="1.0" encoding="utf-8"?>
<output xmlns="http://www.vmware.com/Products/ESX/5.0/esxcli">
<root>
   <list type="structure">
      <structure typeName="VirtualMachine">
         <field name="ConfigFile"><string>/vmfs/volumes/ds1/RH236_3.1/RH236_3.1.vmx</string></field>
         <field name="DisplayName"><string>RH236_3.1</string></field>
         <field name="ProcessID"><integer>0</integer></field>
         <field name="UUID"><string>56 4d 70 ad 43 f1 5e 25-8a 12 a0 e2 18 2e 38 ec</string></field>
         <field name="VMXCartelID"><integer>68761</integer></field>
         <field name="WorldID"><integer>68762</integer></field>
      </structure>
      <structure typeName="VirtualMachine">
         <field name="ConfigFile"><string>/vmfs/volumes/ds1/a b/a b.vmx</string></field>
         <field name="DisplayName"><string>a b ü</string></field>
         <field name="ProcessID"><integer>0</integer></field>
         <field name="UUID"><string>56 4d 00 00 00 00 00 00-00 00 00 00 00 00 00 01</string></field>
         <field name="VMXCartelID"><integer>22541452</integer></field>
         <field name="WorldID"><integer>22541454</integer></field>
      </structure>
   </list>
</root>
</output>
"""

GETALLVMS = """Vmid       Name                          File                          Guest OS       Version   Annotation
1      RH236_3.1             [datastore1] RH236_3.1/RH236_3.1.vmx     rhel4Guest         vmx-07
12     gfs node 2 — ñandú    [ds 2] gfs node 2/gfs node 2.vmx       rhel7_64Guest      vmx-13    first line
of a multi-line annotation
"""


def test_vmdumper_parses_names_with_spaces_and_non_ascii() -> None:
    first, second = parse_vmdumper(VMDUMPER)
    assert first == RunningVM(
        name="RH236_3.1",
        config_file="/vmfs/volumes/5cce4874-3f0b1d2e-7a51-0025b500001f/RH236_3.1/RH236_3.1.vmx",
        cartel=68761,
        world=68762,
        uuid="56 4d 70 ad 43 f1 5e 25-8a 12 a0 e2 18 2e 38 ec",
    )
    assert second.name == "gfs node 2 — ñandú"
    # Parsed, never computed: cartel != world - 1 here.
    assert (second.world, second.cartel) == (22541454, 22541452)


def test_vmdumper_name_with_quotes_stays_whole() -> None:
    line = 'vmid=5 pid=-1 cfgFile="/vmfs/volumes/ds1/q/q.vmx" uuid="" displayName="say "hi"" vmxCartelID=4'
    (vm,) = parse_vmdumper(line)
    assert vm.name == 'say "hi"'
    assert vm.uuid is None


def test_vmdumper_empty_means_no_vm() -> None:
    assert parse_vmdumper("") == ()
    assert parse_vmdumper("\n\n") == ()


@pytest.mark.parametrize(
    "text",
    [
        "vmid=1 pid=-1 cfgFile=broken",
        "Segmentation fault",
        'vmid=x pid=-1 cfgFile="/a.vmx" uuid="" displayName="a" vmxCartelID=1',
    ],
)
def test_vmdumper_unreadable_line_is_an_error_not_a_missing_vm(text: str) -> None:
    with pytest.raises(ParseError):
        parse_vmdumper(VMDUMPER + text)


def test_esxcli_xml() -> None:
    first, second = parse_esxcli_xml(ESXCLI_XML)
    assert (first.name, first.cartel, first.world) == ("RH236_3.1", 68761, 68762)
    assert second == RunningVM(
        name="a b ü",
        config_file="/vmfs/volumes/ds1/a b/a b.vmx",
        cartel=22541452,
        world=22541454,
        uuid="56 4d 00 00 00 00 00 00-00 00 00 00 00 00 00 01",
    )


def test_esxcli_xml_empty_list() -> None:
    empty = (
        '<?xml version="1.0"?><output xmlns="http://www.vmware.com/Products/ESX/5.0/esxcli">'
        '<root><list type="structure"></list></root></output>'
    )
    assert parse_esxcli_xml(empty) == ()


@pytest.mark.parametrize(
    "text",
    [
        "not xml",
        "<html>login</html>",
        ESXCLI_XML.replace('<field name="VMXCartelID"><integer>68761</integer></field>', ""),
        ESXCLI_XML.replace("<integer>68761</integer>", "<integer>x</integer>"),
    ],
)
def test_esxcli_xml_errors(text: str) -> None:
    with pytest.raises(ParseError):
        parse_esxcli_xml(text)


def test_getallvms_anchors_on_the_datastore_bracket() -> None:
    first, second = parse_getallvms(GETALLVMS)
    assert (first.vmid, first.name, first.config_file) == (
        "1",
        "RH236_3.1",
        "[datastore1] RH236_3.1/RH236_3.1.vmx",
    )
    assert (second.vmid, second.name) == ("12", "gfs node 2 — ñandú")
    assert second.config_file == "[ds 2] gfs node 2/gfs node 2.vmx"


def test_getallvms_without_header_is_an_error() -> None:
    with pytest.raises(ParseError):
        parse_getallvms("vim.fault.NotAuthenticated")


def test_vmx_tail_survives_datastore_naming() -> None:
    assert vmx_tail("/vmfs/volumes/5cce4874-3f0b/vm1/vm1.vmx") == "/vm1/vm1.vmx"
    assert vmx_tail("/vmfs/volumes/ds1/vm1/vm1.vmx") == "/vm1/vm1.vmx"
    assert vmx_tail("[ds1] vm1/vm1.vmx") == "/vm1/vm1.vmx"


def test_kill_command_quotes_the_path() -> None:
    vm = RunningVM("x", "/vmfs/volumes/ds1/it's $(rm -rf)/x.vmx", cartel=42)
    command = kill_command(vm, 1.0)
    assert command.endswith("\nvmf_kill '/it'\"'\"'s $(rm -rf)/x.vmx' 42 100")
    assert "VMF_VMX=$1; export VMF_VMX; vmf_c=$2" in command


@pytest.mark.parametrize(
    ("text", "outcome"),
    [
        ("vmf:killed\n", KillOutcome.KILLED),
        ("noise\nvmf:not-that-vm\n", KillOutcome.NOT_THAT_VM),
        ("vmf:not-running", KillOutcome.NOT_RUNNING),
        ("vmf:alive\n", KillOutcome.ALIVE),
    ],
)
def test_kill_markers(text: str, outcome: KillOutcome) -> None:
    assert parse_kill_marker(text) is outcome


@pytest.mark.parametrize("text", ["", "vmf:error\n", "sh: ps: not found\n", "vmf:maybe"])
def test_kill_without_verdict_is_an_error(text: str) -> None:
    with pytest.raises(ParseError):
        parse_kill_marker(text)


# The guard's verdicts before any kill, with a stand-in `ps -c` (cartel 4194000: no kill is
# reached in these cases). A ps that fails part-way never reads as "not running": after a kill,
# "not running" is what confirms the death.
PS_HEADER = "WID        CID        World Name                           Command"
VM_LINE = "4194001    4194000    vmx                                  /bin/vmx -s x /vmfs/volumes/ds1/{}/{}.vmx"


@pytest.mark.parametrize(
    ("listing", "status", "marker"),
    [
        (
            [PS_HEADER, VM_LINE.format("other", "other").replace("4194000", "17")],
            0,
            "vmf:not-running",
        ),
        ([PS_HEADER, VM_LINE.format("other", "other")], 0, "vmf:not-that-vm"),
        ([PS_HEADER, VM_LINE.format("other", "other").replace("4194000", "17")], 1, "vmf:error"),
        ([PS_HEADER], 141, "vmf:error"),
        (["ps: cannot read worlds"], 1, "vmf:error"),
    ],
)
def test_guard_verdict_needs_a_whole_listing(
    tmp_path: Path, listing: list[str], status: int, marker: str
) -> None:
    ps = tmp_path / "ps"
    body = "".join(f"printf '%s\\n' '{line}'\n" for line in listing)
    ps.write_text(f"#!/bin/sh\n{body}exit {status}\n")
    ps.chmod(0o755)
    vm = RunningVM("vm1", "/vmfs/volumes/ds1/vm1/vm1.vmx", cartel=4194000)
    done = subprocess.run(
        ["/bin/sh", "-c", kill_command(vm, 0.05)],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"},
        timeout=30,
        check=False,
    )
    assert done.stdout.splitlines()[-1:] == [marker], done.stdout + done.stderr
