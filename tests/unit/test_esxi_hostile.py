"""ESXi parsers on hostile names (every class of control and line-separator character, text
shaped like another record, quotes), names shared by two VMs, and the power-on re-check run for
real (dash, and busybox ash + awk as on ESXi) with a stand-in vim-cmd."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.unit.conftest import stand_in
from tests.unit.test_esxi import ESXCLI_XML, VMDUMPER
from vmfenced.backends import parse_kill_marker
from vmfenced.backends.esxi import (
    parse_esxcli_xml,
    parse_getallvms,
    parse_vmdumper,
    power_on_command,
)
from vmfenced.errors import ParseError
from vmfenced.model import KillOutcome, RegisteredVM

# -- hostile names ---------------------------------------------------------------------------
# Every class of character that str.splitlines() breaks on or that no listing carries
# unambiguously: \r, \v, \f, \x1c-\x1e, \x85, U+2028, U+2029, the rest of C0 and C1, DEL.
HOSTILE = [
    *("\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"),
    *("\x00", "\x01", "\x07", "\t", "\n", "\x1b", "\x1f", "\x7f", "\x80", "\x9f"),
]
HOSTILE_IDS = [f"U+{ord(c):04X}" for c in HOSTILE]
EVIL_CFG = "/vmfs/volumes/ds1/evil/evil.vmx"
VICTIM_CFG = "/vmfs/volumes/ds1/victim/victim.vmx"


def vmdumper_line(name: str, cfg: str = EVIL_CFG, cartel: int = 9000, world: int = 9001) -> str:
    return (
        f'vmid={world} pid=-1 cfgFile="{cfg}" uuid="56 4d 00 00 00 00 00 00-00 00 00 00 00 00 '
        f'00 02" displayName="{name}" vmxCartelID={cartel}\n'
    )


def forged_vmdumper_name(sep: str, cfg: str = EVIL_CFG) -> str:
    """The issue's attack: a display name that ends one record and begins another one naming
    the victim, whose cartel is the attacker's own (vmdumper prints it after the name)."""
    return f'evil" vmxCartelID=5{sep}vmid=7 pid=-1 cfgFile="{cfg}" uuid="" displayName="victim'


@pytest.mark.parametrize("char", HOSTILE, ids=HOSTILE_IDS)
def test_vmdumper_name_with_a_control_or_separator_fails_the_listing(char: str) -> None:
    with pytest.raises(ParseError):
        parse_vmdumper(VMDUMPER + vmdumper_line(f"evil{char}name"))
    with pytest.raises(ParseError):
        parse_vmdumper(vmdumper_line("evil", cfg=f"/vmfs/volumes/ds1/e{char}/e{char}.vmx"))


@pytest.mark.parametrize(
    "sep", [c for c in HOSTILE if c != "\n"], ids=[i for i in HOSTILE_IDS if i != "U+000A"]
)
def test_vmdumper_forged_record_is_a_doubt_never_a_victim(sep: str) -> None:
    text = VMDUMPER + vmdumper_line(forged_vmdumper_name(sep))
    # What splitting on every line separator made of it: a victim record at the attacker's cartel.
    if sep in "\r\v\f\x1c\x1d\x1e\x85\u2028\u2029":
        assert any('displayName="victim" vmxCartelID=9000' in p for p in text.splitlines())
    with pytest.raises(ParseError):
        parse_vmdumper(text)


def test_vmdumper_forged_record_after_a_newline_needs_a_second_vmx_line() -> None:
    """A raw "\\n" in a name cuts the line itself: the forged half must then read as a record
    on its own. Naming the attacker's own .vmx (so that the guard would pass) repeats a .vmx."""
    text = VMDUMPER + vmdumper_line(forged_vmdumper_name("\n"))
    with pytest.raises(ParseError, match="listed twice"):
        parse_vmdumper(text)
    # Not completing the first line leaves it unreadable.
    with pytest.raises(ParseError, match="not understood"):
        parse_vmdumper(vmdumper_line('evil\nvmid=7 pid=-1 cfgFile="/a.vmx" uuid="" displayName="v'))


@pytest.mark.parametrize(
    "name",
    [
        'say "hi"',
        'victim" vmxCartelID=5',
        'evil" vmxCartelID=5 vmid=7 pid=-1 cfgFile="/vmfs/volumes/ds1/victim/victim.vmx',
        'displayName="victim"',
        "vmxCartelID=1",
        '"',
        '""',
        " victim ",
    ],
)
def test_vmdumper_quotes_and_field_text_in_a_name_stay_in_the_name(name: str) -> None:
    """The name runs to the line's last `" vmxCartelID=`: whatever it holds, the record is the
    attacker's own name at the attacker's own cartel, never another VM's."""
    (vm,) = parse_vmdumper(vmdumper_line(name))
    assert (vm.name, vm.cartel, vm.world, vm.config_file) == (name, 9000, 9001, EVIL_CFG)


