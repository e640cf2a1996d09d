"""vmfenced-host: the shipped program is the daemon's, its grammar refuses the rest, and it
runs under dash and busybox ash (the shells of Linux hosts and of ESXi)."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vmfenced.backends import ShFunction, helper
from vmfenced.backends.registry import BACKENDS
from vmfenced.clients import hosthelper
from vmfenced.clients.ctl import run as ctl_run
from vmfenced.config import parse

TOKEN = "0123456789abcdef"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFBcZl9QdyJB1AuX7iiPAhn4EoM9xjW0QG+qAlI4qxAn node1"


def shells() -> list[list[str]]:
    found = []
    if shutil.which("dash"):
        found.append(["dash"])
    if shutil.which("busybox"):
        found.append(["busybox", "ash"])
    if os.environ.get("CI") and len(found) < 2:
        pytest.fail("the helper tests need dash and busybox")
    return found


SHELLS = shells()


def ctl(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = ctl_run(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("kind", sorted(BACKENDS))
def test_the_shipped_program_is_exactly_what_the_daemon_builds(kind: str) -> None:
    shipped = (helper.DATA_DIR / f"{kind}.sh").read_text()
    assert shipped == helper.template(BACKENDS[kind]), (
        "stale vmfenced/hosthelper: run `python3 -m vmfenced.backends.helper`"
    )
    code, printed, _ = ctl("host-helper", "--kind", kind)
    assert code == 0
    assert printed == shipped.replace(helper.URI_MARK, "qemu:///system")
    assert f"\nVMF_VERSION={helper.version(BACKENDS[kind])}\n" in printed


@pytest.mark.parametrize("kind", sorted(BACKENDS))
def test_the_program_embeds_the_shell_mode_functions(kind: str) -> None:
    backend = BACKENDS[kind]
    text = helper.template(backend)
    for function in (
        *(listing.function for listing in backend.listings),
        backend.registered,
        backend.kill,
        backend.power_on,
    ):
        assert function.body in text


def test_a_body_redefining_another_function_is_refused() -> None:
    """All functions share one program in the helper: a body that redefined the prelude's
    validators (or another body's function) would change what runs, unlike shell mode."""
    backend = BACKENDS["libvirt"]
    clash = ShFunction(
        "vmf_on", backend.power_on.params, backend.power_on.body + "\nvmf_num() { :; }"
    )
    with pytest.raises(ValueError, match="defined twice: vmf_num"):
        helper.template(dataclasses.replace(backend, power_on=clash))


def test_ctl_prints_the_authorized_keys_line(tmp_path: Path) -> None:
    key = tmp_path / "id.pub"
    key.write_text(KEY + "\n")
    path = "/vmfs/volumes/datastore1/vmfenced/vmfenced-host"
    code, out, err = ctl("host-helper", "--kind", "esxi", "--path", path, "--public-key", str(key))
    assert (code, err) == (0, "")
    assert out == f'restrict,command="/bin/sh {path}" {KEY}\n'
    code, out, err = ctl(
        "host-helper",
        "--kind",
        "libvirt",
        "--path",
        "/usr/local/sbin/vmfenced-host",
        "--public-key",
        str(key),
    )
    assert out == f'restrict,command="/usr/local/sbin/vmfenced-host" {KEY}\n'
    # ESX classic's OpenSSH 3/4 refuses a key line holding `restrict` (OpenSSH 7.2).
    code, out, err = ctl(
        "host-helper",
        "--kind",
        "esx-classic",
        "--path",
        "/opt/vmfenced-host",
        "--public-key",
        str(key),
    )
    assert (code, err) == (0, "")
    assert out == (
        "no-port-forwarding,no-agent-forwarding,no-X11-forwarding,no-pty,"
        f'command="/opt/vmfenced-host" {KEY}\n'
    )


@pytest.mark.parametrize(
    "argv",
    [
        ("--path", "relative/x"),
        ("--path", '/x" id "'),
        ("--public-key", "BADKEY"),
        ("--libvirt-uri", "qemu+ext:///system?command=/bin/id x"),
    ],
)
def test_ctl_refuses_bad_values(tmp_path: Path, argv: tuple[str, ...]) -> None:
    key = tmp_path / "id.pub"
    key.write_text(KEY)
    bad = tmp_path / "bad.pub"
    bad.write_text('ssh-ed25519 AAAA" id\n')
    args = [str(bad) if a == "BADKEY" else a for a in argv]
    if "--path" in args and "--public-key" not in args:
        args += ["--public-key", str(key)]
    if "--public-key" in args and "--path" not in args:
        args += ["--path", "/usr/local/sbin/vmfenced-host"]
    kind = "libvirt" if "--libvirt-uri" in args else "esxi"
    code, out, err = ctl("host-helper", "--kind", kind, *args)
    assert code == 2 and out == "" and "error" in err


def test_libvirt_uri_is_baked_in() -> None:
    text = hosthelper.program("libvirt", "qemu+ssh://h/system")
    assert "LIBVIRT_DEFAULT_URI=qemu+ssh://h/system;" in text
    with pytest.raises(hosthelper.HelperUsage):
        hosthelper.program("esxi", "qemu+ssh://h/system")


def hexed(text: str) -> str:
    return text.encode().hex() or "-"


def serve(
    shell: list[str], kind: str, requests: str, tmp_path: Path, **env: str
) -> tuple[int, str, list[str]]:
    """Runs the helper with `requests` on stdin: status, output, and what it logged."""
    program = tmp_path / "vmfenced-host"
    program.write_text(hosthelper.program(kind))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    syslog = tmp_path / "syslog"
    logger = bin_dir / "logger"
    logger.write_text('#!/bin/sh\nshift 4\nprintf "%s\\n" "$*" >> "$VMF_TEST_SYSLOG"\n')
    logger.chmod(0o755)
    result = subprocess.run(
        [*shell, str(program)],
        input=requests.encode(),
        capture_output=True,
        timeout=30,
        check=False,
        env={
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "VMF_TEST_SYSLOG": str(syslog),
            "SSH_CONNECTION": "127.0.0.9 40000 127.0.0.1 22",
            **env,
        },
    )
    logged = syslog.read_text().split("\n")[:-1] if syslog.exists() else []
    return result.returncode, result.stdout.decode(errors="replace"), logged


@pytest.mark.parametrize("shell", SHELLS, ids=" ".join)
def test_handshake_ping_and_a_guarded_kill(shell: list[str], tmp_path: Path) -> None:
    version = helper.version(BACKENDS["libvirt"])
    requests = (
        f"{TOKEN} hello {hexed(version)}\n{TOKEN} ping\n"
        # A name full of shell syntax is data: the guard compares it, nothing runs it.
        f"{TOKEN} kill {hexed(f'$(touch {tmp_path}/owned); x')} 999999999 3\n"
        f"{TOKEN} kill =vm1 999999999 3\n"
    )
    code, out, logged = serve(shell, "libvirt", requests, tmp_path)
    assert code == 0 and logged == []
    assert out == (
        f"vmf:helper {version} libvirt qemu:///system\n\n:vmf-end:{TOKEN}:0\n"
        f"\n:vmf-end:{TOKEN}:0\n"
        f"vmf:not-running\n\n:vmf-end:{TOKEN}:0\n"
        f"vmf:not-running\n\n:vmf-end:{TOKEN}:0\n"
    )
    assert not (tmp_path / "owned").exists()


@pytest.mark.parametrize("shell", SHELLS, ids=" ".join)
def test_a_version_mismatch_is_answered_and_logged(shell: list[str], tmp_path: Path) -> None:
    code, out, logged = serve(shell, "esxi", f"{TOKEN} hello {hexed('1-old')}\n", tmp_path)
    assert code == 0
    assert out.startswith(f"vmf:helper {helper.version(BACKENDS['esxi'])} esxi -\n")
    assert out.endswith(f":vmf-end:{TOKEN}:1\n")
    assert logged == [
        "refused a request from 127.0.0.9: version mismatch: the daemon expects 1-old"
    ]


MALFORMED = [
    ("id", "malformed request: id"),
    (f"{TOKEN} kill $(touch OWNED) 1 1", "malformed request"),
    (f"{TOKEN} kill `touch OWNED` 1 1", "malformed request"),
    (f"{TOKEN}  ping", "malformed request"),
    (f"{TOKEN} ping\r", "malformed request"),
    (f"{TOKEN[:-1]} ping", "malformed request"),
    (f"{TOKEN} sh", "unknown request: sh"),
    (f"{TOKEN} ping 1", "ping takes 0 arguments, not 1"),
    (f"{TOKEN} kill 41 010 3", "not a number: 010"),
    (f"{TOKEN} kill 41 1 1234567890", "number too long: 1234567890"),
    (f"{TOKEN} kill 4 1 1", "odd hex length: 4"),
    (f"{TOKEN} kill 0a 1 1", "a control character in a text argument"),
    (f"{TOKEN} kill =a*b 1 1", "malformed request"),
    (f"{TOKEN} kill =$(id) 1 1", "malformed request"),
    (f"{TOKEN} kill 41=b 1 1", "not lowercase hex: 41=b"),
    (f"{TOKEN} list 9", "no listing 9"),
    (f"{TOKEN} ping " + "1" * helper.MAX_REQUEST, f"request over {helper.MAX_REQUEST} bytes"),
]


@pytest.mark.parametrize("shell", SHELLS, ids=" ".join)
@pytest.mark.parametrize(("request_line", "reason"), MALFORMED)
def test_malformed_requests_end_the_session_and_are_logged(
    shell: list[str], request_line: str, reason: str, tmp_path: Path
) -> None:
    line = request_line.replace("OWNED", str(tmp_path / "owned"))
    code, out, logged = serve(shell, "esxi", f"{line}\n{TOKEN} ping\n", tmp_path)
    assert code == 2
    assert "vmf:refused " + reason in out
    # Nothing after a malformed request is served: one answer at most (its refusal's frame).
    assert out.count(":vmf-end:") <= 1
    assert len(logged) == 1 and logged[0].startswith("refused a request from 127.0.0.9: ")
    assert reason[:40] in logged[0]
    assert not (tmp_path / "owned").exists()


@pytest.mark.parametrize("shell", SHELLS, ids=" ".join)
def test_any_other_ssh_command_is_refused(shell: list[str], tmp_path: Path) -> None:
    code, out, logged = serve(
        shell, "esx-classic", f"{TOKEN} ping\n", tmp_path, SSH_ORIGINAL_COMMAND="id; sh"
    )
    assert (code, out) == (1, "vmf:refused command not allowed: id; sh\n")
    assert logged == ["refused a request from 127.0.0.9: command not allowed: id; sh"]


def test_requests_encode_names_as_hex() -> None:
    backend = BACKENDS["esxi"]
    assert helper.request("on", backend.power_on, ("12", "a b", "")) == "on =12 612062 -"
    assert helper.request("kill", backend.kill, ("/x/x.vmx", 5, 7)) == "kill =/x/x.vmx 5 7"
    assert helper.request("kill", backend.kill, ("x\n", 5, 7)) == "kill 780a 5 7"
    with pytest.raises(ValueError):
        helper.framed("not-a-token", "ping")


def test_hello_answers_are_checked() -> None:
    spec = helper.HelperSpec("libvirt", "1-abc", "qemu:///system")
    assert spec.refusal("vmf:helper 1-abc libvirt qemu:///system\n") is None
    assert "version mismatch: the host runs 1-old" in str(
        spec.refusal("vmf:helper 1-old libvirt qemu:///system\n")
    )
    assert "serves esxi hosts" in str(spec.refusal("vmf:helper 1-abc esxi -\n"))
    assert "libvirt URI test:///default" in str(
        spec.refusal("vmf:helper 1-abc libvirt test:///default\n")
    )
    assert (
        spec.refusal("sh: 1: vmfenced-host: not found\n")
        == "no vmfenced-host answered: sh: 1: vmfenced-host: not found"
    )


def test_mode_is_an_ssh_setting_a_host_may_override() -> None:
    config = parse(
        {
            "ssh": {"mode": "helper"},
            "hosts": [
                {"name": "a", "address": "127.0.0.1"},
                {"name": "b", "address": "127.0.0.2", "mode": "shell"},
            ],
        }
    )
    assert [config.ssh_for(h).mode for h in config.hosts] == ["helper", "shell"]
    assert parse({"hosts": [{"name": "a", "address": "127.0.0.1"}]}).ssh.mode == "shell"


def test_vmfencectl_knows_every_kind() -> None:
    """A new kind needs its program shipped and named in vmfencectl (which cannot import the
    registry): `python3 -m vmfenced.backends.helper`, then add it to hosthelper.KINDS."""
    assert sorted(hosthelper.KINDS) == sorted(BACKENDS)
    assert sorted(p.stem for p in helper.DATA_DIR.glob("*.sh")) == sorted(BACKENDS)


@pytest.mark.parametrize("shell", SHELLS, ids=" ".join)
def test_an_esxi_kill_names_a_vmx_or_nothing_is_killed(shell: list[str], tmp_path: Path) -> None:
    """Through the helper a node chooses the text the guard looks for: it must be a .vmx tail,
    never a process name that would match another cartel's rows (hostd's, say)."""
    code, out, _ = serve(shell, "esxi", f"{TOKEN} kill =hostd 1 3\n", tmp_path)
    assert code == 0
    assert out == f"not a .vmx path: hostd\nvmf:error\n\n:vmf-end:{TOKEN}:0\n"


@pytest.mark.parametrize("shell", SHELLS, ids=" ".join)
def test_the_proxmox_helper_names_its_node_and_holds_off_by_vmid(
    shell: list[str], tmp_path: Path
) -> None:
    """The node is the host's hostname (never a request's word), and `hold-off` takes a VMID:
    a number, no leading zero, at most 9 digits; anything else ends the session."""
    version = helper.version(BACKENDS["proxmox"])
    node = os.uname().nodename.split(".")[0]
    code, out, logged = serve(
        shell,
        "proxmox",
        f"{TOKEN} hello ={version}\n{TOKEN} hold-off 100 101\n{TOKEN} ping\n",
        tmp_path,
        VMF_PVE_NODE="chosen-by-the-client",
    )
    assert code == 2
    assert out.startswith(f"vmf:helper {version} proxmox {node}\n\n:vmf-end:{TOKEN}:0\n")
    assert "vmf:refused hold-off takes 1 arguments, not 2\n" in out
    assert len(logged) == 1
    for bad in ("0100", "=100", "1234567890", "-1"):
        code, out, logged = serve(shell, "proxmox", f"{TOKEN} hold-off {bad}\n", tmp_path)
        assert code == 2 and out.startswith("vmf:refused "), (bad, out)


def test_a_proxmox_entry_is_checked_against_the_helpers_node() -> None:
    backend = BACKENDS["proxmox"]
    spec = helper.spec(backend, "qemu:///system", "pve2")
    version = helper.version(backend)
    assert spec.refusal(f"vmf:helper {version} proxmox pve2\n") is None
    assert "runs on Proxmox node pve1, this entry's node is pve2" in str(
        spec.refusal(f"vmf:helper {version} proxmox pve1\n")
    )
