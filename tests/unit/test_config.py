"""Config models: good input loads, every bad key is named in the error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vmfenced.config import Config, check_environment, load, parse
from vmfenced.daemon.app import check
from vmfenced.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "config" / "vmfenced.toml"


def base() -> dict[str, Any]:
    return {
        "ssh": {"known_hosts": "/etc/vmfenced/known_hosts"},
        "hosts": [{"name": "esx1", "address": "192.0.2.11"}],
    }


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(data)
    return list(info.value.problems)


def test_minimal_config_gets_defaults() -> None:
    config = parse(base())
    assert config.daemon.socket == Path("/run/vmfenced/vmfenced.sock")
    assert config.daemon.socket_mode == 0o660
    assert config.daemon.fence_timeout == 10
    assert config.ssh.username == "root"
    assert config.hosts[0].port == 22
    assert config.hosts[0].kind == "esxi"


def test_example_config_loads() -> None:
    config = load(EXAMPLE)
    assert isinstance(config, Config)
    assert config.aliases


def test_socket_mode_is_octal() -> None:
    data = base() | {"daemon": {"socket_mode": "0640"}}
    assert parse(data).daemon.socket_mode == 0o640
    data = base() | {"daemon": {"socket_mode": "rw-rw----"}}
    assert problems(data) == [
        "daemon.socket_mode: must be an octal string like '0660', not 'rw-rw----'"
    ]


def test_host_overrides_ssh_defaults() -> None:
    data = base()
    data["hosts"].append(
        {"name": "esx2", "address": "192.0.2.12", "username": "fence", "port": 2222}
    )
    config = parse(data)
    assert config.ssh_for(config.hosts[0]).username == "root"
    override = config.ssh_for(config.hosts[1])
    assert override.username == "fence"
    assert override.known_hosts == Path("/etc/vmfenced/known_hosts")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda d: d["hosts"][0].update(port=70000),
            "hosts[0] (esx1).port: Input should be less than or equal to 65535",
        ),
        (
            lambda d: d["hosts"][0].update(port="ssh"),
            "hosts[0] (esx1).port: Input should be a valid integer",
        ),
        (
            lambda d: d["hosts"][0].update(kind="hyperv"),
            "hosts[0] (esx1).kind: Input should be 'esxi'",
        ),
        (lambda d: d["hosts"][0].update(colour="red"), "hosts[0] (esx1).colour: unknown key"),
        (
            lambda d: d.update(daemon={"fence_timeout": 0}),
            "daemon.fence_timeout: Input should be greater than 0",
        ),
        (
            lambda d: d.update(daemon={"inventory_interval": "often"}),
            "daemon.inventory_interval: Input should be a valid number",
        ),
        (
            lambda d: d.update(daemon={"socket": "relative.sock"}),
            "daemon.socket: must be an absolute path",
        ),
        (
            lambda d: d["ssh"].update(keepalive_count_max=0),
            "ssh.keepalive_count_max: Input should be greater than or equal to 1",
        ),
        (
            lambda d: d["ssh"].update(client_keys=[]),
            "ssh.client_keys: Tuple should have at least 1 item after validation, not 0",
        ),
        (lambda d: d.update(hosts=[]), "hosts: at least one [[hosts]] entry is needed"),
        (lambda d: d.update(extra={"a": 1}), "extra: unknown key"),
        (lambda d: d.pop("hosts"), "hosts: Field required"),
        (
            lambda d: d["hosts"][0].update(name="bad name!"),
            "hosts[0] (bad name!).name: String should match pattern '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'",
        ),
    ],
)
def test_every_bad_key_is_named(change: Any, expected: str) -> None:
    data = base()
    change(data)
    assert any(p.startswith(expected) for p in problems(data)), problems(data)


def test_duplicate_hosts_are_refused() -> None:
    data = base()
    data["hosts"].append({"name": "esx1", "address": "192.0.2.12"})
    assert problems(data) == ["hosts: name 'esx1' is used twice"]
    data["hosts"][1]["name"] = "esx2"
    data["hosts"][1]["address"] = "192.0.2.11"
    assert problems(data) == ["hosts: 'esx2' and 'esx1' both use 192.0.2.11:22"]


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[daemon]\nsocket = \n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert "line 2" in info.value.problems[0]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "nope.toml")
    assert info.value.problems == ("cannot read: No such file or directory",)


def test_environment_checks_files_and_group(tmp_path: Path) -> None:
    data = base()
    data["ssh"] = {"known_hosts": str(tmp_path / "kh"), "client_keys": [str(tmp_path / "key")]}
    data["daemon"] = {"socket_group": "no-such-group-vmf"}
    found = check_environment(parse(data))
    assert f"client key of esx1: {tmp_path / 'key'} does not exist or is not a file" in found
    assert f"known_hosts of esx1: {tmp_path / 'kh'} does not exist or is not a file" in found
    assert "daemon.socket_group: no group named 'no-such-group-vmf'" in found


def test_check_reports_an_unreadable_key(tmp_path: Path) -> None:
    (tmp_path / "kh").write_text("")
    (tmp_path / "key").write_text("not a key\n")
    path = tmp_path / "c.toml"
    path.write_text(
        f'[ssh]\nknown_hosts = "{tmp_path}/kh"\nclient_keys = ["{tmp_path}/key"]\n'
        '[[hosts]]\nname = "esx1"\naddress = "127.0.0.1"\n'
    )
    (found,) = check(path)
    assert found.startswith(f"cannot read client key {tmp_path}/key:")