@pytest.mark.parametrize(
    ("name", "cfg"),
    [
        ("evil", '/vmfs/volumes/ds1/a" uuid="" displayName="victim/x.vmx'),
        ('x" uuid="" displayName="victim', EVIL_CFG),
        ('x" uuid="56 4d" displayName="victim', EVIL_CFG),
        (forged_vmdumper_name(" "), EVIL_CFG),  # the forged record without a line separator
    ],
)
def test_vmdumper_path_and_name_that_cannot_be_told_apart_are_a_doubt(name: str, cfg: str) -> None:
    with pytest.raises(ParseError, match="cannot be told apart"):
        parse_vmdumper(vmdumper_line(name, cfg=cfg))


def test_vmdumper_path_holding_a_quote_alone_is_read_whole() -> None:
    (vm,) = parse_vmdumper(vmdumper_line("q", cfg='/vmfs/volumes/ds1/q"/q.vmx'))
    assert (vm.name, vm.config_file) == ("q", '/vmfs/volumes/ds1/q"/q.vmx')


@pytest.mark.parametrize(
    "text",
    [
        vmdumper_line("a") + vmdumper_line("b", cfg=VICTIM_CFG, world=1),  # one cartel twice
        vmdumper_line("a") + vmdumper_line("b", cfg=VICTIM_CFG, cartel=1),  # one world twice
        vmdumper_line("a") + vmdumper_line("b", cartel=1, world=2),  # one .vmx twice
        vmdumper_line("a", cartel=9000).replace("9000", "\u0669\u0660\u0660\u0660"),
        vmdumper_line("a").replace(" uuid", "\u2003uuid"),
        vmdumper_line("a").replace("\n", "\r\n"),
    ],
)
def test_vmdumper_strict_on_ids_digits_and_spacing(text: str) -> None:
    with pytest.raises(ParseError):
        parse_vmdumper(text)


def test_vmdumper_same_display_name_twice_is_two_vms() -> None:
    text = vmdumper_line("node1", cfg="/vmfs/volumes/ds1/node1/node1.vmx") + vmdumper_line(
        "node1", cfg="/vmfs/volumes/ds2/node1/node1.vmx", cartel=7000, world=7001
    )
    first, second = parse_vmdumper(text)
    assert (first.name, second.name) == ("node1", "node1")
    assert (first.cartel, second.cartel) == (9000, 7000)
    assert first.config_file != second.config_file


def esxcli_doc(*structures: tuple[str, str, int, int]) -> str:
    """esxcli XML with (DisplayName, ConfigFile, cartel, world) given as XML text."""
    body = "".join(
        f"""<structure typeName="VirtualMachine">
<field name="ConfigFile"><string>{cfg}</string></field>
<field name="DisplayName"><string>{name}</string></field>
<field name="ProcessID"><integer>0</integer></field>
<field name="UUID"><string></string></field>
<field name="VMXCartelID"><integer>{cartel}</integer></field>
<field name="WorldID"><integer>{world}</integer></field>
</structure>"""
        for name, cfg, cartel, world in structures
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?>'
        '<output xmlns="http://www.vmware.com/Products/ESX/5.0/esxcli"><root>'
        f'<list type="structure">{body}</list></root></output>'
    )


@pytest.mark.parametrize("char", HOSTILE, ids=HOSTILE_IDS)
@pytest.mark.parametrize("written", ["raw", "reference"])
def test_esxcli_xml_name_with_a_control_or_separator_fails(char: str, written: str) -> None:
    """Raw, or as a character reference: invalid XML, or a name the listing refuses; an XML
    parser turns a raw \\r into \\n, which is refused as well."""
    text = char if written == "raw" else f"&#x{ord(char):X};"
    with pytest.raises(ParseError):
        parse_esxcli_xml(esxcli_doc((f"evil{text}", EVIL_CFG, 9000, 9001)))
    with pytest.raises(ParseError):
        parse_esxcli_xml(esxcli_doc(("evil", f"/vmfs/volumes/ds1/e/e{text}.vmx", 9000, 9001)))


@pytest.mark.parametrize(
    ("xml_name", "name"),
    [
        (
            "evil&lt;/string&gt;&lt;/field&gt;&lt;field name=&quot;DisplayName&quot;&gt;"
            "&lt;string&gt;victim",
            'evil</string></field><field name="DisplayName"><string>victim',
        ),
        ('say "hi"', 'say "hi"'),
        (" victim ", " victim "),  # never stripped into "victim"
        ("vmxCartelID=1 displayName=&quot;victim&quot;", 'vmxCartelID=1 displayName="victim"'),
    ],
)
def test_esxcli_xml_markup_in_a_name_is_text(xml_name: str, name: str) -> None:
    (vm,) = parse_esxcli_xml(esxcli_doc((xml_name, EVIL_CFG, 9000, 9001)))
    assert (vm.name, vm.cartel, vm.config_file) == (name, 9000, EVIL_CFG)


