"""kind = "vsphere" config keys: what they accept, what they refuse, the root-only password."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from vmfenced.config import Config, check_environment, parse
from vmfenced.daemon.reload_plan import plan
from vmfenced.errors import ConfigError

PIN = "AB:" * 31 + "CD"


def vsphere(**extra: Any) -> dict[str, Any]:
    return {
        "name": "vc1",
        "address": "vc.example.net",
        "kind": "vsphere",
        "username": "fence@vsphere.local",
        "password_file": "/etc/vmfenced/vc1.password",
        **extra,
    }


def config(*hosts: dict[str, Any]) -> dict[str, Any]:
    return {"hosts": list(hosts)}


def problems(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(data)
    return "; ".join(caught.value.problems)


def test_defaults_port_443_and_verified_tls() -> None:
    host = parse(config(vsphere())).hosts[0]
    assert (host.port, host.tls_verify, host.tls_thumbprint) == (443, True, None)


def test_an_explicit_port_is_kept() -> None:
    assert parse(config(vsphere(port=8443))).hosts[0].port == 8443


def test_ssh_hosts_keep_port_22() -> None:
    assert parse(config({"name": "esx1", "address": "10.0.0.1"})).hosts[0].port == 22


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        (PIN, PIN.lower()),
        ("ab" * 31 + "cd", PIN.lower()),
    ],
)
def test_thumbprint_is_normalised(given: str, kept: str) -> None:
    assert parse(config(vsphere(tls_thumbprint=given))).hosts[0].tls_thumbprint == kept


@pytest.mark.parametrize(
    "bad",
    [
        "ab:" * 19 + "cd",  # SHA-1: forgeable, refused
        "zz" * 32,
        "ab" * 31 + ":cd",
        "",
    ],
)
def test_thumbprint_must_be_sha256(bad: str) -> None:
    assert "SHA-256" in problems(config(vsphere(tls_thumbprint=bad)))


def test_username_and_password_file_are_required() -> None:
    data = vsphere()
    del data["password_file"]
    assert "needs username and password_file" in problems(config(data))
    data = vsphere()
    del data["username"]
    assert "needs username and password_file" in problems(config(data))


def test_tls_verify_false_contradicts_a_pin() -> None:
    assert "contradicts" in problems(config(vsphere(tls_verify=False, tls_thumbprint=PIN)))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("client_keys", ["/k"]),
        ("known_hosts", "/kh"),
        ("fallback_addresses", ["10.0.0.2"]),
        ("vsphere_name", "esx-01"),
        # An API entry has no helper: vmfenced-host is an SSH key's program.
        ("mode", "helper"),
    ],
)
def test_ssh_keys_are_refused_on_vsphere(key: str, value: object) -> None:
    assert f'{key}: not for kind = "vsphere"' in problems(config(vsphere(**{key: value})))


@pytest.mark.parametrize("key", ["password_file", "tls_thumbprint", "datacenter"])
def test_vsphere_keys_are_refused_on_ssh_hosts(key: str) -> None:
    value = PIN if key == "tls_thumbprint" else "/x" if key == "password_file" else "DC0"
    host = {"name": "esx1", "address": "10.0.0.1", key: value}
    assert f'{key}: only for kind = "vsphere"' in problems(config(host))


def test_vsphere_name_is_unique() -> None:
    one = {"name": "esx1", "address": "10.0.0.1", "vsphere_name": "esx-01"}
    two = {"name": "esx2", "address": "10.0.0.2", "vsphere_name": "esx-01"}
    assert "vsphere_name 'esx-01' is given to two hosts" in problems(config(one, two))


def test_password_file_must_be_root_only(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o644)
    found = check_environment(parse(config(vsphere(password_file=str(secret)))))
    assert any("must be owned by root and not readable by others" in p for p in found)
    assert not any("s3cret" in p for p in found)
    secret.chmod(0o600)
    found = check_environment(parse(config(vsphere(password_file=str(secret)))))
    owner_ok = os.geteuid() == 0
    assert any("must be owned by root" in p for p in found) is not owner_ok


def test_missing_password_file(tmp_path: Path) -> None:
    found = check_environment(parse(config(vsphere(password_file=str(tmp_path / "none")))))
    assert any("password_file of vc1" in p and "No such file" in p for p in found)


def test_ssh_mode_helper_leaves_a_vsphere_entry_alone() -> None:
    """[ssh] mode is the SSH hosts' default, as [ssh] client_keys: a vsphere entry ignores it."""
    data = config(vsphere(), {"name": "esx1", "address": "10.0.0.1"})
    data["ssh"] = {"mode": "helper"}
    parsed = parse(data)
    assert parsed.ssh.mode == "helper" and parsed.hosts[0].mode is None


def test_a_vsphere_entry_needs_no_ssh_key(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    data = config(vsphere(password_file=str(secret)))
    data["ssh"] = {"client_keys": [str(tmp_path / "missing-key")]}
    found = check_environment(parse(data))
    assert not any("client key" in p or "known_hosts" in p for p in found), found


KEY = Path("/etc/vmfenced/id_ed25519")


def with_vsphere(**extra: Any) -> Config:
    return parse(
        {
            "ssh": {"client_keys": [str(KEY)]},
            "hosts": [{"name": "esx1", "address": "192.0.2.11"}, vsphere(**extra)],
        }
    )


def test_reload_keeps_an_unchanged_vsphere_entry() -> None:
    keys = {KEY: asyncssh.generate_private_key("ssh-ed25519")}
    same = plan(with_vsphere(), keys, with_vsphere(), keys, "vmfenced.toml")
    assert set(same.unchanged) == {"esx1", "vc1"} and not same.changed


def test_reload_replaces_a_changed_vsphere_entry() -> None:
    keys = {KEY: asyncssh.generate_private_key("ssh-ed25519")}
    changed = plan(with_vsphere(), keys, with_vsphere(port=8443), keys, "vmfenced.toml")
    assert (changed.replaced, changed.unchanged) == (("vc1",), ("esx1",))