def test_esxcli_xml_same_display_name_twice_is_two_vms_and_ids_are_unique() -> None:
    two = parse_esxcli_xml(
        esxcli_doc(
            ("node1", "/vmfs/volumes/ds1/node1/node1.vmx", 9000, 9001),
            ("node1", "/vmfs/volumes/ds2/node1/node1.vmx", 7000, 7001),
        )
    )
    assert [(vm.name, vm.cartel) for vm in two] == [("node1", 9000), ("node1", 7000)]
    with pytest.raises(ParseError, match="listed twice"):
        parse_esxcli_xml(esxcli_doc(("a", "/a/a.vmx", 9000, 9001), ("b", "/b/b.vmx", 9000, 7001)))
    doubled = ESXCLI_XML.replace(
        '<field name="DisplayName"><string>RH236_3.1</string></field>',
        '<field name="DisplayName"><string>RH236_3.1</string></field>'
        '<field name="DisplayName"><string>victim</string></field>',
    )
    with pytest.raises(ParseError, match="2 DisplayName fields"):
        parse_esxcli_xml(doubled)
    nested = ESXCLI_XML.replace("<string>RH236_3.1</string>", "<string>victim<b/>x</string>")
    with pytest.raises(ParseError, match="not one plain value"):
        parse_esxcli_xml(nested)


GETALLVMS_HEADER = (
    "Vmid       Name                          File                          Guest OS       "
    "Version   Annotation\n"
)


def getallvms_row(vmid: int, name: str, file: str, annotation: str = "") -> str:
    return f"{vmid:<6} {name:<30} {file:<44} {'otherLinux64Guest':<20} vmx-13   {annotation}\n"


@pytest.mark.parametrize("char", HOSTILE, ids=HOSTILE_IDS)
def test_getallvms_name_with_a_control_or_separator_fails(char: str) -> None:
    text = GETALLVMS_HEADER + getallvms_row(5, f"evil{char}x", "[ds1] evil/evil.vmx")
    with pytest.raises(ParseError):
        parse_getallvms(text)
    forged = f"evil{char}99     victim   [ds1] victim/victim.vmx   otherGuest   vmx-13"
    text = GETALLVMS_HEADER + getallvms_row(5, forged, "[ds1] evil/evil.vmx")
    with pytest.raises(ParseError):
        parse_getallvms(text)


def test_getallvms_annotation_lines_never_hide_or_forge_a_row() -> None:
    rows = getallvms_row(1, "vm1", "[ds1] vm1/vm1.vmx", "notes:")
    # Continuation lines of vm1's annotation: text that does not start with a Vmid.
    continued = (
        rows
        + "see [ds1] old/old.vmx\n  12 spaces first\n\n"
        + getallvms_row(2, 'say "hi"', "[ds 2] a b/a b.vmx", "cloned from [ds1] old/old.vmx")
    )
    assert [
        (vm.vmid, vm.name, vm.config_file) for vm in parse_getallvms(GETALLVMS_HEADER + continued)
    ] == [
        ("1", "vm1", "[ds1] vm1/vm1.vmx"),
        ("2", 'say "hi"', "[ds 2] a b/a b.vmx"),
    ]
    bad = [
        rows + "2019 upgrade\n",  # starts like a row: a row we cannot read, never skipped
        rows + "12     evil\n",  # a row cut short (its name held a newline)
        rows + getallvms_row(1, "victim", "[ds1] victim/victim.vmx"),  # one Vmid twice
        "orphan annotation line\n" + rows,  # continues nothing
        getallvms_row(3, "a [ds1] victim/victim.vmx b", "[ds1] evil/evil.vmx"),
    ]
    for text in bad:
        with pytest.raises(ParseError):
            parse_getallvms(GETALLVMS_HEADER + text)


def test_getallvms_same_display_name_twice_is_two_vms() -> None:
    text = GETALLVMS_HEADER + getallvms_row(3, "node1", "[ds1] node1/node1.vmx")
    text += getallvms_row(4, "node1", "[ds2] node1/node1.vmx")
    assert [(vm.vmid, vm.name, vm.config_file) for vm in parse_getallvms(text)] == [
        ("3", "node1", "[ds1] node1/node1.vmx"),
        ("4", "node1", "[ds2] node1/node1.vmx"),
    ]


def test_kill_marker_lines_end_at_newline_only() -> None:
    with pytest.raises(ParseError):
        parse_kill_marker("noise\x85vmf:killed\n")
    assert parse_kill_marker("vmf:alive\nx\u2028vmf:killed") is KillOutcome.ALIVE


# -- power-on re-check, run for real with a stand-in vim-cmd ----------------------------------
# The stand-in prints run/table for getallvms (exit status in run/status) and records power.on.
VIM_CMD = """#!/bin/sh
run=$(dirname "$0")/run
case $1 in
vmsvc/getallvms) cat "$run/table"; exit "$(cat "$run/status")";;
vmsvc/power.on) printf '%s\\n' "$2" >>"$run/started"; echo "Powering on VM:";;
*) exit 9;;
esac
"""


def shells() -> list[list[str]]:
    """dash with the system awk, and busybox ash with busybox awk as on ESXi."""
    found = [["/bin/sh"]]
    if shutil.which("busybox"):
        found.append(["busybox", "sh"])
    return found


def run_power_on(
    tmp_path: Path, shell: list[str], command: str, table: str, status: int = 0
) -> tuple[str, list[str]]:
    bin_dir = stand_in(tmp_path, "vim-cmd", VIM_CMD, table=table, status=f"{status}\n", started="")
    path = str(bin_dir)
    if shell[0] == "busybox":
        for applet in ("awk", "tail", "cat", "dirname"):
            link = bin_dir / applet
            if not link.exists():
                link.symlink_to(shutil.which("busybox") or "busybox")
    # Then one more command in the same shell: the check returns, it never exits that shell.
    done = subprocess.run(
        [*shell, "-c", command + "\necho after:$?"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{path}:{os.environ['PATH']}"},
        timeout=30,
        check=False,
    )
    return done.stdout + done.stderr, (bin_dir / "run/started").read_text().split()


NODE = RegisteredVM("12", 'gfs node 2 "a" $(touch x) \\', "[ds 2] gfs node 2/gfs node 2.vmx")


def table(*rows: tuple[int, str, str]) -> str:
    return GETALLVMS_HEADER + "".join(getallvms_row(v, n, f) for v, n, f in rows)


@pytest.mark.parametrize("shell", shells(), ids=lambda s: s[0])
def test_power_on_starts_the_vmid_that_still_names_that_vm(
    tmp_path: Path, shell: list[str]
) -> None:
    rows = table((3, "other", "[ds1] other/other.vmx"), (12, NODE.name, NODE.config_file))
    rows += "  12 an annotation line, not a row\n"
    assert parse_getallvms(rows)[1] == NODE
    out, started = run_power_on(tmp_path, shell, power_on_command(NODE), rows)
    assert started == ["12"], out
    assert out.splitlines()[-1] == "after:0", out
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("shell", shells(), ids=lambda s: s[0])
@pytest.mark.parametrize(
    ("rows", "status", "why"),
    [
        # After a reload: the host name now reaches another machine, where 12 is another VM.
        (table((12, "web01", "[ds1] web01/web01.vmx")), 0, "is no longer"),
        # Same name, another .vmx (another VM with that display name took the Vmid).
        (table((12, NODE.name, "[ds1] gfs node 2/gfs node 2.vmx")), 0, "is no longer"),
        # A name that merely starts with the VM's name.
        (table((12, NODE.name + " old", NODE.config_file)), 0, "is no longer"),
        (table((3, NODE.name, NODE.config_file)), 0, "no Vmid 12"),
        (table(), 0, "no Vmid 12"),
        # An annotation line that starts with the Vmid: two lines for one Vmid is a doubt.
        (table((12, NODE.name, NODE.config_file)) + "12 monkeys\n", 0, "is no longer"),
        (table((12, NODE.name + "x", NODE.config_file)) + f"  12 {NODE.name}", 0, "is no longer"),
        (table((12, NODE.name, NODE.config_file)), 1, "getallvms failed"),
        ("vim.fault.NotAuthenticated\n", 0, "no getallvms table"),
        # 012 is not 12: Vmids are compared as text.
        (table((12, NODE.name, NODE.config_file)).replace("\n12 ", "\n012"), 0, "no Vmid 12"),
    ],
)
def test_power_on_refuses_a_vmid_that_names_something_else(
    tmp_path: Path, shell: list[str], rows: str, status: int, why: str
) -> None:
    out, started = run_power_on(tmp_path, shell, power_on_command(NODE), rows, status)
    assert started == [], out
    lines = out.splitlines()
    assert lines[-1] == "after:1", out
    assert lines[-2].startswith("vmf:refused ") and why in lines[-2], out
    assert not (tmp_path / "x").exists()
